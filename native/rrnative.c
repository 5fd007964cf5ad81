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
 *
 * Also owns the exact engine's single-step loop (rr_step) and the fast
 * engine's landmark search (rr_run_to_regs): both run many KVM_RUNs per
 * call from Python.
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
#include "rrtrace.h"

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

static void decode_exit(struct kvm_run *run, struct rr_exit *ex)
{
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
}

uint64_t rr_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#define RUN_KICKED 1

/*
 * One KVM_RUN, as every loop here does it: 0 for an exit (see run->exit_reason),
 * RUN_KICKED when it came back with EINTR (a kick, or immediate_exit), or
 * -errno.  The interrupt flags of the exit are copied to *ex either way.  A
 * kick consumes immediate_exit; after a real exit it is left alone, so a kick
 * that landed just then makes the next KVM_RUN return at once instead of
 * being lost.
 */
static int run_once(int vcpu_fd, struct kvm_run *run, struct rr_exit *ex)
{
    int r = ioctl(vcpu_fd, KVM_RUN, 0);
    int err = errno;
    ex->if_flag = run->if_flag;
    ex->ready_for_injection = run->ready_for_interrupt_injection;
    if (r >= 0)
        return 0;
    if (err != EINTR && err != EAGAIN)
        return -err;
    run->immediate_exit = 0;
    return RUN_KICKED;
}

int rr_vcpu_run(int vcpu_fd, void *run_area, uint64_t deadline_ns, struct rr_exit *ex)
{
    struct kvm_run *run = run_area;
    int r = arm_deadline(deadline_ns);
    if (r < 0)
        return r;
    r = run_once(vcpu_fd, run, ex);
    if (r < 0)
        return r;
    if (r == RUN_KICKED) {
        ex->reason = RR_EXIT_INTR;
        armed_deadline = 0;  /* a deadline already passed is re-armed, so it kicks again */
        return 0;
    }
    decode_exit(run, ex);
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

/* ------------------------------------------------------------------------
 * Exact engine: single-step every instruction, count them, and stop before
 * any instruction that could observe the host (rdtsc, rdrand, cpuid, ...)
 * or that needs the engine's help (hlt, writes to paging registers).
 *
 * Observed on KVM with KVM_GUESTDBG_SINGLESTEP (PVM and VMX alike): a step
 * that ends in a port-I/O or MMIO exit does not also report a debug exit on
 * this host, and hlt under single-step is skipped rather than halting.  So
 * an instruction that exits is finished by one KVM_RUN with immediate_exit
 * set (KVM completes the pending I/O, then returns without running the
 * guest, or reports the step), and counts as one instruction; hlt is never
 * run at all: the filter below hands it to the engine.
 */
#define CR0_PG (1ull << 31)
#define CR4_LA57 (1ull << 12)
#define EFER_LMA (1ull << 10)
#define PTE_P 1ull
#define PTE_PS (1ull << 7)
#define PTE_ADDR 0x000ffffffffff000ull

/* Linear to guest-physical for instruction fetch: 0 ok, -1 not mapped, -2 mode not walked here. */
static int fetch_translate(const struct rr_step_ctl *c, uint64_t la, uint64_t *pa)
{
    if (!(c->cr0 & CR0_PG)) {
        *pa = la;
        return 0;
    }
    if (!(c->efer & EFER_LMA) || (c->cr4 & CR4_LA57))
        return -2;
    uint64_t table = c->cr3 & PTE_ADDR;
    for (int level = 4; level >= 1; level--) {
        int shift = 12 + 9 * (level - 1);
        uint64_t slot = table + ((la >> shift) & 511) * 8;
        if (slot + 8 > c->mem_size)
            return -1;
        uint64_t entry;
        memcpy(&entry, c->mem + slot, 8);
        if (!(entry & PTE_P))
            return -1;
        if (level <= 3 && level >= 2 && (entry & PTE_PS)) {
            uint64_t size = 1ull << shift;
            *pa = (entry & PTE_ADDR & ~(size - 1)) | (la & (size - 1));
            return 0;
        }
        table = entry & PTE_ADDR;
    }
    *pa = table | (la & 0xfff);
    return 0;
}

int rr_translate(const struct rr_step_ctl *c, uint64_t la, uint64_t *pa)
{
    return fetch_translate(c, la, pa);
}

/* Copy up to 15 bytes at c->rip into c->insn; returns the count, or -2 for an unwalkable mode. */
static int fetch(struct rr_step_ctl *c)
{
    uint32_t got = 0;
    uint64_t la = c->rip;
    while (got < 15) {
        uint64_t pa;
        int r = fetch_translate(c, la, &pa);
        if (r == -2)
            return -2;
        if (r < 0 || pa >= c->mem_size)
            break;
        uint64_t room = 4096 - (la & 0xfff);
        if (room > 15 - got)
            room = 15 - got;
        if (pa + room > c->mem_size)
            room = c->mem_size - pa;
        memcpy(c->insn + got, c->mem + pa, room);
        got += room;
        la += room;
    }
    c->insn_len = got;
    return (int)got;
}

int rr_fetch(struct rr_step_ctl *c)
{
    return fetch(c);
}

/* The index of the first byte after any legacy and REX prefixes. */
static uint32_t skip_prefixes(const uint8_t *b, uint32_t n, int long_mode)
{
    uint32_t i = 0;
    while (i < n) {
        uint8_t p = b[i];
        if (p == 0xF0 || p == 0xF2 || p == 0xF3 || p == 0x2E || p == 0x36 || p == 0x3E ||
            p == 0x26 || p == 0x64 || p == 0x65 || p == 0x66 || p == 0x67 ||
            (long_mode && (p & 0xF0) == 0x40))
            i++;
        else
            break;
    }
    return i;
}

/* A superset filter: true for every instruction the engine emulates or must watch. */
static int maybe_special(const uint8_t *b, uint32_t n, int long_mode)
{
    uint32_t i = skip_prefixes(b, n, long_mode);
    if (i >= n)
        return 0;
    if (b[i] == 0xF4)                       /* hlt */
        return 1;
    if (b[i] != 0x0F || i + 1 >= n)
        return 0;
    switch (b[i + 1]) {
    case 0x31:                              /* rdtsc */
    case 0xA2:                              /* cpuid */
    case 0x30:                              /* wrmsr */
    case 0x32:                              /* rdmsr */
    case 0x22:                              /* mov to control register */
        return 1;
    case 0x01:                              /* rdtscp */
        return i + 2 < n && b[i + 2] == 0xF9;
    case 0xC7:                              /* rdrand, rdseed, rdpid */
        return i + 2 < n && (b[i + 2] >> 6) == 3 && ((b[i + 2] >> 3) & 7) >= 6;
    default:
        return 0;
    }
}

static int set_debug(int fd, uint32_t control, uint64_t dr0, uint64_t dr7)
{
    struct kvm_guest_debug dbg;
    memset(&dbg, 0, sizeof dbg);
    dbg.control = control;
    dbg.arch.debugreg[0] = dr0;
    dbg.arch.debugreg[7] = dr7;
    return ioctl(fd, KVM_SET_GUEST_DEBUG, &dbg) < 0 ? -errno : 0;
}


#define RR_NEVER_RIP 0xDEAD000000000000ull
#define CR0_PE 1ull

/*
 * Guest debugging: single-step, plus an execution breakpoint at each nonzero
 * dr[i].  Set with RIP at a non-canonical address no guest code can be at:
 * KVM puts RFLAGS.TF into the guest's real flags while RIP equals the RIP
 * it was armed at, and the guest could then see TF in an interrupt frame
 * or a pushf, depending on where a run was last started.
 */
static int arm_debug_at(int fd, const uint64_t dr[4], struct kvm_regs *now);

static int arm_debug(int fd, const uint64_t dr[4])
{
    struct kvm_regs regs;
    if (ioctl(fd, KVM_GET_REGS, &regs) < 0)
        return -errno;
    return arm_debug_at(fd, dr, &regs);
}

/* arm_debug with the registers already read (*now; its rip is put back). */
static int arm_debug_at(int fd, const uint64_t dr[4], struct kvm_regs *now)
{
    struct kvm_regs regs = *now;
    uint64_t rip = regs.rip;
    regs.rip = RR_NEVER_RIP;
    if (ioctl(fd, KVM_SET_REGS, &regs) < 0)
        return -errno;
    struct kvm_guest_debug dbg;
    memset(&dbg, 0, sizeof dbg);
    dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
    for (int i = 0; i < 4; i++) {
        if (!dr[i])
            continue;
        dbg.control |= KVM_GUESTDBG_USE_HW_BP;
        dbg.arch.debugreg[i] = dr[i];
        dbg.arch.debugreg[7] |= 1ull << (2 * i);   /* Li: enabled, execute, length 1 */
    }
    int r = ioctl(fd, KVM_SET_GUEST_DEBUG, &dbg) < 0 ? -errno : 0;
    regs.rip = rip;
    if (ioctl(fd, KVM_SET_REGS, &regs) < 0)
        return -errno;
    return r;
}

/* Arm plain single-stepping (the state rr_step expects when a run starts). */
int rr_step_arm(int vcpu_fd, struct rr_step_ctl *c)
{
    memset(c->armed, 0, sizeof c->armed);
    return arm_debug(vcpu_fd, c->armed);
}

/* Arm dr[] unless it is what is armed already. */
static int arm_if_changed(int fd, struct rr_step_ctl *c, const uint64_t dr[4])
{
    if (memcmp(dr, c->armed, sizeof c->armed) == 0)
        return 0;
    int r = arm_debug(fd, dr);
    if (r == 0)
        memcpy(c->armed, dr, sizeof c->armed);
    return r;
}

/* Copy n bytes at linear address la out of guest memory: 0, or -1 when a byte of it is not in RAM. */
int rr_copy_linear(const struct rr_step_ctl *c, uint64_t la, uint32_t n, uint8_t *out)
{
    uint32_t got = 0;
    while (got < n) {
        uint64_t pa;
        if (fetch_translate(c, la + got, &pa) != 0)
            return -1;
        uint32_t run = 4096 - ((la + got) & 0xfff);
        if (run > n - got)
            run = n - got;
        if (pa + run > c->mem_size)
            return -1;
        memcpy(out + got, c->mem + pa, run);
        got += run;
    }
    return 0;
}

/* Read n <= 8 bytes at linear address la: 0, or -1 when a byte of it is not mapped. */
static int read_linear(const struct rr_step_ctl *c, uint64_t la, uint32_t n, uint64_t *value)
{
    uint8_t b[8];
    if (rr_copy_linear(c, la, n, b) < 0)
        return -1;
    *value = 0;
    memcpy(value, b, n);
    return 0;
}

/* The linear address of interrupt `vector`'s handler, from the IDT; 0 when it cannot be read. */
static uint64_t handler_entry(const struct rr_step_ctl *c, uint32_t vector)
{
    uint64_t lo, hi;
    if (!(c->cr0 & CR0_PE)) {
        if (4 * vector + 3 > c->idt_limit || read_linear(c, c->idt_base + 4 * vector, 4, &lo) < 0)
            return 0;
        return ((lo >> 16) << 4) + (lo & 0xffff);
    }
    if (c->efer & EFER_LMA) {
        if (16 * vector + 15 > c->idt_limit || read_linear(c, c->idt_base + 16 * vector, 8, &lo) < 0 ||
            read_linear(c, c->idt_base + 16 * vector + 8, 4, &hi) < 0)
            return 0;
        return (lo & 0xffff) | ((lo >> 48) << 16) | (hi << 32);
    }
    if (8 * vector + 7 > c->idt_limit || read_linear(c, c->idt_base + 8 * vector, 8, &lo) < 0)
        return 0;
    return (lo & 0xffff) | ((lo >> 48) << 16);   /* flat 32-bit code segments */
}

/* After lidt: the IDT the guest now uses. */
static int reload_idt(int fd, struct rr_step_ctl *c)
{
    struct kvm_sregs s;
    if (ioctl(fd, KVM_GET_SREGS, &s) < 0)
        return -errno;
    c->idt_base = s.idt.base;
    c->idt_limit = s.idt.limit;
    return 0;
}

/* lidt (0F 01 /3, memory operand), after any prefixes. */
static int is_lidt(const uint8_t *b, uint32_t n, int long_mode)
{
    uint32_t i = skip_prefixes(b, n, long_mode);
    return i + 2 < n && b[i] == 0x0F && b[i + 1] == 0x01 && ((b[i + 2] >> 3) & 7) == 3 && (b[i + 2] >> 6) != 3;
}

#define MSR_LSTAR 0xC0000082u

/* Exceptions a kernel takes in normal work (#UD, #GP, #PF), whose handlers stay
 * armed as landings: a step whose instruction faults stops at the handler. */
static const uint32_t fault_vectors[3] = {6, 13, 14};

static int read_msr(int fd, uint32_t index, uint64_t *value)
{
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry entry;
    } m;
    memset(&m, 0, sizeof m);
    m.hdr.nmsrs = 1;
    m.entry.index = index;
    if (ioctl(fd, KVM_GET_MSRS, &m) != 1)
        return -1;
    *value = m.entry.data;
    return 0;
}

/*
 * The landing of the instruction in insn[]: where an instruction that moves
 * control by an event (iret, int n, int3, int1, syscall, sysret) continues,
 * read from the state before it runs; 0 for any other instruction or when it
 * cannot be known.  Long mode only (the protected-mode forms need segment
 * bases this loop does not track).
 */
static uint64_t landing_of(int fd, const struct rr_step_ctl *c, uint32_t n)
{
    if (!c->long_mode)
        return 0;
    uint32_t i = skip_prefixes(c->insn, n, 1);
    if (i >= n)
        return 0;
    int rex_w = i > 0 && (c->insn[i - 1] & 0xF8) == 0x48;     /* REX.W: the prefix just before the opcode */
    uint32_t size = rex_w ? 8 : memchr(c->insn, 0x66, i) ? 2 : 4;
    uint8_t op = c->insn[i];
    uint64_t target = 0;
    struct kvm_regs regs;
    switch (op) {
    case 0xCF:                                  /* iret: the rip on top of the stack */
        if (ioctl(fd, KVM_GET_REGS, &regs) < 0 || read_linear(c, regs.rsp, size, &target) < 0)
            return 0;
        return target;
    case 0xCC:                                  /* int3 */
        return handler_entry(c, 3);
    case 0xF1:                                  /* int1 */
        return handler_entry(c, 1);
    case 0xCD:                                  /* int n */
        return i + 1 < n ? handler_entry(c, c->insn[i + 1]) : 0;
    case 0x0F:
        if (i + 1 >= n)
            return 0;
        if (c->insn[i + 1] == 0x05)             /* syscall */
            return read_msr(fd, MSR_LSTAR, &target) < 0 ? 0 : target;
        if (c->insn[i + 1] == 0x07) {           /* sysret: to rcx */
            if (ioctl(fd, KVM_GET_REGS, &regs) < 0)
                return 0;
            return rex_w ? regs.rcx : (regs.rcx & 0xFFFFFFFFull);
        }
        return 0;
    default:
        return 0;
    }
}

/* Finish any I/O or MMIO the last exit left pending, without running guest
 * code (KVM_RUN with immediate_exit), so the vCPU state can be saved. */
int rr_settle(int vcpu_fd, void *run_area, struct rr_exit *ex)
{
    struct kvm_run *run = run_area;
    run->immediate_exit = 1;
    int r = run_once(vcpu_fd, run, ex);
    run->immediate_exit = 0;
    if (r < 0)
        return r;
    ex->settled_by_step = r == 0 && run->exit_reason == KVM_EXIT_DEBUG;
    return 0;
}

/* Finish an instruction whose exit (I/O, MMIO) userspace has just handled. */
static int complete_instruction(int fd, struct kvm_run *run, struct rr_step_ctl *c, struct rr_exit *ex)
{
    int r = rr_settle(fd, run, ex);
    if (r < 0)
        return r;
    if (ex->settled_by_step) {
        c->rip = run->debug.arch.pc;
    } else {
        struct kvm_regs regs;
        if (ioctl(fd, KVM_GET_REGS, &regs) < 0)
            return -errno;
        c->rip = regs.rip;
    }
    c->icount++;
    return 0;
}

static int is_break(const struct rr_step_ctl *c)
{
    uint32_t lo = 0, hi = c->nbreaks;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (c->breaks[mid] == c->rip)
            return 1;
        if (c->breaks[mid] < c->rip)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

static int watch_changed(struct rr_step_ctl *c)
{
    for (uint32_t i = 0; i < c->nwatches; i++) {
        const struct rr_watch *w = &c->watches[i];
        if (memcmp(c->mem + w->gpa, w->shadow, w->len) != 0) {
            c->hit = i;
            return 1;
        }
    }
    return 0;
}

/*
 * Which bit of the visited summary stands for rip (a multiplicative hash):
 * every rip rr_step looks at between instructions sets its bit, so a
 * summary without a breakpoint's bit proves the breakpoint was not hit.
 */
uint32_t rr_visited_bit(uint64_t rip)
{
    return (uint32_t)((rip * 0x9E3779B97F4A7C15ull) >> (64 - 12));
}

/*
 * Whether the registers are a landmark's: every general register equal, and
 * RFLAGS equal but for AF.  AF is left undefined by shifts, logic operations
 * and multiplies, and CPUs and KVM's instruction emulator differ there (a
 * recording made on one host version had AF set after `shl` where the next
 * leaves it clear); in 64-bit mode no instruction but pushf/lahf can see it.
 */
#define RFLAGS_AF 0x10ull
static int landmark_regs_equal(const struct kvm_regs *a, const struct kvm_regs *b)
{
    struct kvm_regs x = *a, y = *b;
    x.rflags &= ~RFLAGS_AF;
    y.rflags &= ~RFLAGS_AF;
    return memcmp(&x, &y, sizeof x) == 0;
}

/* At the landmark's rip: whether the registers are the landmark's. */
static int landmark_reached(int fd, struct rr_step_ctl *c)
{
    struct kvm_regs regs;
    c->landmark_hits++;
    if (ioctl(fd, KVM_GET_REGS, &regs) < 0)
        return -errno;
    if (landmark_regs_equal(&regs, c->landmark))
        return 1;
    if (c->landmark_last)
        memcpy(c->landmark_last, &regs, sizeof regs);
    return 0;
}

/*
 * Single-step until something needs the engine.  Checked before every
 * instruction, in this order: a watched range changed (by the previous
 * instruction: the caller updates the shadow before going on), the
 * instruction limit, the host deadline, an open interrupt window (when
 * asked), the landmark (a fast recording's logged point, replayed by
 * stepping: rip and then every general register), a breakpoint at rip
 * (unless SKIP_BREAK: the caller is resuming from it, or an injected
 * interrupt runs first), an instruction to emulate.
 */
int rr_step(int vcpu_fd, void *run_area, struct rr_step_ctl *c, struct rr_exit *ex)
{
    struct kvm_run *run = run_area;
    int r = arm_deadline(0);
    if (r < 0)
        return r;
    if (c->flags & RR_STEP_COMPLETE) {
        c->flags &= ~RR_STEP_COMPLETE;
        r = complete_instruction(vcpu_fd, run, c, ex);
        if (r < 0)
            return r;
        if (c->trace && (r = rr_trace_completed(vcpu_fd, c->trace, c)) < 0)
            return r;
    } else if (c->trace) {
        rr_trace_drop(c->trace);
    }
    for (uint32_t n = 0;; n++) {
        if (c->visited) {
            uint32_t bit = rr_visited_bit(c->rip);
            c->visited[bit >> 6] |= 1ull << (bit & 63);
        }
        if (c->nwatches && watch_changed(c)) {
            c->reason = RR_STEP_WATCH;
            return 0;
        }
        if (c->icount >= c->stop_icount) {
            c->reason = RR_STEP_LIMIT;
            return 0;
        }
        if (c->host_deadline && (n & 15) == 0 && rr_monotonic_ns() >= c->host_deadline) {
            c->reason = RR_STEP_DEADLINE;
            return 0;
        }
        if ((c->flags & RR_STEP_STOP_IF_OPEN) && run->if_flag && run->ready_for_interrupt_injection) {
            c->reason = RR_STEP_IF_OPEN;
            return 0;
        }
        if (c->landmark && c->rip == c->landmark_la && !(c->flags & RR_STEP_SKIP_LANDMARK)) {
            r = landmark_reached(vcpu_fd, c);
            if (r < 0)
                return r;
            if (r) {
                c->reason = RR_STEP_LANDMARK;
                return 0;
            }
        }
        if (c->nbreaks && !(c->flags & RR_STEP_SKIP_BREAK) && is_break(c)) {
            c->reason = RR_STEP_BREAK;
            return 0;
        }
        if (c->trace) {
            if (rr_trace_room_low(c->trace)) {
                c->reason = RR_STEP_TRACE_FULL;
                return 0;
            }
            if (!c->deliver_vector)
                rr_trace_count(c->trace, c);
        }
        int fetched = 0;
        if (c->flags & RR_STEP_NO_CHECK_ONCE) {
            c->flags &= ~RR_STEP_NO_CHECK_ONCE;
        } else {
            int got = fetch(c);
            fetched = got;
            if (got == -2) {
                c->reason = RR_STEP_NOFETCH;
                return 0;
            }
            if (maybe_special(c->insn, (uint32_t)got, c->long_mode)) {
                c->reason = RR_STEP_SPECIAL;
                return 0;
            }
        }
        c->flags &= ~(RR_STEP_SKIP_BREAK | RR_STEP_SKIP_LANDMARK);
        uint64_t want[4] = {0, 0, 0, 0};
        if (c->flags & RR_STEP_LANDINGS) {
            if (c->deliver_vector)
                want[0] = handler_entry(c, c->deliver_vector - 1);
            else if (fetched > 0 && (want[0] = landing_of(vcpu_fd, c, (uint32_t)fetched)) == c->rip)
                want[0] = 0;
            for (int i = 0; i < 3; i++) {
                uint64_t h = handler_entry(c, fault_vectors[i]);
                want[i + 1] = h == c->rip ? 0 : h;   /* RF is ignored here: never arm where we stand */
            }
        }
        r = arm_if_changed(vcpu_fd, c, want);
        if (r < 0)
            return r;
        uint32_t delivering = c->deliver_vector;
        if (c->trace && (r = rr_trace_before(vcpu_fd, c->trace, c, delivering != 0, fetched)) < 0)
            return r;
        r = run_once(vcpu_fd, run, ex);
        if (r < 0)
            return r;
        if (r == RUN_KICKED) {
            if (c->trace)
                rr_trace_cancel(c->trace);  /* the step runs again, and is looked at again */
            c->reason = RR_STEP_KICK;   /* nothing ran: an interrupt to deliver is still queued */
            return 0;
        }
        c->deliver_vector = 0;
        if (run->exit_reason == KVM_EXIT_DEBUG) {
            c->icount++;
            c->rip = run->debug.arch.pc;
            if (want[0] && c->rip != want[0] && c->rip != want[1] && c->rip != want[2] && c->rip != want[3])
                c->landings_missed++;
            if (c->trace) {
                uint32_t fault = 0;
                for (int i = 0; i < 3 && !delivering; i++)
                    if (want[i + 1] && c->rip == want[i + 1] && c->rip != want[0])
                        fault = fault_vectors[i] + 1;
                if ((r = rr_trace_after(vcpu_fd, c->trace, c, delivering, fault, delivering ? 0 : want[0])) < 0)
                    return r;
            }
            if (fetched > 0 && is_lidt(c->insn, (uint32_t)fetched, c->long_mode) && (r = reload_idt(vcpu_fd, c)) < 0)
                return r;
            continue;
        }
        decode_exit(run, ex);
        c->reason = RR_STEP_EXIT;
        return 0;
    }
}

/* ------------------------------------------------------------------------
 * Fast recording: where a kick stopped the guest inside a tight loop, the
 * recorder moves the landmark out of it (FastEngine._relocate finds the
 * loop by decoding the code); these do the guest's part.
 */

/* The current rip (one KVM_GET_REGS). */
int rr_current_rip(int vcpu_fd, uint64_t *rip)
{
    struct kvm_regs regs;
    if (ioctl(vcpu_fd, KVM_GET_REGS, &regs) < 0)
        return -errno;
    *rip = regs.rip;
    return 0;
}

/*
 * Run natively to exit_at (a loop's fall-through) with an execution
 * breakpoint, at most until deadline_ns (CLOCK_MONOTONIC): a loop that
 * waits for an interrupt never ends by itself.  Returns RR_RELOCATE_DONE
 * (at exit_at), RR_RELOCATE_TIMEOUT (still in the loop, or kicked),
 * RR_RELOCATE_EXIT (a deterministic exit came first: *ex),
 * RR_RELOCATE_FOREIGN (a debug exception of the guest's own: *ex) or
 * -errno; guest debugging is off again when this returns.
 */
int rr_relocate_to(int vcpu_fd, void *run_area, uint64_t exit_at, uint64_t deadline_ns, struct rr_exit *ex)
{
    struct kvm_run *run = run_area;
    int result = RR_RELOCATE_DONE;
    int r = set_debug(vcpu_fd, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, exit_at, 1);
    if (r == 0)
        r = arm_deadline(deadline_ns);
    if (r == 0) {
        r = run_once(vcpu_fd, run, ex);
        if (r == RUN_KICKED) {
            r = 0;
            armed_deadline = 0;
            result = RR_RELOCATE_TIMEOUT;
        } else if (r == 0 && run->exit_reason != KVM_EXIT_DEBUG) {
            decode_exit(run, ex);
            result = RR_RELOCATE_EXIT;
        } else if (r == 0 && run->debug.arch.pc != exit_at) {
            decode_exit(run, ex);
            result = RR_RELOCATE_FOREIGN;
        }
    }
    int off = set_debug(vcpu_fd, 0, 0, 0);
    if (r < 0)
        return r;
    return off < 0 ? off : result;
}

/* ------------------------------------------------------------------------
 * Fast engine replay: run until the vCPU is at want->rip with exactly the
 * general registers in *want (a landmark), using DR0 as an execution
 * breakpoint.  RF is ignored on this host, so a hit that is not the
 * landmark is stepped over with the breakpoint cleared (single-stepping
 * armed as arm_debug does: the guest never sees TF), then re-armed.
 * Each such hit's registers are left in *last_regs (what a divergence
 * report compares); the deadline (CLOCK_MONOTONIC, 0 = none) kicks the
 * search back with RR_LANDMARK_KICK.  Guest debugging is off again when
 * this returns.
 */
int rr_run_to_regs(int vcpu_fd, void *run_area, const void *want_regs, int step_over_first,
                   uint64_t deadline_ns, uint64_t *hits, void *last_regs, struct rr_exit *ex)
{
    struct kvm_run *run = run_area;
    const struct kvm_regs *want = want_regs;
    const uint32_t bp = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
    int r = arm_deadline(deadline_ns);
    int result = -1;
    if (r < 0)
        return r;
    int over = step_over_first;
    if (over) {
        static const uint64_t none[4] = {0, 0, 0, 0};
        r = arm_debug(vcpu_fd, none);
        if (r < 0)
            return r;
    }
    while (result < 0) {
        if (!over && (r = set_debug(vcpu_fd, bp, want->rip, 1)) < 0)
            break;
        r = run_once(vcpu_fd, run, ex);
        if (r < 0)
            break;
        if (r == RUN_KICKED) {
            r = 0;
            result = RR_LANDMARK_KICK;
            armed_deadline = 0;     /* a deadline that passed is re-armed by the next call */
            break;
        }
        if (run->exit_reason != KVM_EXIT_DEBUG) {
            decode_exit(run, ex);
            result = RR_LANDMARK_EXIT;
            break;
        }
        if (over) {
            over = 0;
            continue;
        }
        (*hits)++;
        struct kvm_regs regs;
        if (ioctl(vcpu_fd, KVM_GET_REGS, &regs) < 0) {
            r = -errno;
            break;
        }
        if (landmark_regs_equal(&regs, want)) {
            result = RR_LANDMARK_MATCH;
        } else {
            memcpy(last_regs, &regs, sizeof regs);
            /* Step over it with TF kept out of the guest's sight (arm_debug), not set_debug. */
            static const uint64_t none[4] = {0, 0, 0, 0};
            r = arm_debug_at(vcpu_fd, none, &regs);
            if (r < 0)
                break;
            over = 1;
        }
    }
    int off = set_debug(vcpu_fd, 0, 0, 0);
    if (r < 0)
        return r;
    return off < 0 ? off : result;
}

