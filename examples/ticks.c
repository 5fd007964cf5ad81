/*
 * ticks: timer interrupts arriving in the middle of pure computation.
 *
 * The PIT ticks at 1 kHz and the IRQ 0 handler counts into `ticks`, while
 * busy_work() runs a loop that never leaves the guest on its own: no port
 * I/O, no hlt.  Only the timer takes the CPU away from it, so a recorder
 * must note the exact instruction each interrupt landed on for a replay to
 * deliver it there again.
 *
 * The loop runs WORK_ITERATIONS times, or N times with "work=N" on the
 * command line.  Prints "ticks: N work: 0x...": N varies with host timing,
 * the work result depends only on the iterations.  Exits 0 if at least one
 * tick arrived, 1 if none.
 *
 * With "tsc=1" every iteration also mixes in the time-stamp counter.  At
 * guest CPL0 rdtsc runs on the host CPU (no KVM traps it there), so only
 * the exact engine, which emulates it, can replay that run; a fast-mode
 * recording of it is the test for a replay that must report a divergence
 * instead of searching forever.
 *
 * With "idle=N" the work is followed by N rounds of: wait (reading the
 * PIT's channel 0, port I/O) until the next tick is less than
 * IDLE_LEAD_COUNTS away, then hlt (interrupts on).  A tick that kicks the
 * fast recorder out of the polling loop is moved to the loop's exit, which
 * is the hlt: the recording gets landmarks at the hlt itself, where the
 * interrupt is injected before the hlt runs, and a replay must deliver it
 * there, not halt first.
 */
#include "kernel.h"

#define TICK_HZ          1000
#define WORK_ITERATIONS  65000      /* 12 instructions each: ~0.5 s at 1.6 M/s */

volatile unsigned ticks;

static struct trap_frame *count_tick(struct trap_frame *frame)
{
    ticks++;
    return frame;
}

/* xorshift32: cheap, and nothing the compiler can fold into a constant. */
__attribute__((noinline)) uint32_t busy_work(unsigned iterations)
{
    uint32_t x = 0x2545F491;
    for (unsigned i = 0; i < iterations; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
    }
    return x;
}

__attribute__((noinline)) uint32_t busy_work_tsc(unsigned iterations)
{
    uint32_t x = 0x2545F491;
    for (unsigned i = 0; i < iterations; i++) {
        uint32_t lo, hi;
        __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x ^= lo;
    }
    return x;
}

#define IDLE_LEAD_COUNTS 60        /* PIT input clocks: about 50 us before the tick */

static unsigned pit_channel0_count(void)
{
    outb(RRSTUB_PIT + 3, 0x00);             /* latch channel 0 */
    unsigned low = inb(RRSTUB_PIT);
    return low | (unsigned)inb(RRSTUB_PIT) << 8;
}

__attribute__((noinline)) void poll_then_halt(unsigned rounds)
{
    for (unsigned r = 0; r < rounds; r++) {
        while (pit_channel0_count() > IDLE_LEAD_COUNTS)
            ;
        __asm__ volatile("hlt" : : : "memory");
    }
}

int kmain(const struct rrstub_boot_info *boot)
{
    uart_init(0);
    unsigned iterations = cmdline_uint(boot, "work", WORK_ITERATIONS, 0xFFFFFFFFu);
    trap_init();
    irq_attach(RRSTUB_IRQ_PIT, count_tick);
    pit_start_periodic(TICK_HZ);

    /* guest_record=1: only the middle third of the work is recorded, under
     * `rrstub run --allow-guest-record -o REC` (the guest starts and stops
     * the recording through the hypercall port, and names a marker). */
    unsigned guest_record = cmdline_uint(boot, "guest_record", 0, 1);
    unsigned tsc = cmdline_uint(boot, "tsc", 0, 1);
    unsigned idle = cmdline_uint(boot, "idle", 0, 100000);

    irq_enable();
    uint32_t result;
    if (guest_record) {
        result = busy_work(iterations / 3);
        uint64_t start = rrstub_hypercall(RRSTUB_HC_RECORD_START, 0, 0, 0, 0);
        rrstub_hypercall(RRSTUB_HC_MARKER, (uint64_t)"recorded-work", 0, 0, 0);
        result ^= busy_work(iterations / 3 + 1);   /* another argument: not folded into the first call */
        kprintf("ticks: recorded part ends at tick %u (start: %s)\n", ticks,
                start == 0 ? "recording" : "refused");
        rrstub_hypercall(RRSTUB_HC_RECORD_STOP, 0, 0, 0, 0);
        result ^= busy_work(iterations / 3 + 2);
    } else if (tsc) {
        result = busy_work_tsc(iterations);
    } else {
        result = busy_work(iterations);
    }
    poll_then_halt(idle);
    irq_disable();

    unsigned seen = ticks;
    kprintf("ticks: %u work: %#010x\n", seen, result);
    return seen > 0 ? EXIT_OK : EXIT_FAILED;
}
