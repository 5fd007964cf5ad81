/*
 * race: a data race that only host timing can decide.
 *
 * WORKERS kernel threads, each on its own stack, are preempted round-robin
 * by the PIT at 1 kHz.  Each calls increment() `increments` times on the
 * shared `counter` without a lock (INCREMENTS unless the command line says
 * "increments=N": smaller runs for the slow, exact recorder).  increment() loads the counter, works
 * for a while on its private copy, then stores copy + 1; a tick landing
 * inside that window lets the other threads run on, and their updates are
 * overwritten when this thread resumes and stores its stale value.  Where
 * the ticks land depends on the host, so live runs disagree on the final
 * count, and a faithful replay must reproduce one run's count exactly.
 *
 * Prints "race: counter=N expected=M lost=K"; exits 0 if nothing was lost
 * (which would be a surprise), 1 otherwise.
 *
 * The debugger's tests rely on these names: `counter` (watchpoints),
 * `increment` and `worker` (breakpoints).
 *
 * Built with -DRACE_VASSERT (build/race-vassert.elf), increment() checks
 * every store with a VAssert (include/rrstub_vassert.h): free while
 * recording, evaluated by `rrstub replay --vassert`, which then reports
 * exactly the stores that lost updates.
 */
#include "kernel.h"
#ifdef RACE_VASSERT
#include "rrstub_vassert.h"
#endif

#define WORKERS       3
#define INCREMENTS    10000     /* per worker; ~32 instructions each: ~0.75 s in all */
#define MAX_INCREMENTS 100000000 /* WORKERS * this still fits an int */
#define WINDOW_SPINS  8         /* the work between load and store */
#define TICK_HZ       1000
#define STACK_BYTES   8192

#define MAIN_THREAD   0         /* kmain; workers are threads 1..WORKERS */
#define THREADS       (1 + WORKERS)

volatile int counter;
static unsigned increments = INCREMENTS;

struct thread {
    struct trap_frame *frame;   /* where it was preempted; resumed by iretq */
    volatile int finished;
};

static struct thread threads[THREADS];
static unsigned current = MAIN_THREAD;
static uint8_t stacks[WORKERS][STACK_BYTES] __attribute__((aligned(16)));

/*
 * The racy read-modify-write.  noinline so it has a symbol and a stable
 * shape; the counter is volatile so the compiler keeps the load and the
 * store apart instead of fusing them into one `add` to memory.
 */
__attribute__((noinline)) void increment(void)
{
    int seen = counter;
    for (unsigned i = 0; i < WINDOW_SPINS; i++)
        __asm__ volatile("nop");    /* stands in for work on the copy */
#ifdef RACE_VASSERT
    /* The store as an exchange that returns what it overwrote: if that is
     * not what we loaded, other threads' updates are being overwritten
     * (old - seen of them; summed over the failures, that is `lost`). */
    int old = __atomic_exchange_n(&counter, seen + 1, __ATOMIC_RELAXED);
    VASSERT_EQ(old, seen);
#else
    counter = seen + 1;
#endif
}

void worker(uint64_t id)
{
    for (unsigned i = 0; i < increments; i++)
        increment();
    threads[id].finished = 1;
    /* The scheduler never resumes a finished thread; idle until the next
     * tick takes the CPU away for good. */
    for (;;)
        __asm__ volatile("hlt");
}

static int workers_finished(void)
{
    for (unsigned t = 1; t < THREADS; t++) {
        if (!threads[t].finished)
            return 0;
    }
    return 1;
}

/* kmain only waits, so it gets the CPU back only when the workers are done. */
static int runnable(unsigned t)
{
    return t == MAIN_THREAD ? workers_finished() : !threads[t].finished;
}

/* The IRQ 0 handler: round-robin to the next runnable thread. */
static struct trap_frame *preempt(struct trap_frame *frame)
{
    threads[current].frame = frame;
    for (unsigned k = 1; k <= THREADS; k++) {
        unsigned t = (current + k) % THREADS;
        if (runnable(t)) {
            current = t;
            break;
        }
    }
    return threads[current].frame;
}

/*
 * Builds the frame a new thread is first "resumed" from: iretq enters
 * worker(id) with interrupts on, on a stack laid out as if worker had
 * been called (RSP = 8 mod 16) by a caller at address 0, which tells an
 * unwinder the thread's stack ends there.
 */
static void thread_create(unsigned t, void (*entry)(uint64_t))
{
    uint64_t *top = (uint64_t *)(stacks[t - 1] + STACK_BYTES);
    *--top = 0;
    struct trap_frame *frame = (struct trap_frame *)top - 1;
    *frame = (struct trap_frame){
        .rdi = t,
        .rip = (uint64_t)entry,
        .cs = KERNEL_CS,
        .rflags = RFLAGS_FIXED | RFLAGS_IF,
        .rsp = (uint64_t)top,
        .ss = KERNEL_SS,
    };
    threads[t].frame = frame;
}

int kmain(const struct rrstub_boot_info *boot)
{
    uart_init(0);
    increments = cmdline_uint(boot, "increments", INCREMENTS, MAX_INCREMENTS);
    trap_init();
    for (unsigned t = 1; t < THREADS; t++)
        thread_create(t, worker);
    irq_attach(RRSTUB_IRQ_PIT, preempt);
    pit_start_periodic(TICK_HZ);

    /* The first tick takes the CPU from here; it comes back only once
     * every worker has finished. */
    for (;;) {
        irq_disable();
        if (workers_finished())
            break;
        irq_wait();
    }

    int expected = WORKERS * (int)increments;
    int lost = expected - counter;
    kprintf("race: counter=%d expected=%d lost=%d\n", counter, expected, lost);
    return lost == 0 ? EXIT_OK : EXIT_FAILED;
}
