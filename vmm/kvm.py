"""A thin, typed layer over KVM: Kvm -> Vm -> Vcpu, each owning one fd.

Every ioctl goes through ``_check`` so that a failure becomes one exception
type, ``KvmError``, carrying the errno and what was being done.  The run
loop itself (KVM_RUN plus exit decoding) is C in native/rrnative.c;
``Vcpu.run()`` turns its flat result into a small exit value.
"""
from __future__ import annotations

import errno as errno_mod
import os
from dataclasses import dataclass, fields
from typing import Iterable, Optional, Union

from vmm._native import ffi, lib

KVM_API_VERSION = 12
KVM_DEVICE_ENV = "RRSTUB_KVM_DEVICE"


def default_kvm_path() -> str:
    """/dev/kvm, unless the environment names another device node."""
    return os.environ.get(KVM_DEVICE_ENV) or "/dev/kvm"


class KvmError(Exception):
    """A KVM ioctl failed; ``errno`` is the host error number."""

    def __init__(self, what: str, err: int):
        self.errno = err
        self.what = what
        super().__init__(f"{what}: {os.strerror(err)} (errno {err})")


class KvmUnavailable(KvmError):
    """/dev/kvm is missing, not accessible, or speaks another API version."""

    def __init__(self, message: str, err: int = errno_mod.ENODEV):
        self.errno = err
        self.what = "open /dev/kvm"
        Exception.__init__(self, message)


def _check(result: int, what: str) -> int:
    if result < 0:
        raise KvmError(what, -result)
    return result


# ---------------------------------------------------------------------------
# Exit values


@dataclass(frozen=True, slots=True)
class IoOut:
    port: int
    size: int
    data: bytes  # size * count bytes, items in order
    count: int = 1


@dataclass(frozen=True, slots=True)
class IoIn:
    port: int
    size: int
    count: int = 1


@dataclass(frozen=True, slots=True)
class MmioRead:
    addr: int
    length: int


@dataclass(frozen=True, slots=True)
class MmioWrite:
    addr: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Hlt:
    pass


@dataclass(frozen=True, slots=True)
class IrqWindowOpen:
    pass


@dataclass(frozen=True, slots=True)
class Debug:
    pc: int
    exception: int
    dr6: int
    dr7: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Triple fault (or another shutdown condition) in the guest."""


@dataclass(frozen=True, slots=True)
class InternalError:
    suberror: int
    data: tuple[int, ...]

    @property
    def is_emulation_failure(self) -> bool:
        return self.suberror == lib.KVM_INTERNAL_ERROR_EMULATION


@dataclass(frozen=True, slots=True)
class FailEntry:
    hardware_reason: int


@dataclass(frozen=True, slots=True)
class SystemEvent:
    kind: int


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned early because of a kick (deadline timer or rr_kick)."""


@dataclass(frozen=True, slots=True)
class UnknownExit:
    reason: int


Exit = Union[IoOut, IoIn, MmioRead, MmioWrite, Hlt, IrqWindowOpen, Debug, Shutdown,
             InternalError, FailEntry, SystemEvent, Interrupted, UnknownExit]

_HLT = Hlt()
_IRQ_WINDOW = IrqWindowOpen()
_SHUTDOWN = Shutdown()
_INTERRUPTED = Interrupted()


# ---------------------------------------------------------------------------
# Register files


@dataclass(slots=True)
class Regs:
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


REG_NAMES = tuple(f.name for f in fields(Regs))


@dataclass(slots=True)
class Segment:
    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0
    g: int = 0
    avl: int = 0
    unusable: int = 0


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SEG_FIELDS = tuple(f.name for f in fields(Segment))


@dataclass(slots=True)
class Sregs:
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    interrupt_bitmap: tuple[int, int, int, int]

    @property
    def cpl(self) -> int:
        return self.cs.dpl if self.cr0 & 1 else 0


def _sregs_from_c(c) -> Sregs:
    segs = {n: Segment(*(getattr(getattr(c, n), f) for f in _SEG_FIELDS)) for n in SEGMENT_NAMES}
    return Sregs(**segs, gdt_base=c.gdt.base, gdt_limit=c.gdt.limit, idt_base=c.idt.base,
                 idt_limit=c.idt.limit, cr0=c.cr0, cr2=c.cr2, cr3=c.cr3, cr4=c.cr4, cr8=c.cr8,
                 efer=c.efer, apic_base=c.apic_base, interrupt_bitmap=tuple(c.interrupt_bitmap))


def _sregs_to_c(s: Sregs, c) -> None:
    for n in SEGMENT_NAMES:
        seg, cseg = getattr(s, n), getattr(c, n)
        for f in _SEG_FIELDS:
            setattr(cseg, f, getattr(seg, f))
    c.gdt.base, c.gdt.limit = s.gdt_base, s.gdt_limit
    c.idt.base, c.idt.limit = s.idt_base, s.idt_limit
    c.cr0, c.cr2, c.cr3, c.cr4, c.cr8 = s.cr0, s.cr2, s.cr3, s.cr4, s.cr8
    c.efer, c.apic_base = s.efer, s.apic_base
    for i, word in enumerate(s.interrupt_bitmap):
        c.interrupt_bitmap[i] = word


@dataclass(frozen=True, slots=True)
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


_CPUID_FIELDS = tuple(f.name for f in fields(CpuidEntry))


def _cpuid2_buffer(n: int):
    """A zeroed struct kvm_cpuid2 with room for n entries: (owner, typed pointer)."""
    c = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + n * ffi.sizeof("struct kvm_cpuid_entry2"))
    cp = ffi.cast("struct kvm_cpuid2 *", c)
    cp.nent = n
    return c, cp


def _cpuid2(entries: Iterable[CpuidEntry]):
    entries = list(entries)
    c, cp = _cpuid2_buffer(len(entries))
    for i, e in enumerate(entries):
        for f in _CPUID_FIELDS:
            setattr(cp.entries[i], f, getattr(e, f))
    return c, cp


# ---------------------------------------------------------------------------
# Objects


class Kvm:
    """The /dev/kvm system fd."""

    def __init__(self, path: str | None = None):
        path = path or default_kvm_path()
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: this machine has no KVM. Load the kvm module "
                "(modprobe kvm_intel or kvm_amd) or run on a host with hardware virtualization "
                "enabled.", errno_mod.ENOENT) from None
        except PermissionError:
            raise KvmUnavailable(
                f"{path} exists but you may not open it: add your user to the 'kvm' group "
                "(sudo usermod -aG kvm $USER, then log in again) or run as root.",
                errno_mod.EACCES) from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}", e.errno) from None
        version = lib.rr_ioctl_int(self.fd, lib.KVM_GET_API_VERSION, 0)
        if version < 0:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} is not a KVM device ({os.strerror(-version)})", -version)
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} speaks KVM API {version}, rrstub needs {KVM_API_VERSION}")
        size = lib.rr_ioctl_int(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0)
        if size < 0:
            os.close(self.fd)
            raise KvmError("KVM_GET_VCPU_MMAP_SIZE", -size)
        self.vcpu_mmap_size = size
        self._supported_cpuid: Optional[tuple[CpuidEntry, ...]] = None

    def check_extension(self, cap: int) -> int:
        r = lib.rr_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, cap)
        return max(r, 0)

    def supported_cpuid(self) -> tuple[CpuidEntry, ...]:
        """What KVM can offer a guest; asked once per Kvm (it does not change)."""
        if self._supported_cpuid is None:
            n = 256
            while True:
                buf, cp = _cpuid2_buffer(n)
                r = lib.rr_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cp)
                if r == -errno_mod.E2BIG and n < 4096:
                    n *= 2
                    continue
                _check(r, "KVM_GET_SUPPORTED_CPUID")
                self._supported_cpuid = tuple(
                    CpuidEntry(*(getattr(cp.entries[i], f) for f in _CPUID_FIELDS)) for i in range(cp.nent))
                break
        return self._supported_cpuid

    def create_vm(self) -> "Vm":
        fd = _check(lib.rr_ioctl_int(self.fd, lib.KVM_CREATE_VM, 0), "KVM_CREATE_VM")
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Vm:
    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[Vcpu] = []

    def set_user_memory_region(self, slot: int, guest_phys: int, size: int, host_addr: int,
                               flags: int = 0) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": guest_phys,
            "memory_size": size, "userspace_addr": host_addr})
        _check(lib.rr_ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region),
               f"KVM_SET_USER_MEMORY_REGION slot {slot} at {guest_phys:#x}+{size:#x}")

    def set_tss_addr(self, addr: int) -> None:
        _check(lib.rr_ioctl_int(self.fd, lib.KVM_SET_TSS_ADDR, addr), "KVM_SET_TSS_ADDR")

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        bitmap = ffi.new("uint64_t[]", (npages + 63) // 64)
        log = ffi.new("struct kvm_dirty_log *")
        log.slot = slot
        log.dirty_bitmap = bitmap
        _check(lib.rr_ioctl(self.fd, lib.KVM_GET_DIRTY_LOG, log), f"KVM_GET_DIRTY_LOG slot {slot}")
        return bytes(ffi.buffer(bitmap))

    def create_vcpu(self, index: int = 0) -> "Vcpu":
        fd = _check(lib.rr_ioctl_int(self.fd, lib.KVM_CREATE_VCPU, index), f"KVM_CREATE_VCPU {index}")
        vcpu = Vcpu(self, fd)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    """One vCPU fd and its shared kvm_run area.

    ``run()`` must be called from the thread that called ``attach_kicks()``
    when deadlines or kicks are used: the kick signal targets that thread.
    """

    def __init__(self, vm: Vm, fd: int):
        self.vm = vm
        self.fd = fd
        self._run_size = vm.kvm.vcpu_mmap_size
        self._run = lib.rr_map_run(fd, self._run_size)
        if self._run == ffi.NULL:
            os.close(fd)
            raise KvmError("mmap kvm_run", ffi.errno)
        self._run_buf = ffi.buffer(self._run, self._run_size)
        self._exit = ffi.new("struct rr_exit *")
        self._kicks_attached = False
        self.if_flag = False
        self.ready_for_injection = False

    # -- running --------------------------------------------------------
    def attach_kicks(self) -> None:
        """Route the deadline timer and ``kick()`` to this vCPU on this thread."""
        _check(lib.rr_kick_attach(self._run), "install kick signal")
        self._kicks_attached = True

    def detach_kicks(self) -> None:
        """Stop deadline timers and kicks for this vCPU (its thread may now end)."""
        if self._kicks_attached:
            lib.rr_kick_detach(self._run)
            self._kicks_attached = False

    def kick(self) -> None:
        """Bring this vCPU back from KVM_RUN soon; callable from any thread.

        A no-op unless this vCPU has kicks attached, so a late kick never
        reaches another vCPU.
        """
        lib.rr_kick(self._run)

    def run(self, deadline_host_ns: int = 0) -> Exit:
        """One KVM_RUN; ``deadline_host_ns`` (CLOCK_MONOTONIC, 0 = none) kicks it back."""
        ex = self._exit
        _check(lib.rr_vcpu_run(self.fd, self._run, deadline_host_ns, ex), "KVM_RUN")
        self.if_flag = bool(ex.if_flag)
        self.ready_for_injection = bool(ex.ready_for_injection)
        reason = ex.reason
        if reason == lib.KVM_EXIT_IO:
            size, count, off = ex.io_size, ex.io_count, ex.io_data_offset
            if ex.io_out:
                return IoOut(ex.io_port, size, self._run_buf[off:off + size * count], count)
            return IoIn(ex.io_port, size, count)
        if reason == lib.KVM_EXIT_HLT:
            return _HLT
        if reason == lib.RR_EXIT_INTR or reason == lib.KVM_EXIT_INTR:
            return _INTERRUPTED
        if reason == lib.KVM_EXIT_IRQ_WINDOW_OPEN:
            return _IRQ_WINDOW
        if reason == lib.KVM_EXIT_MMIO:
            if ex.mmio_write:
                return MmioWrite(ex.mmio_addr, bytes(ex.mmio_data)[:ex.mmio_len])
            return MmioRead(ex.mmio_addr, ex.mmio_len)
        if reason == lib.KVM_EXIT_DEBUG:
            return Debug(ex.debug_pc, ex.debug_exception, ex.debug_dr6, ex.debug_dr7)
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return _SHUTDOWN
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            return InternalError(ex.internal_suberror, tuple(ex.internal_data[0:ex.internal_ndata]))
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            return FailEntry(ex.fail_entry_reason)
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            return SystemEvent(ex.system_event_type)
        return UnknownExit(reason)

    def run_n(self, n: int) -> int:
        """n bare KVM_RUNs in C, exits discarded (the exit-cost reference); returns how many were port I/O."""
        return _check(lib.rr_run_n(self.fd, self._run, n), "KVM_RUN")

    def complete_io_in(self, data: bytes) -> None:
        """Supply the bytes of the last IoIn exit (size * count); KVM consumes them on the next run."""
        off = self._exit.io_data_offset
        self._run_buf[off:off + len(data)] = data

    def complete_mmio_read(self, data: bytes) -> None:
        lib.rr_set_mmio_data(self._run, data, len(data))

    def request_interrupt_window(self, on: bool) -> None:
        lib.rr_set_request_interrupt_window(self._run, 1 if on else 0)

    def interrupt(self, vector: int) -> None:
        irq = ffi.new("struct kvm_interrupt *", {"irq": vector})
        _check(lib.rr_ioctl(self.fd, lib.KVM_INTERRUPT, irq), f"KVM_INTERRUPT vector {vector:#x}")

    # -- state ----------------------------------------------------------
    def get_regs(self) -> Regs:
        c = ffi.new("struct kvm_regs *")
        _check(lib.rr_ioctl(self.fd, lib.KVM_GET_REGS, c), "KVM_GET_REGS")
        return Regs(*(getattr(c, n) for n in REG_NAMES))

    def set_regs(self, regs: Regs) -> None:
        c = ffi.new("struct kvm_regs *", {n: getattr(regs, n) for n in REG_NAMES})
        _check(lib.rr_ioctl(self.fd, lib.KVM_SET_REGS, c), "KVM_SET_REGS")

    def get_sregs(self) -> Sregs:
        c = ffi.new("struct kvm_sregs *")
        _check(lib.rr_ioctl(self.fd, lib.KVM_GET_SREGS, c), "KVM_GET_SREGS")
        return _sregs_from_c(c)

    def set_sregs(self, sregs: Sregs) -> None:
        c = ffi.new("struct kvm_sregs *")
        _sregs_to_c(sregs, c)
        _check(lib.rr_ioctl(self.fd, lib.KVM_SET_SREGS, c), "KVM_SET_SREGS")

    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None:
        buf, cp = _cpuid2(entries)
        _check(lib.rr_ioctl(self.fd, lib.KVM_SET_CPUID2, cp), "KVM_SET_CPUID2")

    def set_guest_debug(self, control: int, debugreg: Optional[Iterable[int]] = None) -> None:
        dbg = ffi.new("struct kvm_guest_debug *")
        dbg.control = control
        for i, v in enumerate(debugreg or ()):
            dbg.arch.debugreg[i] = v
        _check(lib.rr_ioctl(self.fd, lib.KVM_SET_GUEST_DEBUG, dbg), "KVM_SET_GUEST_DEBUG")

    def close(self) -> None:
        if self.fd < 0:
            return
        self.detach_kicks()
        lib.rr_unmap(self._run, self._run_size)
        os.close(self.fd)
        self.fd = -1


def host_monotonic_ns() -> int:
    return lib.rr_monotonic_ns()
