/*
 * The 8254 PIT's channel 0, whose output drives IRQ 0.  Mode 2 (rate
 * generator) pulses once every `divisor` input clocks, which the PIC sees
 * as one rising edge per period: a steady tick.
 */
#include "kernel.h"

#define PIT_CHANNEL0  (RRSTUB_PIT + 0)
#define PIT_COMMAND   (RRSTUB_PIT + 3)
/* Channel 0, access low byte then high byte, mode 2, binary counting. */
#define PIT_CH0_LOHI_RATE 0x34

void pit_start_periodic(unsigned hz)
{
    /* Rounded to the nearest divisor; hz must lie in 19..RRSTUB_PIT_HZ/2 for
     * the divisor to fit 16 bits and be at least 2, as mode 2 requires. */
    uint16_t divisor = (RRSTUB_PIT_HZ + hz / 2) / hz;
    outb(PIT_COMMAND, PIT_CH0_LOHI_RATE);
    outb(PIT_CHANNEL0, divisor & 0xFF);
    outb(PIT_CHANNEL0, divisor >> 8);
}
