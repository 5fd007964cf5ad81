"""Guest physical memory: one anonymous host mapping registered as KVM slot 0.

Guest physical address 0 maps to offset 0 of the mapping.  Every access is
bounds-checked and fails with ``GuestMemoryError`` naming the address.
"""
from __future__ import annotations

import mmap

from vmm._native import ffi

PAGE_SIZE = 4096
MIN_MEM = 2 << 20
# Our boot page tables identity-map 4 GiB; keep RAM below the PC's PCI hole.
MAX_MEM = 3 << 30


class GuestMemoryError(Exception):
    pass


def parse_size(text: str) -> int:
    """'64M', '1G', '65536', '512K' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    mult = 1
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    try:
        value = int(t) * mult
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 64M, 1G, 131072)") from None
    return value


class GuestMemory:
    def __init__(self, size: int):
        if size % PAGE_SIZE or not MIN_MEM <= size <= MAX_MEM:
            raise GuestMemoryError(
                f"guest memory size {size:#x} must be a multiple of 4 KiB between "
                f"{MIN_MEM >> 20} MiB and {MAX_MEM >> 30} GiB")
        self.size = size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
        self._cdata = ffi.from_buffer(self._map)
        self.host_addr = int(ffi.cast("uintptr_t", self._cdata))
        self.view = memoryview(self._map)
        # Pages the VMM itself wrote (the loader): with the guest's writes,
        # which KVM's dirty log reports, they are every page that can be
        # non-zero, so a full snapshot need not scan all of RAM.
        self.host_written: set[int] = set()

    def _check(self, paddr: int, length: int) -> None:
        if paddr < 0 or length < 0 or paddr + length > self.size:
            raise GuestMemoryError(
                f"guest physical range {paddr:#x}..{paddr + length:#x} is outside guest RAM "
                f"(0..{self.size:#x})")

    def read(self, paddr: int, length: int) -> bytes:
        self._check(paddr, length)
        return bytes(self.view[paddr:paddr + length])

    def write(self, paddr: int, data: bytes) -> None:
        self._check(paddr, len(data))
        self.view[paddr:paddr + len(data)] = data
        if data:
            self.host_written.update(range(paddr // PAGE_SIZE, (paddr + len(data) - 1) // PAGE_SIZE + 1))

    def read_u64(self, paddr: int) -> int:
        self._check(paddr, 8)
        return int.from_bytes(self.view[paddr:paddr + 8], "little")

    def close(self) -> None:
        if self._map.closed:
            return
        self.view.release()
        ffi.release(self._cdata)
        self._map.close()
