/*
 * hello: the smallest example kernel.  Prints a banner over COM1 and exits
 * with status 0 through the debug-exit port (lib/entry.S writes kmain's
 * return value there).  No interrupts, no IDT: just port I/O.
 */
#include "kernel.h"

int kmain(const struct rrstub_boot_info *boot)
{
    (void)boot;
    uart_init(0);
    kprintf("Hello from rrstub guest kernel!\n");
    return EXIT_OK;
}
