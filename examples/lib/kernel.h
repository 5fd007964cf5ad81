/*
 * The example kernels' small library: boot entry, traps and IRQs, the
 * 8259A PIC pair, the 8254 PIT, the COM1 UART and kprintf.
 *
 * Every kernel defines kmain(); lib/entry.S calls it on a stack of its own
 * and writes its return value to the debug-exit port.  Nothing here
 * allocates: all state is static and sized at build time.
 */
#ifndef EXAMPLES_KERNEL_H
#define EXAMPLES_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#include "rrstub_machine.h"

/* Exit statuses every example agrees on (the debug-exit port's value). */
#define EXIT_OK        0
#define EXIT_FAILED    1    /* the kernel ran, but its check did not hold */
#define EXIT_TRAP      3    /* an unexpected exception or IRQ */

/* Vectors: 0-31 are CPU exceptions; the PIC pair is remapped above them. */
#define VECTOR_IRQ_BASE 0x20
#define IRQ_LINES       16

/* Called by lib/entry.S; the return value becomes the exit status. */
int kmain(const struct rrstub_boot_info *boot);

/* ---- traps ---- */

/*
 * The stack as lib/trap_stubs.S leaves it when it calls C: the registers it
 * pushed, then the vector and error code (0 where the CPU pushes none),
 * then the frame the CPU pushed for iretq.  A handler may return a
 * different frame to resume another thread (see race.c).
 */
struct trap_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error_code;
    uint64_t rip, cs, rflags, rsp, ss;
};

#define KERNEL_CS     0x08          /* the boot GDT's 64-bit code segment */
#define KERNEL_SS     0x10          /* the boot GDT's data segment */
#define RFLAGS_IF     0x200
#define RFLAGS_FIXED  0x2           /* bit 1 always reads as one */

typedef struct trap_frame *irq_handler(struct trap_frame *frame);

/* A long-mode IDT gate; idt_interrupt_gate() makes a DPL 0 interrupt gate
 * (interrupts disabled in the handler) to `entry` in the kernel's code. */
struct idt_gate {
    uint16_t offset_low;
    uint16_t selector;
    uint8_t ist;
    uint8_t type;
    uint16_t offset_mid;
    uint32_t offset_high;
    uint32_t reserved;
} __attribute__((packed));

static inline struct idt_gate idt_interrupt_gate(uint64_t entry)
{
    return (struct idt_gate){
        .offset_low = entry & 0xffff,
        .selector = KERNEL_CS,
        .type = 0x8E,                   /* present, DPL 0, 64-bit interrupt gate */
        .offset_mid = (entry >> 16) & 0xffff,
        .offset_high = entry >> 32,
    };
}

/* Makes `gates` (`count` of them) the IDT. */
static inline void idt_load(const struct idt_gate *gates, unsigned count)
{
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) idtr = { .limit = count * sizeof *gates - 1, .base = (uint64_t)gates };
    __asm__ volatile("lidt %0" :: "m"(idtr));
}

/* Loads the IDT (exceptions and the 16 PIC vectors) and initialises the PIC
 * with every line masked. */
void trap_init(void);
/* Routes IRQ `irq` to `handler` and unmasks the line.  The dispatcher sends
 * the EOI after the handler returns, so handlers must not. */
void irq_attach(unsigned irq, irq_handler *handler);

static inline void irq_enable(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void irq_disable(void) { __asm__ volatile("cli" ::: "memory"); }

/*
 * Sleeps until the next interrupt.  Call with interrupts disabled, after
 * checking there is nothing to do: sti only takes effect after the next
 * instruction, so no interrupt can slip in between the check and the hlt
 * and leave us asleep with work pending.  Returns with interrupts enabled.
 */
static inline void irq_wait(void) { __asm__ volatile("sti; hlt" ::: "memory"); }

/* ---- 8259A PIC pair ---- */
void pic_init(void);
void pic_unmask(unsigned irq);
void pic_eoi(unsigned irq);
uint8_t pic_in_service(unsigned pic_base);

/* ---- 8254 PIT ---- */
/* Starts channel 0 as a rate generator: IRQ 0 about `hz` times a second. */
void pit_start_periodic(unsigned hz);

/* ---- 16550A UART on COM1 ---- */
#define UART_RBR 0      /* receive buffer (read, DLAB=0) */
#define UART_THR 0      /* transmit holding (write, DLAB=0) */
#define UART_IER 1      /* interrupt enable (DLAB=0) */
#define UART_FCR 2      /* FIFO control (write) */
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5

#define UART_IER_RDA      0x01  /* received data available (and RX timeout) */
#define UART_LSR_DR       0x01  /* a byte is waiting in RBR / the RX FIFO */
#define UART_LSR_THRE     0x20  /* THR can take a byte */

/* Programs 115200 8N1 with FIFOs on (which empties the receiver: see
 * echo.c); `rx_irq` turns on the RX interrupt and OUT2, which gates the
 * UART's interrupt line onto IRQ 4. */
void uart_init(int rx_irq);
void uart_putc(char c);
void uart_write(const char *s, size_t n);

/* ---- formatting ---- */
/* %d %u %x %s %c %p %%, an `l` length modifier, the `#` flag (0x prefix),
 * `0` padding and a field width: what the examples need, nothing more. */
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- kernel command line ---- */
/* The value of the parameter "name=N" on the boot command line, a decimal
 * number from 0 to `max`; `fallback` when the line has no such parameter,
 * and also (after a message on the UART) when its value is not such a
 * number. */
unsigned cmdline_uint(const struct rrstub_boot_info *boot, const char *name,
                      unsigned fallback, unsigned max);

/* ---- what the compiler may call even with -ffreestanding ---- */
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);

#endif
