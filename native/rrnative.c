/*
 * rrnative: the C hot paths of the VMM, called from Python through cffi.
 *
 * Owns: one KVM_RUN round trip with its exit decoded into struct rr_exit
 * (so Python touches a flat struct, not the kvm_run union), the per-thread
 * deadline timer and the kick signal that bring a running vCPU back to
 * userspace, and a checked ioctl wrapper.
 *
 * Kicking: a POSIX timer (SIGEV_THREAD_ID) or rr_kick() sends RR_KICK_SIGNAL
 * to the vCPU thread; the handler sets immediate_exit in the registered
 * kvm_run, so a kick that lands just before KVM_RUN is entered still makes
 * that KVM_RUN return at once (KVM_CAP_IMMEDIATE_EXIT).  A kick that lands
 * after KVM_RUN returned costs one spurious RR_EXIT_INTR, never a lost one.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "rrnative.h"

static struct kvm_run *volatile kick_run;
static pthread_t kick_thread;
static int kick_thread_valid;
static timer_t deadline_timer;
static int deadline_timer_valid;
static uint64_t armed_deadline;

static void kick_handler(int sig)
{
    (void)sig;
    struct kvm_run *run = kick_run;
    if (run)
        run->immediate_exit = 1;
}

int rr_ioctl(int fd, unsigned long request, void *arg)
{
    int r;
    do {
        r = ioctl(fd, request, arg);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

int rr_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

void *rr_map_run(int vcpu_fd, size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

int rr_unmap(void *addr, size_t size)
{
    return munmap(addr, size) < 0 ? -errno : 0;
}

int rr_kick_attach(void *run)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: KVM_RUN must come back with EINTR */
    if (sigaction(RR_KICK_SIGNAL, &sa, NULL) < 0)
        return -errno;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, RR_KICK_SIGNAL);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);

    if (deadline_timer_valid) {
        timer_delete(deadline_timer);
        deadline_timer_valid = 0;
    }
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = RR_KICK_SIGNAL;
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &sev, &deadline_timer) < 0)
        return -errno;
    deadline_timer_valid = 1;
    armed_deadline = 0;
    kick_thread = pthread_self();
    kick_thread_valid = 1;
    kick_run = (struct kvm_run *)run;
    return 0;
}

void rr_kick_detach(void *run)
{
    if (kick_run == run) {
        kick_run = NULL;
        kick_thread_valid = 0;
        if (deadline_timer_valid) {
            timer_delete(deadline_timer);
            deadline_timer_valid = 0;
        }
    }
}

/* Kick only the vCPU that asked for kicks: a late kick meant for a machine
 * that is gone must not disturb the next one. */
int rr_kick(void *run)
{
    if (!kick_thread_valid || kick_run != run)
        return -ESRCH;
    int r = pthread_kill(kick_thread, RR_KICK_SIGNAL);
    return -r;
}

static int arm_deadline(uint64_t deadline_ns)
{
    if (!deadline_timer_valid || deadline_ns == armed_deadline)
        return 0;
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = deadline_ns / 1000000000ull;
    its.it_value.tv_nsec = deadline_ns % 1000000000ull;
    if (timer_settime(deadline_timer, TIMER_ABSTIME, &its, NULL) < 0)
        return -errno;
    armed_deadline = deadline_ns;
    return 0;
}

uint64_t rr_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int rr_vcpu_run(int vcpu_fd, void *run_area, uint64_t deadline_ns, struct rr_exit *ex)
{
    struct kvm_run *run = run_area;
    int r = arm_deadline(deadline_ns);
    if (r < 0)
        return r;
    r = ioctl(vcpu_fd, KVM_RUN, 0);
    int err = errno;
    run->immediate_exit = 0;
    ex->if_flag = run->if_flag;
    ex->ready_for_injection = run->ready_for_interrupt_injection;
    if (r < 0) {
        if (err == EINTR || err == EAGAIN) {
            ex->reason = RR_EXIT_INTR;
            return 0;
        }
        return -err;
    }
    ex->reason = run->exit_reason;
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        ex->io_out = run->io.direction == KVM_EXIT_IO_OUT;
        ex->io_size = run->io.size;
        ex->io_port = run->io.port;
        ex->io_count = run->io.count;
        ex->io_data_offset = run->io.data_offset;
        break;
    case KVM_EXIT_MMIO:
        ex->mmio_addr = run->mmio.phys_addr;
        ex->mmio_len = run->mmio.len;
        ex->mmio_write = run->mmio.is_write;
        memcpy(ex->mmio_data, run->mmio.data, 8);
        break;
    case KVM_EXIT_DEBUG:
        ex->debug_exception = run->debug.arch.exception;
        ex->debug_pc = run->debug.arch.pc;
        ex->debug_dr6 = run->debug.arch.dr6;
        ex->debug_dr7 = run->debug.arch.dr7;
        break;
    case KVM_EXIT_INTERNAL_ERROR: {
        uint32_t n = run->internal.ndata;
        if (n > 16)
            n = 16;
        ex->internal_suberror = run->internal.suberror;
        ex->internal_ndata = n;
        memcpy(ex->internal_data, run->internal.data, n * sizeof(uint64_t));
        break;
    }
    case KVM_EXIT_FAIL_ENTRY:
        ex->fail_entry_reason = run->fail_entry.hardware_entry_failure_reason;
        break;
    case KVM_EXIT_SYSTEM_EVENT:
        ex->system_event_type = run->system_event.type;
        break;
    default:
        break;
    }
    return 0;
}

/*
 * The reference for exit cost: n KVM_RUN round trips with no decoding and no
 * device work, as a C VMM with an empty port handler would do them.  Returns
 * the number of runs that ended in KVM_EXIT_IO, or -errno.
 */
long rr_run_n(int vcpu_fd, void *run_area, long n)
{
    struct kvm_run *run = run_area;
    long io = 0;
    for (long i = 0; i < n; i++) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
            if (errno != EINTR && errno != EAGAIN)
                return -errno;
            run->immediate_exit = 0;  /* a kick is not one of the n exits */
            i--;
            continue;
        }
        io += run->exit_reason == KVM_EXIT_IO;
    }
    return io;
}

void rr_set_mmio_data(void *run_area, const uint8_t *data, uint32_t len)
{
    struct kvm_run *run = run_area;
    memcpy(run->mmio.data, data, len > 8 ? 8 : len);
}

void rr_set_request_interrupt_window(void *run_area, int on)
{
    ((struct kvm_run *)run_area)->request_interrupt_window = on ? 1 : 0;
}
