/*
 * Interrupt entry stubs: one per vector for exceptions 0-31 and the PIC's
 * IRQ vectors 0x20-0x2F, all funnelling into trap_common, which builds a
 * struct trap_frame (lib/kernel.h) and calls trap_dispatch() in trap.c.
 *
 * The stack every stub leaves for trap_common is the same shape whatever
 * the vector: the CPU pushes an error code for some exceptions only, so
 * the others push a zero in its place.  trap_dispatch() returns the frame
 * to resume, which is not necessarily the one it was given: that is how
 * race.c switches threads (each thread's frame lives on its own stack).
 *
 * The CFI below describes the CPU's frame as a signal frame, so a debugger
 * stopped inside a handler can unwind into the interrupted code.
 */
    .cfi_sections .debug_frame

/* The exceptions for which the CPU pushes an error code: #DF, #TS, #NP,
 * #SS, #GP, #PF, #AC, #CP, #VC, #SX. */
#define HAS_ERROR_CODE(v) ((v) == 8 || ((v) >= 10 && (v) <= 14) || (v) == 17 \
                           || (v) == 21 || (v) == 29 || (v) == 30)

#define VECTORS 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23, \
                24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,   \
                44,45,46,47

    .text
    .irp vec, VECTORS
    .balign 16
trap_stub_\vec:
    .if HAS_ERROR_CODE(\vec)
    .else
    pushq $0                /* stands in for the error code */
    .endif
    pushq $\vec
    jmp trap_common
    .endr

.macro save reg
    pushq %\reg
    .cfi_adjust_cfa_offset 8
    .cfi_rel_offset \reg, 0
.endm

.macro restore reg
    popq %\reg
    .cfi_adjust_cfa_offset -8
    .cfi_restore \reg
.endm

/* Bytes from a struct trap_frame's start to the end of the CPU's frame. */
#define TRAP_FRAME_BYTES (22 * 8)

    .balign 16
    .type trap_common, @function
trap_common:
    /* Here: vector, error code, then RIP, CS, RFLAGS, RSP, SS. */
    .cfi_startproc simple
    .cfi_signal_frame
    .cfi_def_cfa rsp, 7 * 8
    .cfi_offset rip, -5 * 8
    .cfi_offset rsp, -2 * 8
    /* Pushed in the reverse of struct trap_frame's order. */
    save rax
    save rbx
    save rcx
    save rdx
    save rsi
    save rdi
    save rbp
    save r8
    save r9
    save r10
    save r11
    save r12
    save r13
    save r14
    save r15
    /* The interrupted code may have left the direction flag set; C code
     * is entitled to find it clear. */
    cld
    mov %rsp, %rdi
    /* RBX is saved above and callee-saved below: it keeps the frame's
     * address for the unwinder while RSP is realigned. */
    mov %rsp, %rbx
    .cfi_def_cfa_register rbx
    /* In long mode the CPU aligns RSP to 16 before pushing its frame, and
     * the frame is 176 bytes, so this is a no-op today; it keeps the ABI's
     * alignment at the call whatever the frame's size becomes. */
    and $-16, %rsp
    call trap_dispatch
    /* Resume the frame trap_dispatch chose, maybe another thread's. */
    mov %rax, %rsp
    .cfi_def_cfa rsp, TRAP_FRAME_BYTES
    restore r15
    restore r14
    restore r13
    restore r12
    restore r11
    restore r10
    restore r9
    restore r8
    restore rbp
    restore rdi
    restore rsi
    restore rdx
    restore rcx
    restore rbx
    restore rax
    add $16, %rsp           /* drop the vector and error code */
    .cfi_adjust_cfa_offset -16
    iretq
    .cfi_endproc
    .size trap_common, . - trap_common

/* Entry addresses by vector, for trap_init() to build the IDT from. */
    .section .rodata
    .balign 8
    .global trap_stub_table
trap_stub_table:
    .irp vec, VECTORS
    .quad trap_stub_\vec
    .endr
    .size trap_stub_table, . - trap_stub_table

    .section .note.GNU-stack, "", @progbits
