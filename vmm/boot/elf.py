"""Direct boot of an ELF64 kernel in long mode at CPL0.

Owns the boot contract documented in examples/include/rrstub_machine.h:
where segments are loaded, the boot page tables, GDT, boot-info block,
command line and the initial vCPU state.  The constants here and in that
header must agree (tests/unit/test_boot.py checks it).

Every way a kernel file can be unusable raises ``BootError`` naming the file
and what to do about it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from pathlib import Path

from vmm.kvm import Regs, Segment, Sregs
from vmm.memory import GuestMemory

BOOT_GDT = 0x1000
BOOT_INFO = 0x7000
BOOT_CMDLINE = 0x7100
BOOT_CMDLINE_MAX = 0x8000 - BOOT_CMDLINE  # 3840 bytes, NUL included
BOOT_PML4 = 0x9000
BOOT_PDPT_LOW = 0xA000
BOOT_PD_LOW = 0xB000          # four page directories: 0xB000..0xEFFF
BOOT_PDPT_HIGH = 0xF000
BOOT_STACK_TOP = 0x80000
KERNEL_MIN_PADDR = 0x100000
BOOT_MAGIC = 0x544F4F4254535252  # "RRSTBOOT"
BOOT_INFO_VERSION = 1
HIGH_HALF_BASE = 0xFFFF_FFFF_8000_0000

GDT_CODE64 = 0x08
GDT_DATA = 0x10

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11

PT_LOAD = 1
EM_X86_64 = 62
ET_EXEC = 2

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_BOOT_INFO = struct.Struct("<QIIQQQQQ")


class BootError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class LoadSegment:
    paddr: int
    vaddr: int
    data: bytes
    memsz: int


@dataclass(frozen=True, slots=True)
class KernelImage:
    path: str
    entry: int
    segments: tuple[LoadSegment, ...]

    @property
    def start(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)

    @classmethod
    def from_code(cls, code: bytes, name: str, paddr: int = KERNEL_MIN_PADDR) -> "KernelImage":
        """Raw machine code as a one-segment kernel entered at its first byte (probes, benchmarks)."""
        return cls(name, paddr, (LoadSegment(paddr, paddr, code, len(code)),))


def parse_elf(data: bytes, path: str = "<kernel>") -> KernelImage:
    """Parse an ELF64 x86-64 executable; every problem is a BootError."""
    def bad(why: str) -> BootError:
        return BootError(f"{path}: {why}")

    if len(data) < 4 or data[:4] != b"\x7fELF":
        raise bad("not an ELF file (no \\x7fELF magic). rrstub boots ELF64 x86-64 kernels, "
                  "e.g. an unstripped vmlinux or examples/build/hello.elf; a bzImage or raw binary will not work")
    if len(data) < _EHDR.size:
        raise bad(f"truncated ELF header ({len(data)} bytes)")
    (ident, e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = _EHDR.unpack_from(data)
    if ident[4] != 2:
        raise bad("a 32-bit ELF file; rrstub boots 64-bit (ELFCLASS64) kernels in long mode")
    if ident[5] != 1:
        raise bad("a big-endian ELF file; rrstub boots little-endian x86-64 kernels")
    if e_machine != EM_X86_64:
        raise bad(f"ELF machine type {e_machine}, not x86-64 ({EM_X86_64})")
    if e_type != ET_EXEC:
        raise bad(f"ELF type {e_type} is not an executable (ET_EXEC); link the kernel with -static "
                  "and a linker script, not as a shared object or relocatable file")
    if e_phentsize != _PHDR.size or e_phnum == 0:
        raise bad("no usable program headers (PT_LOAD segments)")
    if e_phoff + e_phnum * _PHDR.size > len(data):
        raise bad("program headers run past the end of the file (truncated?)")
    segments = []
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _align = \
            _PHDR.unpack_from(data, e_phoff + i * _PHDR.size)
        if p_type != PT_LOAD:
            continue
        if p_filesz > p_memsz:
            raise bad(f"segment {i}: file size {p_filesz:#x} exceeds memory size {p_memsz:#x}")
        if p_memsz == 0:
            continue
        if p_offset + p_filesz > len(data):
            raise bad(f"segment {i}: data at file offset {p_offset:#x}+{p_filesz:#x} runs past "
                      f"the end of the file ({len(data):#x} bytes): truncated kernel?")
        segments.append(LoadSegment(p_paddr, p_vaddr, data[p_offset:p_offset + p_filesz], p_memsz))
    if not segments:
        raise bad("no PT_LOAD segment to load")
    return KernelImage(path, e_entry, tuple(segments))


def read_boot_file(path: str | Path, what: str) -> bytes:
    """The bytes of a kernel or initrd file; a BootError naming it if it cannot be read."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise BootError(f"{p}: no such {what} file") from None
    except IsADirectoryError:
        raise BootError(f"{p}: is a directory, not a {what} file") from None
    except PermissionError:
        raise BootError(f"{p}: permission denied reading the {what}") from None


def load_kernel_file(path: str | Path) -> KernelImage:
    return parse_elf(read_boot_file(path, "kernel"), str(Path(path)))


def _entry_is_mapped(vaddr: int) -> bool:
    return vaddr < (4 << 30) or vaddr >= HIGH_HALF_BASE


def _build_page_tables(mem: GuestMemory) -> None:
    # Accessed and dirty are preset so the CPU never writes them back: page-
    # table pages then change only when the guest itself writes them, which
    # keeps the dirty-page log (markers, landmarks) a function of the guest.
    present_rw = 0x23  # present, writable, accessed
    huge = 0xE3        # present, writable, accessed, dirty, 2 MiB page
    pml4 = bytearray(4096)
    pml4[0:8] = (BOOT_PDPT_LOW | present_rw).to_bytes(8, "little")
    pml4[511 * 8:512 * 8] = (BOOT_PDPT_HIGH | present_rw).to_bytes(8, "little")
    mem.write(BOOT_PML4, bytes(pml4))
    low = bytearray(4096)
    high = bytearray(4096)
    for gib in range(4):
        pd_addr = BOOT_PD_LOW + gib * 4096
        low[gib * 8:gib * 8 + 8] = (pd_addr | present_rw).to_bytes(8, "little")
        pd = b"".join((((gib << 30) + (i << 21)) | huge).to_bytes(8, "little") for i in range(512))
        mem.write(pd_addr, pd)
    # Top 2 GiB of the address space -> physical 0..2 GiB (PDPT entries 510, 511).
    high[510 * 8:511 * 8] = (BOOT_PD_LOW | present_rw).to_bytes(8, "little")
    high[511 * 8:512 * 8] = ((BOOT_PD_LOW + 4096) | present_rw).to_bytes(8, "little")
    mem.write(BOOT_PDPT_LOW, bytes(low))
    mem.write(BOOT_PDPT_HIGH, bytes(high))


def _gdt() -> bytes:
    null = 0
    code64 = 0x00AF9A000000FFFF   # present, DPL0, code, execute/read, L=1, G=1
    data = 0x00CF92000000FFFF     # present, DPL0, data, read/write, D/B=1, G=1
    return struct.pack("<QQQ", null, code64, data)


def load(mem: GuestMemory, image: KernelImage, initial: Sregs, cmdline: str = "") -> tuple[Regs, Sregs]:
    """Place the kernel and boot structures in memory; return the entry vCPU state.

    ``initial`` is the vCPU's reset state from KVM; fields the boot contract
    does not define (APIC base) are kept from it.
    """
    for seg in image.segments:
        if seg.paddr < KERNEL_MIN_PADDR:
            raise BootError(
                f"{image.path}: segment at physical {seg.paddr:#x} is below {KERNEL_MIN_PADDR:#x}, "
                "which holds rrstub's boot structures; link the kernel at 1 MiB or above")
        if seg.paddr + seg.memsz > mem.size:
            raise BootError(
                f"{image.path}: segment at physical {seg.paddr:#x}+{seg.memsz:#x} does not fit in "
                f"{mem.size >> 20} MiB of guest memory; use a larger --mem (e.g. --mem "
                f"{max(64, ((seg.paddr + seg.memsz) >> 20) * 2)}M)")
    for seg in image.segments:
        identity = seg.vaddr == seg.paddr and seg.paddr + seg.memsz <= 4 << 30
        high_half = seg.vaddr == HIGH_HALF_BASE + seg.paddr and seg.paddr + seg.memsz <= 2 << 30
        if not (identity or high_half):
            raise BootError(
                f"{image.path}: segment at virtual {seg.vaddr:#x} is loaded at physical {seg.paddr:#x}, "
                "but the boot page tables map virtual to physical only as identity (below 4 GiB) or "
                f"as {HIGH_HALF_BASE:#x} + physical; link with vaddr == paddr, or in the top 2 GiB")
    if not _entry_is_mapped(image.entry):
        raise BootError(f"{image.path}: entry point {image.entry:#x} is outside the boot page "
                        "tables (0..4 GiB and the top 2 GiB)")
    encoded = cmdline.encode()
    if len(encoded) + 1 > BOOT_CMDLINE_MAX:
        raise BootError(f"kernel command line is {len(encoded)} bytes; at most {BOOT_CMDLINE_MAX - 1} fit")

    for seg in image.segments:
        mem.write(seg.paddr, seg.data)
        mem.write(seg.paddr + len(seg.data), bytes(seg.memsz - len(seg.data)))
    _build_page_tables(mem)
    mem.write(BOOT_GDT, _gdt())
    mem.write(BOOT_CMDLINE, encoded + b"\0")
    free_start = (image.end + 0xFFF) & ~0xFFF
    mem.write(BOOT_INFO, _BOOT_INFO.pack(BOOT_MAGIC, BOOT_INFO_VERSION, _BOOT_INFO.size, mem.size,
                                         image.start, image.end, free_start, BOOT_CMDLINE))

    regs = Regs(rip=image.entry, rsp=BOOT_STACK_TOP - 8, rdi=BOOT_INFO, rflags=0x2)
    code = Segment(base=0, limit=0xFFFFFFFF, selector=GDT_CODE64, type=0xB, present=1, dpl=0,
                   db=0, s=1, l=1, g=1)
    def data_seg() -> Segment:
        return Segment(base=0, limit=0xFFFFFFFF, selector=GDT_DATA, type=0x3, present=1, dpl=0,
                       db=1, s=1, l=0, g=1)
    tss = Segment(base=0, limit=0x67, selector=0, type=0xB, present=1, s=0)
    ldt = Segment(base=0, limit=0xFFFF, selector=0, type=0x2, present=1, s=0, unusable=0)
    sregs = replace(initial, cs=code, ds=data_seg(), es=data_seg(), fs=data_seg(), gs=data_seg(),
                    ss=data_seg(), tr=tss, ldt=ldt, gdt_base=BOOT_GDT, gdt_limit=3 * 8 - 1,
                    idt_base=0, idt_limit=0,
                    cr0=CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG, cr2=0, cr3=BOOT_PML4,
                    cr4=CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT, cr8=0,
                    efer=EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE, interrupt_bitmap=(0, 0, 0, 0))
    return regs, sregs
