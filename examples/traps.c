/*
 * traps: a kernel that takes exceptions and software interrupts on purpose
 * and recovers from each, so the debugger can be checked on every way
 * control enters a handler.
 *
 * Each of `rounds` rounds (command line "rounds=N", default 5) runs, in
 * this order: with "soft=1" int3 (#BP) and int $0x81, then ud2 (#UD), a
 * load from a non-canonical address (#GP), a load from an unmapped address
 * (#PF) and syscall (at CPL0: the kernel calls itself).  soft=1 needs a
 * host whose KVM runs int3 and int n at CPL0 (the nested hosts described
 * in PLATFORM.md report them as emulation failures).  Every handler's first
 * instruction counts its entry in memory, so a breakpoint there must be
 * hit exactly `rounds` times; the faulting handlers resume at `fixup`,
 * the others return to the next instruction.  Interrupts stay disabled
 * throughout: no timer, no preemption, one path.
 *
 * Prints "traps: int3=N int81=N ud2=N gp=N pf=N syscall=N rounds=N" and
 * exits 0 when every count is what the rounds should give, 1 otherwise.
 *
 * The debugger's tests rely on these names: the handlers bp_entry,
 * soft_entry, ud_entry, gp_entry, pf_entry and syscall_entry.
 */
#include "kernel.h"

#define ROUNDS          5
#define MAX_ROUNDS      100000
#define VECTOR_BP       3
#define VECTOR_UD       6
#define VECTOR_GP       13
#define VECTOR_PF       14
#define VECTOR_SOFT     0x81
#define IDT_VECTORS     256
#define MSR_EFER        0xC0000080u
#define MSR_STAR        0xC0000081u
#define MSR_LSTAR       0xC0000082u
#define MSR_SFMASK      0xC0000084u
#define EFER_SCE        1ull
#define NON_CANONICAL   0x8000000000000000ull   /* #GP on any access */
#define UNMAPPED        0x0000100000000000ull   /* canonical, above the boot map: #PF */

volatile uint64_t bp_count, soft_count, ud_count, gp_count, pf_count, syscall_count;
uint64_t fixup;     /* where a faulting handler resumes */

void bp_entry(void), soft_entry(void), ud_entry(void), gp_entry(void), pf_entry(void), syscall_entry(void);

/*
 * The handlers.  Each starts by counting itself.  #GP and #PF push an error
 * code, dropped before the return; #UD, #GP and #PF resume at `fixup`
 * (their saved rip is the faulting instruction).  syscall leaves the
 * return rip in rcx and the flags in r11, and at CPL0 returns by hand.
 */
#define HANDLER(name) "    .type " #name ", @function\n" #name ":\n"
#define END(name) "    .size " #name ", . - " #name "\n"
__asm__(
    "    .text\n"
    "    .globl bp_entry, soft_entry, ud_entry, gp_entry, pf_entry, syscall_entry\n"
    HANDLER(bp_entry)
    "    incq bp_count(%rip)\n"
    "    iretq\n"
    END(bp_entry)
    HANDLER(soft_entry)
    "    incq soft_count(%rip)\n"
    "    iretq\n"
    END(soft_entry)
    HANDLER(ud_entry)
    "    incq ud_count(%rip)\n"
    "    jmp resume_at_fixup\n"
    END(ud_entry)
    HANDLER(gp_entry)
    "    incq gp_count(%rip)\n"
    "    addq $8, %rsp\n"
    "    jmp resume_at_fixup\n"
    END(gp_entry)
    HANDLER(pf_entry)
    "    incq pf_count(%rip)\n"
    "    addq $8, %rsp\n"
    END(pf_entry)
    HANDLER(resume_at_fixup)
    "    pushq %rax\n"
    "    movq fixup(%rip), %rax\n"
    "    movq %rax, 8(%rsp)\n"
    "    popq %rax\n"
    "    iretq\n"
    END(resume_at_fixup)
    HANDLER(syscall_entry)
    "    incq syscall_count(%rip)\n"
    "    pushq %r11\n"
    "    popfq\n"
    "    jmpq *%rcx\n"
    END(syscall_entry));

static struct idt_gate idt[IDT_VECTORS];

static void set_gate(unsigned vector, void (*entry)(void))
{
    idt[vector] = idt_interrupt_gate((uint64_t)entry);
}

static void wrmsr(uint32_t msr, uint64_t value)
{
    __asm__ volatile("wrmsr" :: "c"(msr), "a"((uint32_t)value), "d"((uint32_t)(value >> 32)));
}

static uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return (uint64_t)hi << 32 | lo;
}

int kmain(const struct rrstub_boot_info *boot)
{
    uart_init(0);
    unsigned rounds = cmdline_uint(boot, "rounds", ROUNDS, MAX_ROUNDS);
    unsigned soft = cmdline_uint(boot, "soft", 0, 1);

    set_gate(VECTOR_BP, bp_entry);
    set_gate(VECTOR_UD, ud_entry);
    set_gate(VECTOR_GP, gp_entry);
    set_gate(VECTOR_PF, pf_entry);
    set_gate(VECTOR_SOFT, soft_entry);
    idt_load(idt, IDT_VECTORS);

    wrmsr(MSR_STAR, (uint64_t)KERNEL_CS << 32);
    wrmsr(MSR_LSTAR, (uint64_t)syscall_entry);
    wrmsr(MSR_SFMASK, 0);
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);

    for (unsigned i = 0; i < rounds; i++) {
        if (soft) {
            __asm__ volatile("int3" ::: "memory");
            __asm__ volatile("int $0x81" ::: "memory");
        }
        __asm__ volatile("leaq 1f(%%rip), %%rax\n\tmovq %%rax, fixup(%%rip)\n\tud2\n1:"
                         ::: "rax", "memory");
        __asm__ volatile("leaq 1f(%%rip), %%rdx\n\tmovq %%rdx, fixup(%%rip)\n\tmovq (%0), %%rdx\n1:"
                         :: "r"(NON_CANONICAL) : "rdx", "memory");
        __asm__ volatile("leaq 1f(%%rip), %%rdx\n\tmovq %%rdx, fixup(%%rip)\n\tmovq (%0), %%rdx\n1:"
                         :: "r"(UNMAPPED) : "rdx", "memory");
        __asm__ volatile("syscall" ::: "rcx", "r11", "memory");
    }

    kprintf("traps: int3=%lu int81=%lu ud2=%lu gp=%lu pf=%lu syscall=%lu rounds=%u\n",
            bp_count, soft_count, ud_count, gp_count, pf_count, syscall_count, rounds);
    uint64_t soft_rounds = soft ? rounds : 0;
    int all = bp_count == soft_rounds && soft_count == soft_rounds && ud_count == rounds &&
              gp_count == rounds && pf_count == rounds && syscall_count == rounds;
    return all ? EXIT_OK : EXIT_FAILED;
}
