"""Build tiny ELF64 kernels from raw machine code, for tests of the loader and of crashes."""
from __future__ import annotations

import struct

LOAD_ADDR = 0x100000


def make_elf(code: bytes, paddr: int = LOAD_ADDR, vaddr: int | None = None, entry: int | None = None,
             memsz: int | None = None, elf_class: int = 2, machine: int = 62, e_type: int = 2) -> bytes:
    """One PT_LOAD segment holding ``code`` at ``paddr`` (virtual ``vaddr``, default the same)."""
    vaddr = paddr if vaddr is None else vaddr
    entry = vaddr if entry is None else entry
    memsz = len(code) if memsz is None else memsz
    ehdr_size, phdr_size = 64, 56
    offset = ehdr_size + phdr_size
    ident = b"\x7fELF" + bytes([elf_class, 1, 1, 0]) + bytes(8)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, e_type, machine, 1, entry, ehdr_size, 0, 0,
                       ehdr_size, phdr_size, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, offset, vaddr, paddr, len(code), memsz, 0x1000)
    return ehdr + phdr + code
