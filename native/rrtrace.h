/* rrtrace.c's entry points for rr_step (not part of the cffi API but for the two below). */
#ifndef RRTRACE_H
#define RRTRACE_H
#include "rrnative.h"

int rr_translate(const struct rr_step_ctl *c, uint64_t la, uint64_t *pa);
int rr_copy_linear(const struct rr_step_ctl *c, uint64_t la, uint32_t n, uint8_t *out);
int rr_fetch(struct rr_step_ctl *c);
int rr_trace_room_low(const struct rr_trace *t);
void rr_trace_count(struct rr_trace *t, const struct rr_step_ctl *c);
int rr_trace_before(int fd, struct rr_trace *t, struct rr_step_ctl *c, int delivering, int fetched);
int rr_trace_after(int fd, struct rr_trace *t, struct rr_step_ctl *c, uint32_t delivered, uint32_t fault,
                   uint64_t software_landing);
int rr_trace_completed(int fd, struct rr_trace *t, struct rr_step_ctl *c);
void rr_trace_drop(struct rr_trace *t);
void rr_trace_cancel(struct rr_trace *t);
#endif
