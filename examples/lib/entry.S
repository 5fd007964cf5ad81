/*
 * Boot entry for every example kernel.
 *
 * The VMM enters here in long mode at CPL0 with interrupts off, RDI = the
 * boot info's physical address and RSP on the VMM's boot stack below
 * 1 MiB.  We move to a stack inside the kernel image, whose size we choose
 * and which a debugger can find by symbol, call kmain(boot_info) (RDI is
 * already its argument), and hand its return value to the debug-exit
 * port.  No .bss clearing: the loader zeroes memsz beyond filesz.
 */
    .cfi_sections .debug_frame

#include "rrstub_machine.h"

#define BOOT_STACK_BYTES 16384

    .section .text.entry, "ax"
    .global _start
    .type _start, @function
_start:
    /* The boot contract's RSP is where a return address would sit; there is
     * nothing to return to, so tell unwinders this is the outermost frame. */
    .cfi_startproc
    .cfi_undefined rip
    lea boot_stack_top(%rip), %rsp
    xor %ebp, %ebp
    /* RSP is 16-byte aligned here, so after the call pushes the return
     * address kmain sees the alignment the SysV ABI promises. */
    call kmain
    outb %al, $RRSTUB_DEBUG_EXIT
1:  cli
    hlt
    jmp 1b
    .cfi_endproc
    .size _start, . - _start

    .section .bss
    .balign 16
boot_stack:
    .skip BOOT_STACK_BYTES
boot_stack_top:

    .section .note.GNU-stack, "", @progbits
