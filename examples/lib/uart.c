/*
 * COM1, a 16550A: 115200 8N1 with FIFOs on, transmission polled.  THR
 * writes leave the machine at once, so waiting for THRE costs one status
 * read per byte and never spins.  Receiving is the kernel's business
 * (echo.c drains the RX FIFO from its IRQ handler); uart_init() only
 * switches the interrupt on.
 */
#include "kernel.h"

#define COM1(reg) (RRSTUB_COM1 + (reg))

#define LCR_DLAB        0x80    /* registers 0-1 become the baud divisor */
#define LCR_8N1         0x03
#define BAUD_115200     1       /* divisor of the 1.8432 MHz / 16 clock */
/* FIFOs on, RX trigger level 1 byte: the interrupt comes with the first
 * byte, so no byte waits on the character-timeout interrupt.  Turning the
 * FIFOs on empties them, as on a real 16550, which is why RTS is raised
 * only afterwards: the VMM sends host input only while the guest asserts
 * RTS (RS-232 hardware flow control), so nothing arrives before this. */
#define FCR_ON_TRIGGER_1 0x01
#define MCR_DTR         0x01
#define MCR_RTS         0x02
#define MCR_OUT2        0x08    /* on PCs, gates the UART's INTR onto IRQ 4 */

void uart_init(int rx_irq)
{
    outb(COM1(UART_IER), 0);
    outb(COM1(UART_LCR), LCR_DLAB);
    outb(COM1(0), BAUD_115200 & 0xFF);
    outb(COM1(1), BAUD_115200 >> 8);
    outb(COM1(UART_LCR), LCR_8N1);
    outb(COM1(UART_FCR), FCR_ON_TRIGGER_1);
    if (rx_irq) {
        outb(COM1(UART_MCR), MCR_DTR | MCR_RTS | MCR_OUT2);
        /* Bytes already waiting raise the interrupt as soon as it is
         * enabled, so nothing queued before this point is missed. */
        outb(COM1(UART_IER), UART_IER_RDA);
    } else {
        outb(COM1(UART_MCR), MCR_DTR | MCR_RTS);
    }
}

void uart_putc(char c)
{
    while (!(inb(COM1(UART_LSR)) & UART_LSR_THRE))
        ;
    outb(COM1(UART_THR), (uint8_t)c);
}

void uart_write(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        uart_putc(s[i]);
}
