/*
 * echo: interrupt-driven serial input.
 *
 * The COM1 RX interrupt (IRQ 4) drains the UART's FIFO into `rx_ring`;
 * kmain sleeps with hlt while the ring is empty, assembles lines and
 * writes each back upper-cased, followed by "\n".  A line that is exactly
 * "quit" ends the run: "bye\n", exit status 0.
 *
 * No byte may be lost or reordered, whatever the line length or the input
 * rate.  Lines are echoed whole up to LINE_BYTES; a longer line is written
 * in LINE_BYTES pieces as it arrives, with the newline only at its real
 * end, so the output is still exactly the upper-cased input.  When the ring
 * is full the handler stops reading and switches the RX interrupt off,
 * leaving the rest in the UART (and the VMM's input queue) until kmain has
 * made room; switching the interrupt back on with bytes waiting raises it
 * again.
 *
 * Bytes other than '\n' pass through unchanged apart from a-z, so "\r\n"
 * input comes back as "\r\n".
 */
#include "kernel.h"

#define RX_RING_BYTES 1024          /* a power of two: indices wrap freely */
#define RX_RESUME_AT  (RX_RING_BYTES / 2)
#define LINE_BYTES    4096

/* Written by the IRQ handler (head) and kmain (tail), each read by both;
 * kmain touches them only with interrupts disabled. */
static volatile uint8_t rx_ring[RX_RING_BYTES];
static volatile uint32_t rx_head, rx_tail;
static volatile int rx_paused;

static char line[LINE_BYTES];

static uint32_t rx_used(void)
{
    return rx_head - rx_tail;
}

/* IRQ 4: take every byte the UART holds, or as many as fit. */
static struct trap_frame *uart_rx(struct trap_frame *frame)
{
    for (;;) {
        if (rx_used() == RX_RING_BYTES) {
            /* The UART's interrupt line drops with IER cleared and rises
             * again when rx_getc() sets it: a fresh edge for the PIC. */
            outb(RRSTUB_COM1 + UART_IER, 0);
            rx_paused = 1;
            break;
        }
        if (!(inb(RRSTUB_COM1 + UART_LSR) & UART_LSR_DR))
            break;
        rx_ring[rx_head % RX_RING_BYTES] = inb(RRSTUB_COM1 + UART_RBR);
        rx_head++;
    }
    return frame;
}

static char rx_getc(void)
{
    irq_disable();
    while (rx_used() == 0) {
        irq_wait();
        irq_disable();
    }
    char c = (char)rx_ring[rx_tail % RX_RING_BYTES];
    rx_tail++;
    if (rx_paused && rx_used() <= RX_RESUME_AT) {
        rx_paused = 0;
        outb(RRSTUB_COM1 + UART_IER, UART_IER_RDA);
    }
    irq_enable();
    return c;
}

static void write_upper(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        uart_putc(c >= 'a' && c <= 'z' ? c - 'a' + 'A' : c);
    }
}

int kmain(const struct rrstub_boot_info *boot)
{
    (void)boot;
    trap_init();
    irq_attach(RRSTUB_IRQ_COM1, uart_rx);
    uart_init(1);
    irq_enable();

    size_t len = 0;
    int continued = 0;      /* part of this line was already written */
    for (;;) {
        char c = rx_getc();
        if (c == '\n') {
            if (!continued && len == 4 && memcmp(line, "quit", 4) == 0) {
                uart_write("bye\n", 4);
                return EXIT_OK;
            }
            write_upper(line, len);
            uart_putc('\n');
            len = 0;
            continued = 0;
            continue;
        }
        if (len == LINE_BYTES) {
            write_upper(line, len);
            len = 0;
            continued = 1;
        }
        line[len++] = c;
    }
}
