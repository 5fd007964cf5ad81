/*
 * The rrstub machine, as a guest kernel sees it.  One header for every
 * example kernel; the VMM side of each number lives in vmm/machine.py and
 * vmm/boot.py and must agree with this file.
 *
 * Boot contract (vmm/boot.py loads the kernel):
 *   - The kernel is an ELF64 x86-64 executable.  Each PT_LOAD segment is
 *     copied to its physical address (p_paddr) and must lie inside
 *     [RRSTUB_KERNEL_MIN_PADDR, guest RAM size); .bss (memsz > filesz) is
 *     zeroed.
 *   - The CPU enters at e_entry in 64-bit long mode, CPL0, interrupts
 *     disabled (RFLAGS = 0x2), no IDT loaded (IDTR limit 0).
 *   - Paging (4-level, 2 MiB pages, read/write/execute, supervisor):
 *       virtual 0 .. 4 GiB                         -> physical 0 .. 4 GiB
 *       virtual 0xffffffff80000000 .. +2 GiB       -> physical 0 .. 2 GiB
 *     so a kernel may be linked either identity-mapped at >= 1 MiB or in
 *     the top 2 GiB (p_vaddr = 0xffffffff80000000 + p_paddr).
 *   - GDT at RRSTUB_BOOT_GDT: 0x08 = 64-bit code, 0x10 = data; CS = 0x08,
 *     DS = ES = SS = FS = GS = 0x10.
 *   - CR0 = PE|MP|ET|NE|WP|PG, CR4 = PAE|OSFXSR|OSXMMEXCPT, EFER =
 *     SCE|LME|LMA|NXE.
 *   - RSP = RRSTUB_BOOT_STACK_TOP - 8 (as if the entry had been called; the
 *     entry must not return), RDI = physical address of struct
 *     rrstub_boot_info, all other general registers zero.
 *   - Physical memory below 1 MiB belongs to the boot structures (GDT, page
 *     tables, boot info, boot stack); memory from boot_info.free_start up to
 *     boot_info.mem_bytes is free for the kernel.
 */
#ifndef RRSTUB_MACHINE_H
#define RRSTUB_MACHINE_H

/* ---- boot ---- */
#define RRSTUB_BOOT_GDT          0x1000
#define RRSTUB_BOOT_INFO         0x7000
#define RRSTUB_BOOT_CMDLINE      0x7100   /* NUL-terminated, at most 3840 bytes */
#define RRSTUB_BOOT_PML4         0x9000
#define RRSTUB_BOOT_STACK_TOP    0x80000
#define RRSTUB_KERNEL_MIN_PADDR  0x100000
#define RRSTUB_BOOT_MAGIC        0x544f4f4254535252   /* "RRSTBOOT" */

#ifndef __ASSEMBLER__
#include <stdint.h>

struct rrstub_boot_info {
    uint64_t magic;        /* RRSTUB_BOOT_MAGIC */
    uint32_t version;      /* 1 */
    uint32_t size;         /* sizeof(struct rrstub_boot_info) */
    uint64_t mem_bytes;    /* guest RAM size */
    uint64_t kernel_start; /* lowest physical address of any PT_LOAD */
    uint64_t kernel_end;   /* first physical byte after every PT_LOAD */
    uint64_t free_start;   /* first free physical byte, 4 KiB aligned */
    uint64_t cmdline;      /* physical address of the command line */
};
#endif

/* ---- I/O ports and IRQ lines ---- */
#define RRSTUB_PIC_MASTER   0x20    /* 8259A, ports 0x20-0x21 */
#define RRSTUB_PIC_SLAVE    0xA0    /* 8259A, ports 0xA0-0xA1, cascaded on IRQ 2 */
#define RRSTUB_PIT          0x40    /* 8254, ports 0x40-0x43, channel 0 on IRQ 0 */
#define RRSTUB_PIT_HZ       1193182
#define RRSTUB_I8042_DATA   0x60
#define RRSTUB_I8042_CMD    0x64    /* write 0xFE: reset line, stops the machine */
#define RRSTUB_RTC_INDEX    0x70    /* CMOS RTC, periodic interrupt on IRQ 8 */
#define RRSTUB_RTC_DATA     0x71
#define RRSTUB_POST         0x80    /* POST code / I/O delay, no side effect */
#define RRSTUB_DEBUG_EXIT   0xF4    /* 8-bit write: the value is the exit status */
/* 16550A UART, IRQ 4.  Host input enters the receiver only while the guest
 * asserts RTS (MCR bit 1, RS-232 hardware flow control) and the FIFO has
 * room, so configure the UART (FIFO on) before raising RTS and no byte is
 * lost; the IRQ reaches the PIC only while MCR.OUT2 is set, as on a PC. */
#define RRSTUB_COM1         0x3F8
#define RRSTUB_HYPERCALL    0x510   /* 32-bit out: EAX = function number */

#define RRSTUB_IRQ_PIT      0
#define RRSTUB_IRQ_COM1     4
#define RRSTUB_IRQ_RTC      8

/*
 * Hypercalls: `out %eax, %dx` with DX = RRSTUB_HYPERCALL and EAX = function
 * number; arguments in RBX, RCX, RSI, RDI; the result comes back in RAX.
 * A result is the same while recording and replaying, so the guest's path
 * never depends on which of the two is happening.
 */
#define RRSTUB_HC_VERSION   0       /* returns RRSTUB_HC_VERSION_VALUE */
#define RRSTUB_HC_MARKER    1       /* RBX = name (char *, or 0): a named marker here while recording; returns 0 */
#define RRSTUB_HC_RECORD_START 2    /* start recording (rrstub run --allow-guest-record); 0 or RRSTUB_HC_DENIED */
#define RRSTUB_HC_RECORD_STOP  3    /* stop recording; 0 or RRSTUB_HC_DENIED */
#define RRSTUB_HC_VASSERT   4       /* see rrstub_vassert.h */
#define RRSTUB_HC_VASSERT_DONE 5
#define RRSTUB_HC_VERSION_VALUE 0x5252535400000001  /* "RRST" << 32 | 1 */
#define RRSTUB_HC_UNKNOWN   0xffffffffffffffff
#define RRSTUB_HC_DENIED    0xfffffffffffffffe
#define RRSTUB_HC_VASSERT_CHECK 1

#ifndef __ASSEMBLER__
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline uint64_t rrstub_hypercall(uint32_t fn, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3)
{
    uint64_t ret;
    __asm__ volatile("outl %%eax, %%dx"
                     : "=a"(ret)
                     : "a"((uint64_t)fn), "d"((uint16_t)RRSTUB_HYPERCALL),
                       "b"(a0), "c"(a1), "S"(a2), "D"(a3)
                     : "memory");
    return ret;
}

static inline __attribute__((noreturn)) void rrstub_exit(uint8_t status)
{
    outb(RRSTUB_DEBUG_EXIT, status);
    for (;;)
        __asm__ volatile("cli; hlt");
}
#endif

#endif
