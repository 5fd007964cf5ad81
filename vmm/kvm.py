"""A thin, typed layer over KVM: Kvm -> Vm -> Vcpu, each owning one fd.

Every ioctl goes through ``_check`` so that a failure becomes one exception
type, ``KvmError``, carrying the errno and what was being done.  The run
loop itself (KVM_RUN plus exit decoding) is C in native/rrnative.c;
``Vcpu.run()`` turns its flat result into a small exit value.

``Vcpu.get_state()`` / ``set_state()`` move everything KVM holds for a vCPU
that a marker must carry (``VcpuState``); ``encode_vcpu_state`` gives it a
stable, versioned binary form sealed like the other marker blobs
(``vmm.snapshot``).
"""
from __future__ import annotations

import errno as errno_mod
import hashlib
import os
import struct
from dataclasses import dataclass, fields
from typing import Iterable, Optional, Union

from vmm._native import ffi, lib
from vmm.snapshot import Reader, SnapshotError, seal, unseal

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


class MsrError(KvmError):
    """KVM_GET_MSRS or KVM_SET_MSRS stopped short: KVM refused MSR ``index``."""

    def __init__(self, what: str, index: int):
        self.errno = errno_mod.EINVAL
        self.what = what
        self.index = index
        Exception.__init__(self, f"{what}: KVM refused MSR {index:#x} "
                                 f"({MARKER_MSRS.get(index, 'not a marker MSR')})")


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


def _msrs_buffer(entries: list[tuple[int, int]]):
    """A struct kvm_msrs holding (index, value) entries: (owner, typed pointer)."""
    c = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + len(entries) * ffi.sizeof("struct kvm_msr_entry"))
    cp = ffi.cast("struct kvm_msrs *", c)
    cp.nmsrs = len(entries)
    for i, (index, value) in enumerate(entries):
        cp.entries[i].index = index
        cp.entries[i].data = value
    return c, cp


def _struct_from(ctype: str, data: bytes, what: str):
    """A new ``ctype`` holding exactly ``data`` (raw bytes of that struct)."""
    size = ffi.sizeof(ctype)
    if len(data) != size:
        raise ValueError(f"{what}: {len(data)} bytes given, {ctype} is {size}")
    c = ffi.new(f"{ctype} *")
    ffi.memmove(c, data, size)
    return c


# ---------------------------------------------------------------------------
# What a marker carries for one vCPU

# MSRs an x86-64 guest kernel writes and relies on reading back (system-call
# entry, swapgs, TLS, memory types), numbered as in the Intel SDM vol. 4.  A
# vCPU carries those KVM lets it both read and write (``Vcpu.marker_msrs``).
# Left out on purpose: EFER and APIC_BASE (in Sregs); FS_BASE and GS_BASE
# (the same registers as Sregs.fs.base and Sregs.gs.base); IA32_TSC,
# TSC_ADJUST and TSC_DEADLINE (virtual time belongs to the replay engine);
# KVM's paravirtual MSRs (kvmclock, steal time, async PF: host time, written
# into guest memory by the host); the MTRRs (firmware's, and we boot
# without firmware).
MARKER_MSRS: dict[int, str] = {
    0x174: "IA32_SYSENTER_CS",
    0x175: "IA32_SYSENTER_ESP",
    0x176: "IA32_SYSENTER_EIP",
    0xC0000081: "STAR",
    0xC0000082: "LSTAR",
    0xC0000083: "CSTAR",
    0xC0000084: "SFMASK",
    0xC0000102: "KERNEL_GS_BASE",
    0xC0000103: "TSC_AUX",
    0x277: "IA32_PAT",
    0x1A0: "IA32_MISC_ENABLE",
    0x48: "IA32_SPEC_CTRL",
    0xDA0: "IA32_XSS",
}

# KVM_SET_VCPU_EVENTS leaves these parts alone unless the flags say to take
# them; a restore takes them all (KVM_GET_VCPU_EVENTS sets only some).
_EVENTS_RESTORE_FLAGS = (lib.KVM_VCPUEVENT_VALID_NMI_PENDING | lib.KVM_VCPUEVENT_VALID_SIPI_VECTOR
                         | lib.KVM_VCPUEVENT_VALID_SHADOW)


@dataclass(frozen=True, slots=True)
class VcpuState:
    """One vCPU's KVM state: register files, and the other structs as KVM's raw bytes.

    ``msrs`` is ascending (index, value) pairs of ``Vcpu.marker_msrs()``.
    Not here, on purpose: IA32_TSC (virtual time); the guest-debug setup
    (breakpoints belong to the timeline); mp_state and the LAPIC (there is no
    in-kernel irqchip, so the vCPU is always runnable and interrupts come from
    our PIC).  Frozen, but ``regs`` and ``sregs`` are mutable: copy before
    editing them.
    """
    regs: Regs
    sregs: Sregs
    xsave: bytes      # struct kvm_xsave
    events: bytes     # struct kvm_vcpu_events
    debugregs: bytes  # struct kvm_debugregs
    msrs: tuple[tuple[int, int], ...]
    xcrs: bytes       # struct kvm_xcrs (XCR0: which XSAVE components are enabled)


VCPU_STATE_MAGIC = b"RRVC"
VCPU_STATE_VERSION = 1
_REGS_FORMAT = struct.Struct(f"<{len(REG_NAMES)}Q")
_SEGMENT_FORMAT = struct.Struct(f"<QIH{len(_SEG_FIELDS) - 3}B")
_SREGS_TAIL = struct.Struct("<QHQH7Q4Q")  # gdt, idt, cr0 cr2 cr3 cr4 cr8 efer apic_base, bitmap
_LENGTH = struct.Struct("<I")
_MSR_FORMAT = struct.Struct("<IQ")
_RAW_STRUCTS = (("xsave", "struct kvm_xsave"), ("events", "struct kvm_vcpu_events"),
                ("debugregs", "struct kvm_debugregs"), ("xcrs", "struct kvm_xcrs"))


def _vcpu_state_parts(state: VcpuState) -> list[bytes]:
    s = state.sregs
    parts = [_REGS_FORMAT.pack(*(getattr(state.regs, n) for n in REG_NAMES))]
    parts += [_SEGMENT_FORMAT.pack(*(getattr(getattr(s, n), f) for f in _SEG_FIELDS)) for n in SEGMENT_NAMES]
    parts.append(_SREGS_TAIL.pack(s.gdt_base, s.gdt_limit, s.idt_base, s.idt_limit, s.cr0, s.cr2, s.cr3,
                                  s.cr4, s.cr8, s.efer, s.apic_base, *s.interrupt_bitmap))
    for name, _ in _RAW_STRUCTS:
        raw = getattr(state, name)
        parts += [_LENGTH.pack(len(raw)), raw]
    parts.append(_LENGTH.pack(len(state.msrs)))
    parts += [_MSR_FORMAT.pack(index, value) for index, value in state.msrs]
    return parts


def encode_vcpu_state(state: VcpuState) -> bytes:
    """Version 1, little-endian: regs (18 x u64, Regs field order); the 8
    segments (base u64, limit u32, selector u16, 9 x u8 attributes, Segment
    field order) in SEGMENT_NAMES order; gdt and idt (base u64, limit u16);
    cr0 cr2 cr3 cr4 cr8 efer apic_base and the 4 interrupt-bitmap words
    (u64 each); xsave, events, debugregs, xcrs, each as u32 length + raw
    struct; u32 MSR count + (index u32, value u64) pairs.  Sealed as
    ``vmm.snapshot.seal`` does (magic 'RRVC', CRC-32)."""
    return seal(VCPU_STATE_MAGIC, VCPU_STATE_VERSION, _vcpu_state_parts(state))


def decode_vcpu_state(blob: bytes) -> VcpuState:
    what = "vCPU state"
    _, payload = unseal(blob, VCPU_STATE_MAGIC, VCPU_STATE_VERSION, what)
    r = Reader(payload, what)
    regs = Regs(*r.unpack(_REGS_FORMAT))
    segments = {n: Segment(*r.unpack(_SEGMENT_FORMAT)) for n in SEGMENT_NAMES}
    tail = r.unpack(_SREGS_TAIL)
    sregs = Sregs(**segments, gdt_base=tail[0], gdt_limit=tail[1], idt_base=tail[2], idt_limit=tail[3],
                  cr0=tail[4], cr2=tail[5], cr3=tail[6], cr4=tail[7], cr8=tail[8], efer=tail[9],
                  apic_base=tail[10], interrupt_bitmap=tuple(tail[11:15]))
    raw = {}
    for name, ctype in _RAW_STRUCTS:
        (n,) = r.unpack(_LENGTH)
        if n != ffi.sizeof(ctype):
            raise SnapshotError(f"{what}: {name} is {n} bytes, {ctype} is {ffi.sizeof(ctype)}")
        raw[name] = bytes(r.take(n))
    (count,) = r.unpack(_LENGTH)
    if count * _MSR_FORMAT.size != len(payload) - r.pos:
        raise SnapshotError(f"{what}: {count} MSRs do not fill the {len(payload) - r.pos} bytes left")
    msrs = tuple(r.unpack(_MSR_FORMAT) for _ in range(count))
    r.finish()
    return VcpuState(regs, sregs, msrs=msrs, **raw)


def vcpu_state_digest(state: VcpuState) -> bytes:
    """A 16-byte hash of the state, for comparing two states cheaply."""
    h = hashlib.blake2b(digest_size=16)
    for part in _vcpu_state_parts(state):
        h.update(part)
    return h.digest()


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
        self._marker_msrs: Optional[tuple[int, ...]] = None
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
        _check(lib.rr_vcpu_run(self.fd, self._run, deadline_host_ns, self._exit), "KVM_RUN")
        return self.last_exit()

    def last_exit(self) -> Exit:
        """The exit value for the last exit recorded in this vCPU's rr_exit (by any C run loop)."""
        ex = self._exit
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

    def cpl(self) -> int:
        """The current privilege level, without building the whole Sregs."""
        c = ffi.new("struct kvm_sregs *")
        _check(lib.rr_ioctl(self.fd, lib.KVM_GET_SREGS, c), "KVM_GET_SREGS")
        return c.cs.dpl if c.cr0 & 1 else 0

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

    def get_xsave(self) -> bytes:
        """struct kvm_xsave: x87, SSE, AVX... state (replaces KVM_GET_FPU)."""
        return self._get_struct("struct kvm_xsave", "KVM_GET_XSAVE")

    def set_xsave(self, data: bytes) -> None:
        """Load ``data``; a state saved on a host with other XSAVE features (KVM refuses
        components it does not support, EINVAL) is loaded as its x87 and SSE parts, the
        only ones an rrstub guest can use (its CPUID offers no AVX or later)."""
        try:
            self._set_struct("struct kvm_xsave", "KVM_SET_XSAVE", data)
        except KvmError as e:
            if e.errno != errno_mod.EINVAL or len(data) < 576:
                raise
            legacy = bytearray(data)
            bv = int.from_bytes(legacy[512:520], "little") & 0x3     # XSTATE_BV: x87 | SSE
            legacy[512:520] = bv.to_bytes(8, "little")
            legacy[520:576] = bytes(56)                              # XCOMP_BV and the rest of the header
            legacy[576:] = bytes(len(legacy) - 576)
            self._set_struct("struct kvm_xsave", "KVM_SET_XSAVE", bytes(legacy))

    def get_xcrs(self) -> bytes:
        """struct kvm_xcrs: the extended control registers (XCR0)."""
        return self._get_struct("struct kvm_xcrs", "KVM_GET_XCRS")

    def set_xcrs(self, data: bytes) -> None:
        self._set_struct("struct kvm_xcrs", "KVM_SET_XCRS", data)

    def get_vcpu_events(self) -> bytes:
        """struct kvm_vcpu_events: pending/injected exception, interrupt, NMI; interrupt shadow."""
        return self._get_struct("struct kvm_vcpu_events", "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, data: bytes) -> None:
        """Put all of ``data`` back, NMI pending, SIPI vector and interrupt shadow included."""
        c = _struct_from("struct kvm_vcpu_events", data, "KVM_SET_VCPU_EVENTS")
        c.flags |= _EVENTS_RESTORE_FLAGS
        _check(lib.rr_ioctl(self.fd, lib.KVM_SET_VCPU_EVENTS, c), "KVM_SET_VCPU_EVENTS")

    def event_in_flight(self) -> bool:
        """An exception or interrupt is queued in KVM but not yet delivered to the guest."""
        c = ffi.new("struct kvm_vcpu_events *")
        _check(lib.rr_ioctl(self.fd, lib.KVM_GET_VCPU_EVENTS, c), "KVM_GET_VCPU_EVENTS")
        return bool(c.exception.injected or c.exception.pending or c.interrupt.injected)

    def interrupt_in_flight(self) -> Optional[int]:
        """The vector of an interrupt KVM holds for delivery on the next run, or None."""
        c = ffi.new("struct kvm_vcpu_events *")
        _check(lib.rr_ioctl(self.fd, lib.KVM_GET_VCPU_EVENTS, c), "KVM_GET_VCPU_EVENTS")
        return c.interrupt.nr if c.interrupt.injected else None

    def end_interrupt_shadow(self) -> bool:
        """Drop an `sti`/`mov ss` interrupt shadow; returns whether an interrupt is in flight."""
        c = ffi.new("struct kvm_vcpu_events *")
        _check(lib.rr_ioctl(self.fd, lib.KVM_GET_VCPU_EVENTS, c), "KVM_GET_VCPU_EVENTS")
        if c.interrupt.shadow:
            c.interrupt.shadow = 0
            c.flags |= _EVENTS_RESTORE_FLAGS
            _check(lib.rr_ioctl(self.fd, lib.KVM_SET_VCPU_EVENTS, c), "KVM_SET_VCPU_EVENTS")
        return bool(c.interrupt.injected)

    def inject_exception(self, vector: int, error_code: Optional[int] = None) -> None:
        """Have the next KVM_RUN deliver exception ``vector`` (with ``error_code``) through the IDT."""
        c = ffi.new("struct kvm_vcpu_events *")
        _check(lib.rr_ioctl(self.fd, lib.KVM_GET_VCPU_EVENTS, c), "KVM_GET_VCPU_EVENTS")
        c.exception.injected = 1
        c.exception.pending = 0
        c.exception.nr = vector
        c.exception.has_error_code = 0 if error_code is None else 1
        c.exception.error_code = error_code or 0
        c.flags |= _EVENTS_RESTORE_FLAGS
        _check(lib.rr_ioctl(self.fd, lib.KVM_SET_VCPU_EVENTS, c), "KVM_SET_VCPU_EVENTS")

    def get_debugregs(self) -> bytes:
        """struct kvm_debugregs: the guest's own DR0-3, DR6, DR7."""
        return self._get_struct("struct kvm_debugregs", "KVM_GET_DEBUGREGS")

    def set_debugregs(self, data: bytes) -> None:
        self._set_struct("struct kvm_debugregs", "KVM_SET_DEBUGREGS", data)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """index -> value; MsrError names the first MSR KVM refused."""
        indices = list(indices)
        buf, cp = _msrs_buffer([(index, 0) for index in indices])
        done = _check(lib.rr_ioctl(self.fd, lib.KVM_GET_MSRS, cp), "KVM_GET_MSRS")
        if done < len(indices):
            raise MsrError("KVM_GET_MSRS", indices[done])
        return {cp.entries[i].index: cp.entries[i].data for i in range(done)}

    def set_msrs(self, values: dict[int, int]) -> None:
        """Write index -> value in order; MsrError names the first MSR KVM refused
        (those before it are written)."""
        entries = list(values.items())
        buf, cp = _msrs_buffer(entries)
        done = _check(lib.rr_ioctl(self.fd, lib.KVM_SET_MSRS, cp), "KVM_SET_MSRS")
        if done < len(entries):
            raise MsrError("KVM_SET_MSRS", entries[done][0])

    def marker_msrs(self) -> tuple[int, ...]:
        """The MARKER_MSRS KVM lets this vCPU read and write back; probed once.

        The probe writes each MSR's current value back, so it changes nothing.
        """
        if self._marker_msrs is None:
            usable = []
            for index in MARKER_MSRS:
                try:
                    self.set_msrs(self.get_msrs([index]))
                except MsrError:
                    continue
                usable.append(index)
            self._marker_msrs = tuple(sorted(usable))
        return self._marker_msrs

    def get_state(self) -> VcpuState:
        msrs = self.get_msrs(self.marker_msrs())
        return VcpuState(self.get_regs(), self.get_sregs(), self.get_xsave(), self.get_vcpu_events(),
                         self.get_debugregs(), tuple(sorted(msrs.items())), self.get_xcrs())

    def set_state(self, state: VcpuState) -> None:
        """Put a ``get_state()`` back, in the order KVM needs.

        Sregs, regs, xsave, xcrs, MSRs, debug registers, then the events:
        KVM_SET_REGS drops a pending exception, so the events must follow it
        (QEMU's kvm_arch_put_registers puts them after these too).
        """
        self.set_sregs(state.sregs)
        self.set_regs(state.regs)
        self.set_xsave(state.xsave)
        self.set_xcrs(state.xcrs)
        self.set_msrs(dict(state.msrs))
        self.set_debugregs(state.debugregs)
        self.set_vcpu_events(state.events)

    def _get_struct(self, ctype: str, ioctl: str) -> bytes:
        c = ffi.new(f"{ctype} *")
        _check(lib.rr_ioctl(self.fd, getattr(lib, ioctl), c), ioctl)
        return bytes(ffi.buffer(c))

    def _set_struct(self, ctype: str, ioctl: str, data: bytes) -> None:
        _check(lib.rr_ioctl(self.fd, getattr(lib, ioctl), _struct_from(ctype, data, ioctl)), ioctl)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.detach_kicks()
        lib.rr_unmap(self._run, self._run_size)
        os.close(self.fd)
        self.fd = -1


def host_monotonic_ns() -> int:
    return lib.rr_monotonic_ns()
