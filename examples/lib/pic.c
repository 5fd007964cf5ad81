/*
 * The cascaded 8259A pair: master at 0x20 with the slave on its IRQ 2, both
 * remapped to vectors 0x20-0x2F so they do not collide with CPU exceptions
 * (the power-on mapping puts the master on vectors 8-15).  Lines stay
 * masked until a kernel attaches a handler, so an IRQ nobody expects
 * never arrives.
 */
#include "kernel.h"

#define PIC_COMMAND(pic) (pic)
#define PIC_DATA(pic)    ((pic) + 1)

#define ICW1_INIT        0x10   /* start initialisation */
#define ICW1_WANT_ICW4   0x01   /* edge-triggered, cascaded, ICW4 follows */
#define ICW3_SLAVE_ON_2  0x04   /* master: a slave hangs on IR2 */
#define ICW3_SLAVE_ID    0x02   /* slave: its cascade identity is 2 */
#define ICW4_8086        0x01   /* 8086 mode, normal (not automatic) EOI */
#define OCW2_EOI         0x20   /* non-specific end of interrupt */
#define OCW3_READ_ISR    0x0B   /* next read of the command port is the ISR */
#define CASCADE_IRQ      2

void pic_init(void)
{
    outb(PIC_COMMAND(RRSTUB_PIC_MASTER), ICW1_INIT | ICW1_WANT_ICW4);
    outb(PIC_COMMAND(RRSTUB_PIC_SLAVE), ICW1_INIT | ICW1_WANT_ICW4);
    outb(PIC_DATA(RRSTUB_PIC_MASTER), VECTOR_IRQ_BASE);          /* ICW2 */
    outb(PIC_DATA(RRSTUB_PIC_SLAVE), VECTOR_IRQ_BASE + 8);
    outb(PIC_DATA(RRSTUB_PIC_MASTER), ICW3_SLAVE_ON_2);
    outb(PIC_DATA(RRSTUB_PIC_SLAVE), ICW3_SLAVE_ID);
    outb(PIC_DATA(RRSTUB_PIC_MASTER), ICW4_8086);
    outb(PIC_DATA(RRSTUB_PIC_SLAVE), ICW4_8086);
    /* OCW1: the mask registers; a set bit masks the line. */
    outb(PIC_DATA(RRSTUB_PIC_MASTER), 0xFF);
    outb(PIC_DATA(RRSTUB_PIC_SLAVE), 0xFF);
}

void pic_unmask(unsigned irq)
{
    if (irq >= 8) {
        uint8_t mask = inb(PIC_DATA(RRSTUB_PIC_SLAVE));
        outb(PIC_DATA(RRSTUB_PIC_SLAVE), mask & ~(1u << (irq - 8)));
        irq = CASCADE_IRQ;  /* the slave's requests reach the CPU through it */
    }
    uint8_t mask = inb(PIC_DATA(RRSTUB_PIC_MASTER));
    outb(PIC_DATA(RRSTUB_PIC_MASTER), mask & ~(1u << irq));
}

void pic_eoi(unsigned irq)
{
    /* A slave IRQ is in service on both chips: its own line on the slave
     * and IR2 on the master.  Slave first, so the master only lets cascade
     * requests through again once the slave has retired this one. */
    if (irq >= 8)
        outb(PIC_COMMAND(RRSTUB_PIC_SLAVE), OCW2_EOI);
    outb(PIC_COMMAND(RRSTUB_PIC_MASTER), OCW2_EOI);
}

uint8_t pic_in_service(unsigned pic)
{
    outb(PIC_COMMAND(pic), OCW3_READ_ISR);
    return inb(PIC_COMMAND(pic));
}
