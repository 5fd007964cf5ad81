"""Guest virtual -> physical translation by walking the guest's page tables.

KVM_TRANSLATE answers valid=0 on some hosts (see PLATFORM.md), so every
virtual address lookup in rrstub (debugger memory access, disassembly of the
faulting instruction) goes through this one walker.  It handles 4-level
long-mode paging with 4 KiB, 2 MiB and 1 GiB pages, and returns the
physical address plus what the walk learned about permissions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_USER = 1 << 2
PTE_HUGE = 1 << 7          # PS bit in a PDPTE (1 GiB) or PDE (2 MiB)
PTE_NX = 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000

CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10


class PhysicalMemory(Protocol):
    size: int

    def read(self, paddr: int, length: int) -> bytes: ...

    def read_u64(self, paddr: int) -> int: ...


class PageFault(Exception):
    """The address is not mapped (or not canonical) in the given page tables."""

    def __init__(self, vaddr: int, level: int, reason: str):
        self.vaddr = vaddr
        self.level = level
        super().__init__(f"virtual address {vaddr:#x} is not mapped: {reason}")


@dataclass(frozen=True, slots=True)
class Translation:
    paddr: int
    page_size: int
    writable: bool
    user: bool
    executable: bool


_LEVEL_NAMES = {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}


def translate(mem: PhysicalMemory, cr3: int, vaddr: int) -> Translation:
    """Walk 4-level paging rooted at ``cr3`` for ``vaddr``."""
    vaddr &= (1 << 64) - 1
    top = vaddr >> 47
    if top not in (0, (1 << 17) - 1):
        raise PageFault(vaddr, 4, "non-canonical address")
    table = cr3 & ADDR_MASK
    writable = user = executable = True
    for level in (4, 3, 2, 1):
        shift = 12 + 9 * (level - 1)
        index = (vaddr >> shift) & 0x1FF
        entry_addr = table + index * 8
        if entry_addr + 8 > mem.size:
            raise PageFault(vaddr, level, f"{_LEVEL_NAMES[level]} at physical {entry_addr:#x} is outside RAM")
        entry = mem.read_u64(entry_addr)
        if not entry & PTE_PRESENT:
            raise PageFault(vaddr, level, f"{_LEVEL_NAMES[level]} {index} not present")
        writable &= bool(entry & PTE_WRITE)
        user &= bool(entry & PTE_USER)
        executable &= not entry & PTE_NX
        if level in (3, 2) and entry & PTE_HUGE or level == 1:
            page_size = 1 << shift
            base = entry & ADDR_MASK & ~(page_size - 1)
            return Translation(base | (vaddr & (page_size - 1)), page_size, writable, user, executable)
        table = entry & ADDR_MASK
    raise AssertionError("unreachable: level 1 always returns")


def virt_to_phys(mem: PhysicalMemory, cr0: int, cr3: int, cr4: int, efer: int, vaddr: int) -> int:
    """Translate under the vCPU's current mode: identity when paging is off."""
    if not cr0 & CR0_PG:
        return vaddr & 0xFFFF_FFFF
    if not (cr4 & CR4_PAE and efer & EFER_LMA) or cr4 & CR4_LA57:
        raise PageFault(vaddr, 0, "only 4-level long-mode paging is supported")
    return translate(mem, cr3, vaddr).paddr


def read_virtual(mem: PhysicalMemory, cr0: int, cr3: int, cr4: int, efer: int,
                 vaddr: int, length: int) -> bytes:
    """Read ``length`` bytes at ``vaddr``, crossing page boundaries as needed."""
    out = bytearray()
    while length > 0:
        paddr = virt_to_phys(mem, cr0, cr3, cr4, efer, vaddr)
        chunk = min(length, 4096 - (vaddr & 0xFFF))
        if paddr + chunk > mem.size:
            raise PageFault(vaddr, 0, f"maps to physical {paddr:#x}, outside RAM")
        out += mem.read(paddr, chunk)
        vaddr += chunk
        length -= chunk
    return bytes(out)
