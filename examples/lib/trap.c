/*
 * The IDT and the C side of every trap: exceptions are reported over the
 * UART and stop the machine with EXIT_TRAP; IRQs go to the handler a
 * kernel attached with irq_attach(), after weeding out the 8259A's
 * spurious IRQ 7 and 15, and are acknowledged to the PIC afterwards.
 *
 * All gates are interrupt gates, so handlers run with interrupts disabled
 * and never nest: a handler's state needs no locking against another.
 */
#include "kernel.h"

#define IDT_VECTORS      (VECTOR_IRQ_BASE + IRQ_LINES)
#define VECTOR_PAGE_FAULT 14

_Static_assert(sizeof(struct idt_gate) == 16, "long-mode IDT gates are 16 bytes");
_Static_assert(sizeof(struct trap_frame) == 22 * 8, "trap_stubs.S pushes 22 quadwords");

extern const uint64_t trap_stub_table[IDT_VECTORS];   /* trap_stubs.S */

struct trap_frame *trap_dispatch(struct trap_frame *frame);

static struct idt_gate idt[IDT_VECTORS];
static irq_handler *irq_handlers[IRQ_LINES];

static const char *const exception_names[VECTOR_IRQ_BASE] = {
    "#DE divide error", "#DB debug", "NMI", "#BP breakpoint",
    "#OF overflow", "#BR bound range", "#UD invalid opcode", "#NM no FPU",
    "#DF double fault", "coprocessor overrun", "#TS invalid TSS",
    "#NP segment not present", "#SS stack fault", "#GP general protection",
    "#PF page fault", "reserved", "#MF x87 error", "#AC alignment check",
    "#MC machine check", "#XM SIMD error", "#VE virtualization",
    "#CP control protection", "reserved", "reserved", "reserved", "reserved",
    "reserved", "reserved", "#HV hypervisor injection", "#VC VMM communication",
    "#SX security", "reserved",
};

void trap_init(void)
{
    for (unsigned v = 0; v < IDT_VECTORS; v++) {
        idt[v] = idt_interrupt_gate(trap_stub_table[v]);
    }
    /* Vectors past the limit (none should arrive) raise #GP, which is
     * reported like any other exception. */
    idt_load(idt, IDT_VECTORS);
    pic_init();
}

void irq_attach(unsigned irq, irq_handler *handler)
{
    irq_handlers[irq] = handler;
    pic_unmask(irq);
}

static __attribute__((noreturn)) void report_exception(const struct trap_frame *frame)
{
    kprintf("exception %lu (%s) error=%#lx rip=%#lx", frame->vector,
            exception_names[frame->vector], frame->error_code, frame->rip);
    if (frame->vector == VECTOR_PAGE_FAULT) {
        uint64_t cr2;
        __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
        kprintf(" cr2=%#lx", cr2);
    }
    kprintf("\n");
    rrstub_exit(EXIT_TRAP);
}

/*
 * An 8259A that sees a request vanish before the CPU acknowledges it still
 * delivers a vector: its lowest-priority one, IRQ 7 (or IRQ 15 from the
 * slave), without setting the in-service bit.  Such an IRQ must not be
 * acknowledged, except that a spurious slave IRQ was a real IRQ 2 to the
 * master, which does need its EOI.
 */
static int irq_is_spurious(unsigned irq)
{
    if (irq == 7 && !(pic_in_service(RRSTUB_PIC_MASTER) & 0x80))
        return 1;
    if (irq == 15 && !(pic_in_service(RRSTUB_PIC_SLAVE) & 0x80)) {
        pic_eoi(2);
        return 1;
    }
    return 0;
}

struct trap_frame *trap_dispatch(struct trap_frame *frame)
{
    if (frame->vector < VECTOR_IRQ_BASE)
        report_exception(frame);

    unsigned irq = frame->vector - VECTOR_IRQ_BASE;
    if (irq_is_spurious(irq))
        return frame;
    if (!irq_handlers[irq]) {
        /* Only attached lines are unmasked, so this is a machine bug. */
        kprintf("unexpected irq %u rip=%#lx\n", irq, frame->rip);
        rrstub_exit(EXIT_TRAP);
    }
    /* Interrupts stay disabled until iretq, so acknowledging after the
     * handler cannot let the same line in while it runs. */
    struct trap_frame *resume = irq_handlers[irq](frame);
    pic_eoi(irq);
    return resume;
}
