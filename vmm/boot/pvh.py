"""The PVH boot protocol: an ELF vmlinux entered at its 32-bit PVH entry point.

Linux (CONFIG_PVH) and Xen define it: the ELF carries a note (owner "Xen",
type XEN_ELFNOTE_PHYS32_ENTRY = 18) with the physical address of an entry
that expects 32-bit protected mode with paging off, flat 4 GiB code and
data segments, and EBX pointing at an ``hvm_start_info`` (version 1: with a
memory map) that gives the command line, the modules (the first one is the
initrd) and the ACPI RSDP.  No real-mode setup code and no decompressor run:
the kernel starts in its own ``pvh_start_xen`` and builds its page tables.

Owns: finding the note, laying out ``hvm_start_info`` and its tables (at the
addresses of ``vmm.boot.memmap``), and the entry vCPU state.
"""
from __future__ import annotations

import struct
from dataclasses import replace
from typing import Optional

from vmm.boot import memmap
from vmm.boot.elf import BootError, KernelImage
from vmm.kvm import Regs, Segment, Sregs
from vmm.memory import GuestMemory

XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4
HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1

_START_INFO = struct.Struct("<IIIIQQQQII")          # 56 bytes, version 1
_MODLIST_ENTRY = struct.Struct("<QQQQ")              # paddr, size, cmdline_paddr, reserved
_MEMMAP_ENTRY = struct.Struct("<QQII")               # addr, size, type, reserved

CR0_PE, CR0_ET = 1, 1 << 4
GDT_CODE32 = 0x08
GDT_DATA32 = 0x10


def pvh_entry(elf: bytes) -> Optional[int]:
    """The physical PVH entry point from the ELF's notes, or None if it has none."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2:
        return None
    e_phoff, = struct.unpack_from("<Q", elf, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(e_phnum):
        at = e_phoff + i * e_phentsize
        if at + 56 > len(elf):
            return None
        p_type, _flags, p_offset, _v, _p, p_filesz = struct.unpack_from("<IIQQQQ", elf, at)
        if p_type != PT_NOTE:
            continue
        pos, end = p_offset, min(len(elf), p_offset + p_filesz)
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            desc_at = pos + 12 + ((namesz + 3) & ~3)
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and descsz in (4, 8):
                return int.from_bytes(elf[desc_at:desc_at + descsz], "little")
            pos = desc_at + ((descsz + 3) & ~3)
    return None


def _gdt() -> bytes:
    code32 = 0x00CF9A000000FFFF   # present, DPL0, code, execute/read, D=1, G=1
    data32 = 0x00CF92000000FFFF   # present, DPL0, data, read/write, B=1, G=1
    return struct.pack("<QQQ", 0, code32, data32)


def load(mem: GuestMemory, image: KernelImage, entry: int, initial: Sregs, cmdline: bytes,
         initrd: Optional[bytes], rsdp: int) -> tuple[Regs, Sregs]:
    """Load ``image`` at its physical addresses and build ``hvm_start_info``; the entry state."""
    for seg in image.segments:
        if seg.paddr < memmap.HIGH_RAM or seg.paddr + seg.memsz > mem.size:
            raise BootError(
                f"{image.path}: segment at physical {seg.paddr:#x}+{seg.memsz:#x} does not fit in "
                f"{mem.size >> 20} MiB of guest RAM above 1 MiB; use a larger --mem "
                f"(e.g. --mem {((image.end >> 20) + 128) // 64 * 64 + 64}M)")
    for seg in image.segments:
        mem.write(seg.paddr, seg.data)
        mem.write(seg.paddr + len(seg.data), bytes(seg.memsz - len(seg.data)))
    if len(cmdline) + 1 > memmap.CMDLINE_MAX:
        raise BootError(f"kernel command line is {len(cmdline)} bytes; at most {memmap.CMDLINE_MAX - 1} fit")
    mem.write(memmap.CMDLINE_PADDR, cmdline + b"\0")
    nr_modules = 0
    if initrd is not None:
        addr = memmap.initrd_address(mem.size, len(initrd), image.end)
        mem.write(addr, initrd)
        mem.write(memmap.MODLIST_PADDR, _MODLIST_ENTRY.pack(addr, len(initrd), 0, 0))
        nr_modules = 1
    regions = memmap.memory_map(mem.size)
    mem.write(memmap.MEMMAP_PADDR, b"".join(_MEMMAP_ENTRY.pack(r.addr, r.size, r.type, 0) for r in regions))
    mem.write(memmap.START_INFO_PADDR, _START_INFO.pack(
        HVM_START_MAGIC, HVM_START_VERSION, 0, nr_modules,
        memmap.MODLIST_PADDR if nr_modules else 0, memmap.CMDLINE_PADDR, rsdp,
        memmap.MEMMAP_PADDR, len(regions), 0))
    mem.write(memmap.GDT_PADDR, _gdt())

    regs = Regs(rip=entry, rbx=memmap.START_INFO_PADDR, rflags=0x2)
    code = Segment(base=0, limit=0xFFFFFFFF, selector=GDT_CODE32, type=0xB, present=1, dpl=0,
                   db=1, s=1, l=0, g=1)

    def data() -> Segment:
        return Segment(base=0, limit=0xFFFFFFFF, selector=GDT_DATA32, type=0x3, present=1, dpl=0,
                       db=1, s=1, l=0, g=1)
    tss = Segment(base=0, limit=0x67, selector=0, type=0xB, present=1, s=0)
    ldt = Segment(base=0, limit=0xFFFF, selector=0, type=0x2, present=1, s=0, unusable=0)
    sregs = replace(initial, cs=code, ds=data(), es=data(), fs=data(), gs=data(), ss=data(), tr=tss,
                    ldt=ldt, gdt_base=memmap.GDT_PADDR, gdt_limit=3 * 8 - 1, idt_base=0, idt_limit=0,
                    cr0=CR0_PE | CR0_ET, cr2=0, cr3=0, cr4=0, cr8=0, efer=0,
                    interrupt_bitmap=(0, 0, 0, 0))
    return regs, sregs
