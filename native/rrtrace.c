/*
 * rrtrace: what the index records of every step rr_step makes (ctl->trace).
 *
 * Before a step: the instruction's stores, decoded with capstone's C library
 * (its operands' access flags, plus the stack slots push, pushf and call
 * write) and computed from the registers of the moment, with the bytes they
 * are about to overwrite; the 64 bytes below the stack pointer, for the
 * frame an interrupt or exception might push; a count for the rip
 * (histogram) and, when rip is a function's first byte, the position.
 * After it: the new bytes, or, when the step delivered an interrupt or an
 * exception instead of running the instruction, the frame it pushed.
 *
 * Positions: a record's pos is the instruction count before its step, the
 * number `monitor when` shows while the store has not run yet.
 *
 * capstone is loaded at run time (rr_trace_load, with the path of the
 * library the capstone Python package ships) and its structs come from the
 * headers of the same package at build time; rr_trace_load refuses a
 * library of another API version.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
#include <capstone/capstone.h>

#include "rrnative.h"
#include "rrtrace.h"

static cs_err (*p_cs_open)(cs_arch, cs_mode, csh *);
static cs_err (*p_cs_option)(csh, cs_opt_type, size_t);
static cs_insn *(*p_cs_malloc)(csh);
static bool (*p_cs_disasm_iter)(csh, const uint8_t **, size_t *, uint64_t *, cs_insn *);
static unsigned (*p_cs_version)(int *, int *);
static csh cs64, cs32;
static cs_insn *insn64, *insn32;
static char load_error[256];

const char *rr_trace_error(void)
{
    return load_error;
}

int rr_trace_load(const char *library)
{
    if (p_cs_disasm_iter)
        return 0;
    void *h = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(load_error, sizeof load_error, "cannot load capstone's C library %s: %s", library, dlerror());
        return -1;
    }
    p_cs_open = dlsym(h, "cs_open");
    p_cs_option = dlsym(h, "cs_option");
    p_cs_malloc = dlsym(h, "cs_malloc");
    p_cs_version = dlsym(h, "cs_version");
    void *iter = dlsym(h, "cs_disasm_iter");
    if (!p_cs_open || !p_cs_option || !p_cs_malloc || !p_cs_version || !iter) {
        snprintf(load_error, sizeof load_error, "%s lacks capstone's functions (cs_disasm_iter, ...)", library);
        return -1;
    }
    int major = 0, minor = 0;
    p_cs_version(&major, &minor);
    if (major != CS_API_MAJOR || minor != CS_API_MINOR) {
        snprintf(load_error, sizeof load_error,
                 "%s is capstone %d.%d; rrstub was built with capstone %d.%d headers: reinstall rrstub "
                 "(make setup) after changing capstone", library, major, minor, CS_API_MAJOR, CS_API_MINOR);
        return -1;
    }
    if (p_cs_open(CS_ARCH_X86, CS_MODE_64, &cs64) != CS_ERR_OK ||
        p_cs_open(CS_ARCH_X86, CS_MODE_32, &cs32) != CS_ERR_OK) {
        snprintf(load_error, sizeof load_error, "capstone (%s) has no x86 decoder", library);
        return -1;
    }
    p_cs_option(cs64, CS_OPT_DETAIL, CS_OPT_ON);
    p_cs_option(cs32, CS_OPT_DETAIL, CS_OPT_ON);
    insn64 = p_cs_malloc(cs64);
    insn32 = p_cs_malloc(cs32);
    p_cs_disasm_iter = iter;
    return 0;
}

/* ------------------------------------------------------------------------ */

#define PRE_BYTES 64u            /* below the stack pointer: where a frame on the same stack goes */
#define MAX_STORE 4096u          /* one record's bytes at most (a larger store is split) */
#define STEP_RECORDS 16u         /* records one step can add */
#define STEP_BYTES (2 * MAX_STORE + 2 * PRE_BYTES)

/* Buffers nearly full: the caller drains them before the next step. */
int rr_trace_room_low(const struct rr_trace *t)
{
    return t->nwrites + t->pending + STEP_RECORDS > t->max_writes ||
           t->nold + t->pending_old + STEP_BYTES > t->max_bytes ||
           t->nnew + STEP_BYTES > t->max_bytes ||
           t->nevents + 1 > t->max_events ||
           t->ncalls + 1 > t->max_calls ||
           t->hist_used * 4 >= t->hist_slots * 3;
}

/* The instruction at rip counts once per position (a step rr_step hands to
 * the engine and then resumes reaches this twice). */
void rr_trace_count(struct rr_trace *t, const struct rr_step_ctl *c)
{
    if (t->counted_at == c->icount + 1)
        return;
    t->counted_at = c->icount + 1;
    t->steps++;
    uint64_t key = c->rip + 1;
    uint32_t mask = t->hist_slots - 1;
    uint32_t i = (uint32_t)((c->rip * 0x9E3779B97F4A7C15ull) >> 40) & mask;
    while (t->hist_rip[i] && t->hist_rip[i] != key)
        i = (i + 1) & mask;
    if (!t->hist_rip[i]) {
        t->hist_rip[i] = key;
        t->hist_used++;
    }
    t->hist_count[i]++;
    uint32_t lo = 0, hi = t->nentries;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (t->entries[mid] == c->rip) {
            t->calls[t->ncalls].pos = c->icount;
            t->calls[t->ncalls].rip = c->rip;
            t->ncalls++;
            return;
        }
        if (t->entries[mid] < c->rip)
            lo = mid + 1;
        else
            hi = mid;
    }
}

/*
 * A store of n bytes at linear la, as records split at page boundaries.
 * pending: the old bytes are read now and the new ones when the step has
 * run (rr_trace_after); otherwise old (NULL: not known) and the new bytes
 * in memory now are final.  Bytes outside RAM (MMIO) are not stores to
 * memory and are left out.
 */
static void add_store(struct rr_trace *t, const struct rr_step_ctl *c, uint64_t pos, uint64_t rip,
                      uint64_t la, uint32_t n, int kind, uint32_t vector, int pending, const uint8_t *old)
{
    if (n > MAX_STORE)
        n = MAX_STORE;
    uint32_t done = 0;
    while (done < n) {
        uint64_t va = la + done, pa;
        uint32_t run = 4096 - (uint32_t)(va & 0xfff);
        if (run > n - done)
            run = n - done;
        if (rr_translate(c, va, &pa) != 0 || pa + run > c->mem_size) {
            done += run;
            continue;
        }
        struct rr_write *w = &t->writes[t->nwrites + t->pending];
        w->pos = pos;
        w->rip = rip;
        w->va = va;
        w->pa = pa;
        w->size = run;
        w->kind = (uint8_t)kind;
        w->vector = (uint16_t)vector;
        if (pending) {
            w->has_old = 1;
            memcpy(t->old_bytes + t->nold + t->pending_old, c->mem + pa, run);
            t->pending_old += run;
            t->pending++;
        } else {
            w->has_old = old != NULL;
            if (old) {
                memcpy(t->old_bytes + t->nold, old + done, run);
                t->nold += run;
            }
            memcpy(t->new_bytes + t->nnew, c->mem + pa, run);
            t->nnew += run;
            t->nwrites++;
        }
        done += run;
    }
}

/* A register's value for an address: 0 and *ok = 0 for one that is not a general register. */
static uint64_t reg_value(const struct kvm_regs *r, x86_reg id, uint64_t next_rip, int *ok)
{
    switch (id) {
    case X86_REG_RAX: return r->rax;
    case X86_REG_RBX: return r->rbx;
    case X86_REG_RCX: return r->rcx;
    case X86_REG_RDX: return r->rdx;
    case X86_REG_RSI: return r->rsi;
    case X86_REG_RDI: return r->rdi;
    case X86_REG_RSP: return r->rsp;
    case X86_REG_RBP: return r->rbp;
    case X86_REG_R8: return r->r8;
    case X86_REG_R9: return r->r9;
    case X86_REG_R10: return r->r10;
    case X86_REG_R11: return r->r11;
    case X86_REG_R12: return r->r12;
    case X86_REG_R13: return r->r13;
    case X86_REG_R14: return r->r14;
    case X86_REG_R15: return r->r15;
    case X86_REG_RIP: return next_rip;
    case X86_REG_EAX: return r->rax & 0xFFFFFFFFu;
    case X86_REG_EBX: return r->rbx & 0xFFFFFFFFu;
    case X86_REG_ECX: return r->rcx & 0xFFFFFFFFu;
    case X86_REG_EDX: return r->rdx & 0xFFFFFFFFu;
    case X86_REG_ESI: return r->rsi & 0xFFFFFFFFu;
    case X86_REG_EDI: return r->rdi & 0xFFFFFFFFu;
    case X86_REG_ESP: return r->rsp & 0xFFFFFFFFu;
    case X86_REG_EBP: return r->rbp & 0xFFFFFFFFu;
    case X86_REG_R8D: return r->r8 & 0xFFFFFFFFu;
    case X86_REG_R9D: return r->r9 & 0xFFFFFFFFu;
    case X86_REG_R10D: return r->r10 & 0xFFFFFFFFu;
    case X86_REG_R11D: return r->r11 & 0xFFFFFFFFu;
    case X86_REG_R12D: return r->r12 & 0xFFFFFFFFu;
    case X86_REG_R13D: return r->r13 & 0xFFFFFFFFu;
    case X86_REG_R14D: return r->r14 & 0xFFFFFFFFu;
    case X86_REG_R15D: return r->r15 & 0xFFFFFFFFu;
    case X86_REG_EIP: return next_rip & 0xFFFFFFFFu;
    default:
        *ok = 0;
        return 0;
    }
}

static int is_rep_string_store(const cs_x86 *x)
{
    uint8_t op = x->opcode[0];
    return (x->prefix[0] == X86_PREFIX_REP || x->prefix[0] == X86_PREFIX_REPNE) &&
           (op == 0xA4 || op == 0xA5 || op == 0xAA || op == 0xAB);
}

/*
 * Before the step (rr_step calls this right before KVM_RUN): the stores the
 * instruction at c->rip is about to make, and the stack below rsp.
 * delivering: the step delivers an interrupt; the instruction does not run.
 * fetched: the bytes rr_step already read into c->insn (0: it did not look).
 */
int rr_trace_before(int fd, struct rr_trace *t, struct rr_step_ctl *c, int delivering, int fetched)
{
    t->pending = t->pending_old = 0;
    t->rep = 0;
    t->reload_segments = 0;
    t->software_int = 0;
    t->step_pos = c->icount;
    t->step_rip = c->rip;
    t->step_insn_len = 0;
    if (ioctl(fd, KVM_GET_REGS, &t->before) < 0)
        return -errno;
    uint64_t rsp = t->before.rsp;
    t->pre_la = (c->long_mode ? rsp & ~15ull : rsp) - PRE_BYTES;
    t->pre_ok = rr_copy_linear(c, t->pre_la, PRE_BYTES, t->pre) == 0;
    if (delivering)
        return 0;
    if (fetched <= 0)
        fetched = rr_fetch(c);     /* up to 15 bytes, as far as the pages are mapped */
    csh h = c->long_mode ? cs64 : cs32;
    cs_insn *insn = c->long_mode ? insn64 : insn32;
    const uint8_t *p = c->insn;
    size_t size = fetched > 0 ? (size_t)fetched : 0;
    uint64_t address = t->before.rip;
    if (!size || !p_cs_disasm_iter(h, &p, &size, &address, insn)) {
        t->undecoded++;
        return 0;
    }
    t->step_insn_len = insn->size;
    const cs_x86 *x = &insn->detail->x86;
    uint64_t next_rip = t->before.rip + insn->size;
    uint64_t pos = c->icount, rip = c->rip;
    uint32_t word = c->long_mode ? 8 : 4;
    if (x->prefix[2] == 0x66)
        word = 2;
    switch (insn->id) {
    case X86_INS_PUSH:
    case X86_INS_PUSHFQ:
    case X86_INS_PUSHF:
    case X86_INS_PUSHFD:
    case X86_INS_CALL:
        add_store(t, c, pos, rip, rsp - word, word, RR_WRITE_INSN, 0, 1, NULL);
        break;
    case X86_INS_INT:           /* its frame is recorded after the step, like an interrupt's */
        t->software_int = (uint32_t)(x->operands[0].imm & 0xFF) + 1;
        return 0;
    case X86_INS_INT3:
        t->software_int = 3 + 1;
        return 0;
    case X86_INS_INT1:
        t->software_int = 1 + 1;
        return 0;
    case X86_INS_INTO:
        t->software_int = 4 + 1;
        return 0;
    case X86_INS_SWAPGS:
    case X86_INS_WRFSBASE:
    case X86_INS_WRGSBASE:
        t->reload_segments = 1;
        break;
    case X86_INS_ENTER:
    case X86_INS_PUSHAL:
    case X86_INS_PUSHAW:
    case X86_INS_LCALL:
        t->undecoded++;         /* stack stores not worked out here */
        break;
    default:
        break;
    }
    if (is_rep_string_store(x)) {
        /* Which iterations the step runs is known afterwards from rcx. */
        t->rep = 1;
        t->rep_elem = x->operands[0].size ? x->operands[0].size : 1;
        uint64_t mask = x->addr_size == 4 ? 0xFFFFFFFFull : x->addr_size == 2 ? 0xFFFFull : ~0ull;
        t->rep_rdi = t->before.rdi & mask;
        t->rep_rcx = t->before.rcx & mask;
        t->rep_old_ok = t->rep_elem <= 8 && rr_copy_linear(c, t->rep_rdi, t->rep_elem, t->rep_old) == 0;
        return 0;
    }
    for (uint8_t i = 0; i < x->op_count; i++) {
        const cs_x86_op *op = &x->operands[i];
        if (op->type == X86_OP_REG && (op->reg == X86_REG_FS || op->reg == X86_REG_GS) &&
            (op->access & CS_AC_WRITE))
            t->reload_segments = 1;
        if (op->type != X86_OP_MEM || !(op->access & CS_AC_WRITE))
            continue;
        int ok = 1;
        uint64_t ea = (uint64_t)op->mem.disp;
        if (op->mem.base != X86_REG_INVALID)
            ea += reg_value(&t->before, op->mem.base, next_rip, &ok);
        if (op->mem.index != X86_REG_INVALID)
            ea += reg_value(&t->before, op->mem.index, next_rip, &ok) * (uint64_t)op->mem.scale;
        if (!ok || op->size == 0) {
            t->undecoded++;
            continue;
        }
        if (x->addr_size == 4)
            ea &= 0xFFFFFFFFull;
        else if (x->addr_size == 2)
            ea &= 0xFFFFull;
        if (op->mem.segment == X86_REG_FS)
            ea += t->fs_base;
        else if (op->mem.segment == X86_REG_GS)
            ea += t->gs_base;
        add_store(t, c, pos, rip, ea, op->size, RR_WRITE_INSN, 0, 1, NULL);
    }
    return 0;
}

static int has_error_code(uint32_t vector)
{
    return vector == 8 || (vector >= 10 && vector <= 14) || vector == 17 || vector == 21 ||
           vector == 29 || vector == 30;
}

/* The frame the delivery of `vector` pushed, and the event. */
static int record_delivery(int fd, struct rr_trace *t, struct rr_step_ctl *c, uint32_t vector, uint32_t kind)
{
    struct kvm_regs after;
    if (ioctl(fd, KVM_GET_REGS, &after) < 0)
        return -errno;
    uint64_t top = c->long_mode ? t->before.rsp & ~15ull : t->before.rsp;
    uint32_t size;
    const uint8_t *old = NULL;
    if (after.rsp < top && top - after.rsp <= PRE_BYTES) {
        size = (uint32_t)(top - after.rsp);     /* the same stack */
        if (t->pre_ok)
            old = t->pre + (after.rsp - t->pre_la);
    } else {
        /* Another stack (a privilege change, an IST stack): its old bytes were not read. */
        size = (c->long_mode ? 40 : 12) + (kind == RR_EVENT_EXCEPTION && has_error_code(vector) ? (c->long_mode ? 8 : 4) : 0);
    }
    add_store(t, c, t->step_pos, t->step_rip, after.rsp, size, RR_WRITE_FRAME, vector, 0, old);
    struct rr_event *e = &t->events[t->nevents++];
    e->pos = t->step_pos;
    e->rip = t->step_rip;
    e->handler = c->rip;
    e->vector = vector;
    e->kind = kind;
    return 0;
}

static int reload_segment_bases(int fd, struct rr_trace *t)
{
    struct kvm_sregs s;
    if (ioctl(fd, KVM_GET_SREGS, &s) < 0)
        return -errno;
    t->fs_base = s.fs.base;
    t->gs_base = s.gs.base;
    return 0;
}

/* The pending stores are done: their new bytes. */
static void finish_pending(struct rr_trace *t, const struct rr_step_ctl *c)
{
    for (uint32_t i = 0; i < t->pending; i++) {
        struct rr_write *w = &t->writes[t->nwrites + i];
        memcpy(t->new_bytes + t->nnew, c->mem + w->pa, w->size);
        t->nnew += w->size;
    }
    t->nwrites += t->pending;
    t->nold += t->pending_old;
    t->pending = t->pending_old = 0;
}

/* A rep stos/movs step: the elements it stored, from how far rcx went down. */
static int finish_rep(int fd, struct rr_trace *t, const struct rr_step_ctl *c)
{
    struct kvm_regs after;
    if (ioctl(fd, KVM_GET_REGS, &after) < 0)
        return -errno;
    uint64_t done = t->rep_rcx - (after.rcx & (t->rep_rcx | 0xFFFFFFFFull));
    if (after.rcx > t->rep_rcx || done == 0)
        return 0;
    uint64_t n = done * t->rep_elem;
    uint64_t la = t->before.rflags & (1ull << 10) ? t->rep_rdi - (done - 1) * t->rep_elem : t->rep_rdi;
    while (n) {
        uint32_t part = n > MAX_STORE ? MAX_STORE : (uint32_t)n;
        const uint8_t *old = done == 1 && t->rep_old_ok ? t->rep_old : NULL;
        add_store(t, c, t->step_pos, t->step_rip, la, part, RR_WRITE_INSN, 0, 0, old);
        la += part;
        n -= part;
    }
    return 0;
}

/*
 * After a step that ended in a debug exit (c->rip is where it landed).
 * delivered: the vector + 1 the step delivered (an injected interrupt), 0 none;
 * fault: the vector + 1 of the exception whose handler it landed at, 0 none.
 */
int rr_trace_after(int fd, struct rr_trace *t, struct rr_step_ctl *c, uint32_t delivered, uint32_t fault,
                   uint64_t software_landing)
{
    int r = 0;
    if (delivered) {
        t->pending = t->pending_old = 0;
        r = record_delivery(fd, t, c, delivered - 1, RR_EVENT_INTERRUPT);
    } else if (fault) {
        t->pending = t->pending_old = 0;     /* the instruction did not complete */
        t->rep = 0;
        r = record_delivery(fd, t, c, fault - 1, RR_EVENT_EXCEPTION);
    } else if (t->software_int && software_landing && c->rip == software_landing) {
        r = record_delivery(fd, t, c, t->software_int - 1, RR_EVENT_SOFTWARE);
    } else {
        finish_pending(t, c);
        if (t->rep)
            r = finish_rep(fd, t, c);
    }
    t->rep = 0;
    t->software_int = 0;
    if (r == 0 && t->reload_segments) {
        t->reload_segments = 0;
        r = reload_segment_bases(fd, t);
    }
    return r;
}

/* An instruction whose exit userspace handled has been completed (complete_instruction). */
int rr_trace_completed(int fd, struct rr_trace *t, struct rr_step_ctl *c)
{
    return rr_trace_after(fd, t, c, 0, 0, 0);
}

/* The step in flight will be looked at again before it runs (a kick stopped KVM_RUN first). */
void rr_trace_cancel(struct rr_trace *t)
{
    t->pending = t->pending_old = 0;
    t->rep = 0;
    t->software_int = 0;
}

/* The step was not run by KVM (the engine ran or emulated it): its decoded stores are dropped. */
void rr_trace_drop(struct rr_trace *t)
{
    if (t->pending || t->rep)
        t->dropped++;
    rr_trace_cancel(t);
}
