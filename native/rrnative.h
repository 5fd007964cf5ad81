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
    uint8_t settled_by_step;    /* rr_settle: KVM reported the finished instruction as a step */
};

/* rr_step: the exact engine's single-step loop (see rrnative.c). */
#define RR_STEP_LIMIT     1   /* icount reached stop_icount */
#define RR_STEP_DEADLINE  2   /* host_deadline passed */
#define RR_STEP_IF_OPEN   3   /* STOP_IF_OPEN and the guest can take an interrupt */
#define RR_STEP_SPECIAL   4   /* the next instruction may need emulation: insn[] holds it */
#define RR_STEP_EXIT      5   /* a KVM exit other than a step (I/O, MMIO, ...): see rr_exit */
#define RR_STEP_KICK      6   /* KVM_RUN came back with EINTR */
#define RR_STEP_NOFETCH   7   /* paging mode the C fetch does not walk */
#define RR_STEP_BREAK     8   /* rip is one of breaks[] (the instruction has not run) */
#define RR_STEP_WATCH     9   /* watches[hit] no longer equals its shadow copy */
#define RR_STEP_LANDMARK 10   /* the general registers equal *landmark (the instruction at rip has not run) */
#define RR_STEP_TRACE_FULL 11 /* a trace buffer is nearly full: drain it, then call again */

#define RR_STEP_STOP_IF_OPEN  1u  /* stop at the first boundary where an interrupt can be injected */
#define RR_STEP_NO_CHECK_ONCE 2u  /* step the next instruction without looking at it */
#define RR_STEP_COMPLETE      4u  /* finish the instruction whose exit was just handled */
#define RR_STEP_SKIP_BREAK    8u  /* do not stop at a breakpoint before the next step */
#define RR_STEP_LANDINGS     16u  /* stays set: stop steps that transfer control by an event at their landing */
#define RR_STEP_SKIP_LANDMARK 32u  /* do not stop at the landmark before the next step (its pages differed) */

/* A watched guest-physical range (within one page) and the bytes it held. */
struct rr_watch {
    uint64_t gpa;
    uint64_t len;
    uint8_t *shadow;
};

struct rr_step_ctl {
    uint64_t icount;        /* in/out: instructions completed */
    uint64_t stop_icount;   /* in: return RR_STEP_LIMIT when icount reaches it */
    uint64_t host_deadline; /* in: CLOCK_MONOTONIC ns, 0 = none */
    uint64_t rip;           /* in/out: linear address of the next instruction */
    uint64_t cr0, cr3, cr4, efer;  /* in: paging state for instruction fetch */
    uint8_t *mem;           /* in: guest RAM at guest physical 0 */
    uint64_t mem_size;
    uint32_t flags;         /* in: RR_STEP_* flags, cleared as they are used */
    uint32_t reason;        /* out: RR_STEP_* reason */
    uint32_t long_mode;     /* in: 64-bit code segment (REX prefixes exist) */
    uint32_t insn_len;      /* out: bytes of insn[] that could be fetched */
    uint8_t insn[16];       /* out: the instruction at rip, for RR_STEP_SPECIAL */
    const uint64_t *breaks; /* in: ascending linear addresses to stop before (RR_STEP_BREAK) */
    uint32_t nbreaks;
    uint32_t nwatches;
    const struct rr_watch *watches;  /* in: ranges compared before every step (RR_STEP_WATCH) */
    uint32_t hit;           /* out: the index in watches[] that changed */
    uint32_t deliver_vector;/* in: vector + 1 of the interrupt the next step delivers (0: none; LANDINGS only) */
    uint64_t landings_missed; /* out: landing steps that did not stop there (KVM ran on past it) */
    uint64_t idt_base;      /* in: the IDT (kept current across lidt by rr_step) */
    uint32_t idt_limit;
    uint64_t armed[4];      /* the execution breakpoints armed now (rr_step_arm clears them) */
    const void *landmark;   /* in: struct kvm_regs to stop at (RR_STEP_LANDMARK), NULL: none */
    uint64_t landmark_la;   /* in: the landmark's rip as a linear address */
    uint64_t landmark_hits; /* out: boundaries at landmark_la so far (whatever their registers) */
    void *landmark_last;    /* out: struct kvm_regs at the last hit that did not match */
    uint64_t *visited;      /* in/out: RR_VISITED_WORDS words, a bit per hash of every rip looked at (NULL: none) */
    struct rr_trace *trace; /* in/out: the index's record of every step (NULL: none) */
};

/*
 * The index's record of every step (rrtrace.c), filled when ctl->trace is
 * set.  Buffers are the caller's; rr_step stops with RR_STEP_TRACE_FULL
 * before a step that might not fit, and the caller drains and resets the
 * counts (nwrites, nold, nnew, nevents, ncalls, and the histogram slots).
 */
#define RR_WRITE_INSN  0    /* the instruction's own store */
#define RR_WRITE_FRAME 1    /* the frame an interrupt's or exception's delivery pushed */

struct rr_write {
    uint64_t pos;           /* the instruction count before the step */
    uint64_t rip;           /* linear address of the instruction (an event: where it came) */
    uint64_t va;            /* linear address stored to */
    uint64_t pa;            /* guest physical (the record lies within one page) */
    uint32_t size;
    uint8_t kind;           /* RR_WRITE_* */
    uint8_t has_old;        /* its bytes before are in old_bytes (not for a frame on another stack) */
    uint16_t vector;        /* RR_WRITE_FRAME: the vector */
};

#define RR_EVENT_INTERRUPT 1    /* an injected interrupt's delivery */
#define RR_EVENT_EXCEPTION 2    /* an exception the instruction raised (#UD, #GP, #PF) */
#define RR_EVENT_SOFTWARE  3    /* int n, int3, int1, into */

struct rr_event {
    uint64_t pos;
    uint64_t rip;           /* where the event came (the instruction not run, or that raised it) */
    uint64_t handler;       /* where the step landed */
    uint32_t vector;
    uint32_t kind;          /* RR_EVENT_* */
};

struct rr_call {
    uint64_t pos;           /* a step whose rip is a function's entry */
    uint64_t rip;
};

struct rr_trace {
    struct rr_write *writes;
    uint32_t nwrites, max_writes;
    uint8_t *old_bytes;     /* the has_old records' old bytes, in record order */
    uint32_t nold;
    uint8_t *new_bytes;     /* every record's new bytes, in record order */
    uint32_t nnew;
    uint32_t max_bytes;     /* of old_bytes and of new_bytes each */
    struct rr_event *events;
    uint32_t nevents, max_events;
    struct rr_call *calls;
    uint32_t ncalls, max_calls;
    const uint64_t *entries;    /* ascending function entry addresses (calls) */
    uint32_t nentries;
    uint32_t hist_slots;        /* a power of two */
    uint64_t *hist_rip;         /* rip + 1 (0: an empty slot) */
    uint64_t *hist_count;
    uint32_t hist_used;
    uint64_t fs_base, gs_base;  /* kept current across swapgs and wr*base; the engine sets them after wrmsr */
    uint64_t steps;             /* positions counted */
    uint64_t undecoded;         /* steps whose stores could not be worked out (not recorded) */
    uint64_t dropped;           /* steps the engine ran itself, whose decoded stores were dropped */
    /* rrtrace.c's own, for the step in flight */
    uint64_t counted_at;
    uint32_t pending, pending_old;
    uint64_t step_pos, step_rip;
    uint32_t step_insn_len;
    struct kvm_regs before;
    uint8_t pre[64];
    uint64_t pre_la;
    uint32_t pre_ok;
    uint32_t rep, rep_elem, rep_old_ok;
    uint64_t rep_rdi, rep_rcx;
    uint8_t rep_old[8];
    uint32_t reload_segments, software_int;   /* software_int: int n's vector + 1 */
};

/* The visited summary: a bit per rip hash, RR_VISITED_WORDS * 64 bits (rr_visited_bit). */
#define RR_VISITED_WORDS 64

/* rr_relocate_to results */
#define RR_RELOCATE_DONE    0
#define RR_RELOCATE_EXIT    1   /* a deterministic exit came first: see rr_exit */
#define RR_RELOCATE_TIMEOUT 2   /* the loop did not end before the deadline */
#define RR_RELOCATE_FOREIGN 3   /* a debug exception of the guest's own (TF, its DRs): see rr_exit */

/* rr_run_to_regs results */
#define RR_LANDMARK_MATCH 0
#define RR_LANDMARK_EXIT  1   /* another exit came first: see rr_exit */
#define RR_LANDMARK_KICK  2

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
int rr_step(int vcpu_fd, void *run_area, struct rr_step_ctl *c, struct rr_exit *ex);
uint32_t rr_visited_bit(uint64_t rip);
int rr_settle(int vcpu_fd, void *run_area, struct rr_exit *ex);
int rr_step_arm(int vcpu_fd, struct rr_step_ctl *c);
int rr_current_rip(int vcpu_fd, uint64_t *rip);
int rr_relocate_to(int vcpu_fd, void *run_area, uint64_t exit_at, uint64_t deadline_ns, struct rr_exit *ex);
int rr_trace_load(const char *library);
const char *rr_trace_error(void);
int rr_run_to_regs(int vcpu_fd, void *run_area, const void *want_regs, int step_over_first,
                   uint64_t deadline_ns, uint64_t *hits, void *last_regs, struct rr_exit *ex);
#endif
