"""Live probes of what this host's KVM can do for a debugger (`rrstub doctor`).

Each probe boots a few hand-assembled instructions in a fresh VM through the
same boot path as real kernels and watches what KVM reports.  Every probe
has a host deadline, so a probe that misbehaves (a step that never traps, a
guest that spins) is reported, never hung on.

The results (``HostReport``) are facts, not assumptions: the record/replay
engines choose their strategy from them.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from vmm import boot
from vmm.kvm import (Debug, default_kvm_path, Interrupted, InternalError, IoOut, Kvm, Shutdown, Vcpu,
                     host_monotonic_ns)
from vmm.memory import GuestMemory
from vmm.syscallfix import MSR_FMASK, MSR_LSTAR, MSR_STAR
from vmm._native import lib

CODE_BASE = 0x100000
DATA_ADDR = 0x180000
PROBE_MEM = 4 << 20
PROBE_PORT = 0x500
DONE_PORT = 0xF4
STEP_DEADLINE_NS = 200_000_000

# Hand-assembled x86-64, each with its mnemonic.
NOP = b"\x90"
OUT_DONE = b"\xe6\xf4"                      # out 0xf4, al
OUT_POST = b"\xe6\x80"                      # out 0x80, al
DEC_ECX = b"\xff\xc9"                       # dec ecx
JMP_SELF = b"\xeb\xfe"                      # jmp .
INT3 = b"\xcc"
CPUID = b"\x0f\xa2"
MOV_EAX_ECX = b"\x89\xc8"                   # mov eax, ecx
MOV_DX_PROBE = b"\x66\xba" + PROBE_PORT.to_bytes(2, "little")  # mov dx, 0x500
OUT_DX_EAX = b"\xef"                        # out dx, eax


def mov_eax(imm: int) -> bytes:
    return b"\xb8" + imm.to_bytes(4, "little")


def mov_ecx(imm: int) -> bytes:
    return b"\xb9" + imm.to_bytes(4, "little")


def mov_abs_al(addr: int) -> bytes:
    return b"\x88\x04\x25" + addr.to_bytes(4, "little")  # mov byte [addr], al


def jnz_back(distance: int) -> bytes:
    return b"\x75" + (-distance & 0xFF).to_bytes(1, "little")


DR7_L0 = 1 << 0
DR7_RW0_WRITE = 1 << 16


@dataclass
class ProbeResult:
    works: bool
    detail: str


@dataclass
class HostReport:
    kvm_path: str
    api_version: int
    kvm_module: str
    cpu_virtualization: str
    capabilities: dict[str, bool]
    singlestep_cpl0: ProbeResult
    singlestep_cpl3: ProbeResult
    hw_breakpoint_cpl0: ProbeResult
    sw_breakpoint_cpl0: ProbeResult
    dr7_watchpoint_cpl0: ProbeResult
    cpuid_masking_cpl0: ProbeResult
    pmu: ProbeResult
    syscall_cpl3: ProbeResult
    cpl0_instructions_per_s: float
    port_io_exit_raw_us: float
    port_io_exit_us: float
    singlestep_us: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class ProbeFailed(Exception):
    """A measurement could not be taken; the message says which and why."""


class ProbeVm:
    """A tiny VM running ``code`` at CODE_BASE in long mode, CPL0 unless told otherwise."""

    def __init__(self, kvm: Kvm, code: bytes, cpl3: bool = False, cpuid_edit=None):
        self.vm = kvm.create_vm()
        self.mem = None
        try:
            self._build(kvm, code, cpl3, cpuid_edit)
        except BaseException:
            self.close()
            raise

    def _build(self, kvm: Kvm, code: bytes, cpl3: bool, cpuid_edit) -> None:
        self.mem = GuestMemory(PROBE_MEM)
        self.vm.set_user_memory_region(0, 0, PROBE_MEM, self.mem.host_addr)
        self.vcpu: Vcpu = self.vm.create_vcpu(0)
        cpuid = kvm.supported_cpuid()
        if cpuid_edit:
            cpuid = [cpuid_edit(e) for e in cpuid]
        self.vcpu.set_cpuid(cpuid)
        image = boot.KernelImage.from_code(code, "<probe>", CODE_BASE)
        regs, sregs = boot.load(self.mem, image, self.vcpu.get_sregs())
        if cpl3:
            sregs, regs = _user_mode(self.mem, sregs, regs)
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(regs)
        self.vcpu.attach_kicks()

    def run(self, deadline_ns: int = STEP_DEADLINE_NS):
        """Run to the next exit; a kick counts as 'no exit' only once the deadline has passed."""
        deadline = host_monotonic_ns() + deadline_ns
        while True:
            exit = self.vcpu.run(deadline)
            if not isinstance(exit, Interrupted) or host_monotonic_ns() >= deadline:
                return exit

    def close(self) -> None:
        self.vm.close()
        if self.mem is not None:
            self.mem.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _user_mode(mem: GuestMemory, sregs, regs):
    """Make every boot mapping user-accessible and drop to CPL3 (64-bit, DPL3 segments)."""
    for gib in range(4):
        pd_addr = boot.BOOT_PD_LOW + gib * 4096
        for i in range(512):
            entry = mem.read_u64(pd_addr + i * 8)
            mem.write(pd_addr + i * 8, (entry | 0x4).to_bytes(8, "little"))
    for table in (boot.BOOT_PML4, boot.BOOT_PDPT_LOW):
        for i in range(512):
            entry = mem.read_u64(table + i * 8)
            if entry & 1:
                mem.write(table + i * 8, (entry | 0x4).to_bytes(8, "little"))
    code = replace(sregs.cs, selector=0x1B, dpl=3)
    data = replace(sregs.ss, selector=0x23, dpl=3)
    sregs = replace(sregs, cs=code, ss=data, ds=replace(data), es=replace(data))
    regs = replace(regs, rsp=boot.BOOT_STACK_TOP - 0x1000)
    return sregs, regs


def _finished(exit) -> bool:
    """The probe code reached its final `out 0xf4, al`."""
    return isinstance(exit, IoOut) and exit.port == DONE_PORT


def _describe(exit) -> str:
    if isinstance(exit, Shutdown):
        return "the #DB went to the guest instead (triple fault)"
    if isinstance(exit, InternalError):
        return f"KVM internal error (suberror {exit.suberror}{', emulation failure' if exit.is_emulation_failure else ''})"
    if isinstance(exit, Interrupted):
        return "no debug exit before the deadline"
    if _finished(exit):
        return "the guest ran to completion without a debug exit"
    return f"unexpected exit {type(exit).__name__}"


def probe_singlestep(kvm: Kvm, cpl3: bool, steps: int = 2000) -> tuple[ProbeResult, float]:
    """Step through a nop sled; returns the result and microseconds per step (Python-driven)."""
    code = NOP * (steps + 4) + (JMP_SELF if cpl3 else OUT_DONE)
    with ProbeVm(kvm, code, cpl3=cpl3) as p:
        p.vcpu.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP)
        pcs = []
        start = time.perf_counter()
        for _ in range(steps):
            exit = p.run()
            if not isinstance(exit, Debug):
                return ProbeResult(False, _describe(exit)), 0.0
            pcs.append(exit.pc)
        per_step = (time.perf_counter() - start) / steps * 1e6
    expected = [CODE_BASE + i for i in range(1, steps + 1)]
    if pcs != expected:
        first = next(i for i, (a, b) in enumerate(zip(pcs, expected)) if a != b)
        return ProbeResult(False, f"step {first + 1} stopped at {pcs[first]:#x}, expected {expected[first]:#x}"), 0.0
    return ProbeResult(True, "KVM_EXIT_DEBUG after every instruction"), per_step


def probe_hw_breakpoint(kvm: Kvm) -> ProbeResult:
    target = CODE_BASE + 3
    with ProbeVm(kvm, NOP * 6 + OUT_DONE) as p:
        p.vcpu.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_HW_BP,
                               [target, 0, 0, 0, 0, 0, 0, DR7_L0])
        exit = p.run()
        if isinstance(exit, Debug) and exit.pc == target:
            return ProbeResult(True, "DR0-DR3 execution breakpoints stop the guest (KVM_EXIT_DEBUG)")
        if isinstance(exit, Debug):
            return ProbeResult(False, f"debug exit at {exit.pc:#x}, expected {target:#x}")
        return ProbeResult(False, _describe(exit))


def probe_sw_breakpoint(kvm: Kvm) -> ProbeResult:
    with ProbeVm(kvm, NOP * 2 + INT3 + NOP + OUT_DONE) as p:
        p.vcpu.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_SW_BP)
        exit = p.run()
        if isinstance(exit, Debug) and exit.exception == 3:
            return ProbeResult(True, "int3 in guest memory stops the guest (KVM_EXIT_DEBUG, #BP)")
        return ProbeResult(False, _describe(exit))


def probe_dr7_watchpoint(kvm: Kvm) -> ProbeResult:
    code = NOP + mov_abs_al(DATA_ADDR) + NOP * 2 + OUT_DONE
    with ProbeVm(kvm, code) as p:
        p.vcpu.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_HW_BP,
                               [DATA_ADDR, 0, 0, 0, 0, 0, 0, DR7_L0 | DR7_RW0_WRITE])
        exit = p.run()
        if isinstance(exit, Debug):
            return ProbeResult(True, "DR7 write watchpoints stop the guest (KVM_EXIT_DEBUG)")
        return ProbeResult(False, _describe(exit))


EFER_SCE = 1 << 0
SYSCALL = b"\x0f\x05"
MOV_EAX_CS = b"\x8c\xc8"                    # mov eax, cs
PROBE_KERNEL_CS = 0x08                       # STAR[47:32]: the CS (and CS + 8 the SS) syscall loads


def probe_syscall_privilege(kvm: Kvm) -> tuple[ProbeResult, bool]:
    """Does ``syscall`` from CPL3 load the kernel's CS and SS from STAR?  Also: whether it
    left them at user privilege, the host bug ``vmm.syscallfix`` repairs.

    User code executes syscall into a handler that writes CS to the probe
    port.  On a correct CPU the handler runs at CPL0 with STAR's selector
    and the port write exits; kvm_pvm has been seen to leave the user's CS
    and SS in place, so the handler runs at CPL3, its port write faults and
    (with no IDT) the machine shuts down there with the user CS loaded.  A
    kernel's syscall entry on such a host runs at CPL3 and page-faults on
    its own supervisor pages.
    """
    handler = MOV_EAX_CS + MOV_DX_PROBE + OUT_DX_EAX + OUT_DONE
    out_at = CODE_BASE + 0x100 + len(MOV_EAX_CS + MOV_DX_PROBE)
    code = SYSCALL + JMP_SELF
    code = code + NOP * (0x100 - len(code)) + handler
    with ProbeVm(kvm, code, cpl3=True) as p:
        sregs = p.vcpu.get_sregs()
        p.vcpu.set_sregs(replace(sregs, efer=sregs.efer | EFER_SCE))
        p.vcpu.set_msrs({MSR_STAR: PROBE_KERNEL_CS << 32 | 0x10 << 48, MSR_LSTAR: CODE_BASE + 0x100,
                         MSR_FMASK: 0})
        exit = p.run()
        if isinstance(exit, IoOut) and exit.port == PROBE_PORT:
            cs = int.from_bytes(exit.data, "little") & 0xFFFF
            if cs == PROBE_KERNEL_CS:
                return ProbeResult(True, f"syscall from CPL3 loads the kernel CS from STAR ({cs:#x})"), False
            return ProbeResult(False, f"syscall from CPL3 loaded CS {cs:#x}, not STAR's {PROBE_KERNEL_CS:#x}"), False
        if isinstance(exit, Shutdown):
            regs, sregs = p.vcpu.get_regs(), p.vcpu.get_sregs()
            if regs.rip == out_at and sregs.cs.dpl == 3:
                return ProbeResult(False, f"syscall from CPL3 left CS at {sregs.cs.selector:#x} (DPL 3), not "
                                          f"STAR's {PROBE_KERNEL_CS:#x}: the kernel's syscall entry runs at "
                                          "user privilege"), True
        return ProbeResult(False, f"the syscall probe did not report: {_describe(exit)}"), False


def probe_cpuid_masking(kvm: Kvm) -> ProbeResult:
    def mask(entry):
        return replace(entry, ecx=0) if entry.function == 1 else entry

    code = mov_eax(1) + CPUID + MOV_EAX_ECX + MOV_DX_PROBE + OUT_DX_EAX + OUT_DONE
    with ProbeVm(kvm, code, cpuid_edit=mask) as p:
        exit = p.run()
        if not (isinstance(exit, IoOut) and exit.port == PROBE_PORT):
            return ProbeResult(False, f"probe did not report: {_describe(exit)}")
        seen = int.from_bytes(exit.data, "little")
    if seen == 0:
        return ProbeResult(True, "the guest's cpuid returns the table set with KVM_SET_CPUID2")
    return ProbeResult(False, f"KVM_SET_CPUID2 set leaf 1 ECX=0 but the guest's cpuid returned "
                              f"ECX={seen:#010x} (host bits leak)")


def probe_pmu(kvm: Kvm) -> ProbeResult:
    host = os.path.isdir("/sys/bus/event_source/devices/cpu")
    leaf_a = [e for e in kvm.supported_cpuid() if e.function == 0xA]
    guest_version = leaf_a[0].eax & 0xFF if leaf_a else 0
    if host:
        return ProbeResult(True, f"host perf has a 'cpu' PMU; KVM guest PMU version {guest_version}")
    return ProbeResult(False, "no hardware performance counters (/sys/bus/event_source/devices has no "
                              f"'cpu'); KVM guest PMU version {guest_version}")


def measure_cpl0_rate(kvm: Kvm) -> float:
    """Instructions per second of a `dec ecx; jnz` loop at CPL0 (grows until it takes >= 0.2 s)."""
    n = 50_000
    while True:
        code = mov_ecx(n) + DEC_ECX + jnz_back(4) + OUT_DONE
        with ProbeVm(kvm, code) as p:
            start = time.perf_counter()
            exit = p.run(60_000_000_000)
            elapsed = time.perf_counter() - start
        if not _finished(exit):
            raise ProbeFailed(f"CPL0 instruction-rate probe stopped early: {_describe(exit)}")
        if elapsed >= 0.2 or n >= 1 << 30:
            return 2 * n / elapsed
        n = min(n * max(2, int(0.25 / max(elapsed, 1e-4))), 1 << 30)


def _exit_loop_us(kvm: Kvm, exits: int, drive: Callable[[Vcpu], int], how: str) -> float:
    """Microseconds per exit while ``drive`` takes the guest through ``exits`` port-I/O exits.

    ``drive`` returns how many of its runs were port I/O; the guest loops
    `out 0x80, al; dec ecx; jnz` and must then reach its final `out 0xf4`.
    """
    code = mov_ecx(exits) + OUT_POST + DEC_ECX + jnz_back(6) + OUT_DONE
    with ProbeVm(kvm, code) as p:
        start = time.perf_counter()
        io = drive(p.vcpu)
        elapsed = time.perf_counter() - start
        last = p.vcpu.run(0)
    if io != exits or not _finished(last):
        raise ProbeFailed(f"exit-cost probe ({how}): {io} of {exits} runs were port I/O, "
                          f"then {_describe(last)}")
    return elapsed / exits * 1e6


def measure_exit_cost(kvm: Kvm, exits: int = 20_000) -> tuple[float, float]:
    """Microseconds per port-I/O exit round trip: (bare C loop, through Vcpu.run).

    Both figures include the guest's two loop instructions, so their
    difference is our per-exit overhead.
    """
    raw = _exit_loop_us(kvm, exits, lambda vcpu: vcpu.run_n(exits), "bare C loop")
    typed = _exit_loop_us(kvm, exits, lambda vcpu: sum(type(vcpu.run(0)) is IoOut for _ in range(exits)),
                          "Vcpu.run")
    return raw, typed


def _kvm_module() -> str:
    for name in ("kvm_intel", "kvm_amd", "kvm_pvm"):
        if os.path.isdir(f"/sys/module/{name}"):
            return name
    return "unknown"


def _cpu_virtualization() -> str:
    try:
        flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "").split()
    except OSError:
        return "unknown"
    if "vmx" in flags:
        return "vmx (Intel VT-x)"
    if "svm" in flags:
        return "svm (AMD-V)"
    return "none (no vmx/svm flag: KVM is running without hardware virtualization)"


CAPS = ("IMMEDIATE_EXIT", "SET_GUEST_DEBUG", "XSAVE", "VCPU_EVENTS", "DEBUGREGS", "READONLY_MEM",
        "EXIT_ON_EMULATION_FAILURE", "X86_USER_SPACE_MSR", "X86_MSR_FILTER", "DIRTY_LOG_RING",
        "MANUAL_DIRTY_LOG_PROTECT2", "TSC_CONTROL")


def probe_host(path: str | None = None, progress=lambda msg: None) -> HostReport:
    with Kvm(path) as kvm:
        caps = {c: kvm.check_extension(getattr(lib, f"KVM_CAP_{c}")) > 0 for c in CAPS}
        progress("single-step at CPL0")
        ss0, step_us = probe_singlestep(kvm, cpl3=False)
        progress("single-step at CPL3")
        ss3, _ = probe_singlestep(kvm, cpl3=True)
        progress("hardware breakpoints")
        hwbp = probe_hw_breakpoint(kvm)
        progress("software breakpoints")
        swbp = probe_sw_breakpoint(kvm)
        progress("DR7 watchpoints")
        watch = probe_dr7_watchpoint(kvm)
        progress("CPUID masking")
        cpuid = probe_cpuid_masking(kvm)
        pmu = probe_pmu(kvm)
        progress("syscall from user mode")
        syscall, keeps_user_cs = probe_syscall_privilege(kvm)
        progress("CPL0 instruction rate")
        rate = measure_cpl0_rate(kvm)
        progress("port-I/O exit cost")
        raw_us, exit_us = measure_exit_cost(kvm)
        notes = []
        if rate < 50e6:
            notes.append("guest kernel code runs emulated (far below native speed): single-stepping "
                         "costs only a few times the execution itself here")
        if keeps_user_cs:
            notes.append("a user-mode syscall does not reach CPL0 here: `rrstub run` of Linux finishes "
                         "each one at the guest's page-fault entry (hardware breakpoint)")
        if not cpuid.works:
            notes.append("CPUID masking is ignored at CPL0: rdtsc/rdrand/cpuid must be intercepted "
                         "by single-stepping to be deterministic")
        return HostReport(path or default_kvm_path(), 12, _kvm_module(), _cpu_virtualization(), caps, ss0, ss3, hwbp, swbp,
                          watch, cpuid, pmu, syscall, rate, raw_us, exit_us, step_us, notes)


def format_report(r: HostReport) -> str:
    def yn(p: ProbeResult) -> str:
        return f"{'yes' if p.works else 'NO ':<4} {p.detail}"

    lines = [
        f"KVM device          {r.kvm_path} (API {r.api_version}, module {r.kvm_module})",
        f"CPU virtualization  {r.cpu_virtualization}",
        "",
        f"single-step CPL0    {yn(r.singlestep_cpl0)}",
        f"single-step CPL3    {yn(r.singlestep_cpl3)}",
        f"hw breakpoints      {yn(r.hw_breakpoint_cpl0)}",
        f"sw breakpoints      {yn(r.sw_breakpoint_cpl0)}",
        f"DR7 watchpoints     {yn(r.dr7_watchpoint_cpl0)}",
        f"CPUID masking CPL0  {yn(r.cpuid_masking_cpl0)}",
        f"PMU                 {yn(r.pmu)}",
        f"syscall CPL3        {yn(r.syscall_cpl3)}",
        "",
        f"CPL0 instructions   {r.cpl0_instructions_per_s / 1e6:.2f} M/s (dec; jnz loop)",
        f"port-I/O exit       {r.port_io_exit_raw_us:.1f} us bare C KVM_RUN loop, "
        f"{r.port_io_exit_us:.1f} us through Vcpu.run (both include the guest's dec/jnz)",
        f"single-step         {r.singlestep_us:.1f} us per step (CPL0)" if r.singlestep_cpl0.works
        else "single-step         n/a",
        "",
        "capabilities        " + " ".join(f"{k}{'+' if v else '-'}" for k, v in r.capabilities.items()),
    ]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
