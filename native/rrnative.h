/* Declarations shared by rrnative.c and the cffi cdef in native/build.py. */
#ifndef RRNATIVE_H
#define RRNATIVE_H
#include <stddef.h>
#include <stdint.h>

#define RR_KICK_SIGNAL (SIGRTMIN + 3)
#define RR_EXIT_INTR 0x10000   /* KVM_RUN came back with EINTR: a kick */

struct rr_exit {
    uint32_t reason;            /* KVM_EXIT_* or RR_EXIT_INTR */
    uint8_t if_flag;
    uint8_t ready_for_injection;
    uint8_t io_out;
    uint8_t io_size;
    uint16_t io_port;
    uint32_t io_count;
    uint64_t io_data_offset;
    uint64_t mmio_addr;
    uint32_t mmio_len;
    uint8_t mmio_write;
    uint8_t mmio_data[8];
    uint32_t debug_exception;
    uint64_t debug_pc;
    uint64_t debug_dr6;
    uint64_t debug_dr7;
    uint32_t internal_suberror;
    uint32_t internal_ndata;
    uint64_t internal_data[16];
    uint64_t fail_entry_reason;
    uint32_t system_event_type;
};

int rr_ioctl(int fd, unsigned long request, void *arg);
int rr_ioctl_int(int fd, unsigned long request, unsigned long arg);
void *rr_map_run(int vcpu_fd, size_t size);
int rr_unmap(void *addr, size_t size);
int rr_kick_attach(void *run);
void rr_kick_detach(void *run);
int rr_kick(void *run);
uint64_t rr_monotonic_ns(void);
int rr_vcpu_run(int vcpu_fd, void *run_area, uint64_t deadline_ns, struct rr_exit *ex);
long rr_run_n(int vcpu_fd, void *run_area, long n);
void rr_set_mmio_data(void *run_area, const uint8_t *data, uint32_t len);
void rr_set_request_interrupt_window(void *run_area, int on);
#endif
