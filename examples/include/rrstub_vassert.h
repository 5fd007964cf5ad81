/*
 * VAssert: assertions that are checked only while a recording is replayed.
 *
 *     #include "rrstub_vassert.h"
 *     VASSERT(list_is_sorted(&runq));
 *     VASSERT_EQ(old, seen);        // also reports both values when it fails
 *
 * While a kernel runs live, is recorded, or is replayed plainly, a VASSERT
 * costs one hypercall exit (RRSTUB_HC_VASSERT answers 0: skip) and nothing
 * else: the condition is not evaluated, so an expensive check does not
 * slow the recording down or change its timing.  During
 * `rrstub replay REC --vassert`, rrstub answers RRSTUB_HC_VASSERT_CHECK
 * instead, the guest evaluates the condition and reports the result with
 * RRSTUB_HC_VASSERT_DONE, and rrstub then puts the machine back exactly as
 * it was before the check (registers, devices, the stack pages) and
 * continues the replay as if the check had never run, so the rest of the
 * replay still matches the recording.  The report lists each check's
 * position, site and result.
 *
 * The contract for the condition:
 *   - No side effects.  It may read any memory and use the stack: rrstub
 *     saves the pages from RSP - 16 KiB to RSP + 8 KiB and puts them back
 *     afterwards.  A condition that writes any other page cannot be undone:
 *     rrstub stops the replay with an error naming the site and the page.
 *   - No I/O, no hlt, no hypercalls other than the VASSERT's own, no
 *     exceptions, no writes to control registers or MSRs, and finish within
 *     250 ms of host time (in an exact recording the condition is
 *     single-stepped like the rest of the replay: some 35k instructions):
 *     such a check is reported as "not evaluated" with the reason (a failure
 *     in the report), and the machine is restored.
 *   - Interrupts are not delivered while it runs (the condition runs with
 *     whatever IF the code around it has, but rrstub injects nothing).
 *
 * ABI (vmm/devices/hypercall.py): RRSTUB_HC_VASSERT with RBX = &site;
 * RRSTUB_HC_VASSERT_DONE with RBX = &site, RCX = 1 if the condition held,
 * RSI and RDI = the two values of a VASSERT_EQ (ignored otherwise).
 */
#ifndef RRSTUB_VASSERT_H
#define RRSTUB_VASSERT_H

#include "rrstub_machine.h"

#ifndef __ASSEMBLER__
/*
 * One per VASSERT, static const, read by the VMM from guest virtual memory
 * (current CR3) at the site's address.  Layout (x86-64, little-endian,
 * 32 bytes):
 *   offset  0  file   NUL-terminated source file name (__FILE__)
 *   offset  8  expr   NUL-terminated text of the condition
 *   offset 16  func   NUL-terminated function name (__func__)
 *   offset 24  line   source line (__LINE__)
 *   offset 28  flags  RRSTUB_VASSERT_EQ: RSI/RDI of the DONE call are the
 *                     two compared values, as signed 64-bit integers
 */
struct rrstub_vassert_site {
    const char *file;
    const char *expr;
    const char *func;
    uint32_t line;
    uint32_t flags;
};

#define RRSTUB_VASSERT_EQ 1u

_Static_assert(sizeof(struct rrstub_vassert_site) == 32, "the VMM reads 32 bytes");

#define RRSTUB_VASSERT_(cond_, a_, b_, text_, flags_)                                          \
    do {                                                                                        \
        static const struct rrstub_vassert_site rrstub_vassert_site_ = {                       \
            __FILE__, text_, __func__, __LINE__, flags_ };                                      \
        if (rrstub_hypercall(RRSTUB_HC_VASSERT, (uint64_t)&rrstub_vassert_site_, 0, 0, 0)        \
                == RRSTUB_HC_VASSERT_CHECK)                                                     \
            rrstub_hypercall(RRSTUB_HC_VASSERT_DONE, (uint64_t)&rrstub_vassert_site_,           \
                             (cond_) ? 1 : 0, (uint64_t)(a_), (uint64_t)(b_));                  \
    } while (0)

/* Checked only during `rrstub replay --vassert`; see the contract above. */
#define VASSERT(cond) RRSTUB_VASSERT_((cond), 0, 0, #cond, 0)

/* VASSERT((a) == (b)) that also reports a and b (as signed 64-bit integers). */
#define VASSERT_EQ(a, b) RRSTUB_VASSERT_((int64_t)(a) == (int64_t)(b), (int64_t)(a), (int64_t)(b), \
                                         #a " == " #b, RRSTUB_VASSERT_EQ)
#endif

#endif
