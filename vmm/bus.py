"""The port-I/O bus: maps x86 I/O ports to device models.

Devices see offsets from the base they were inserted at, never absolute
ports.  Ranges never overlap (``insert`` refuses).  A port nobody claims
reads as all ones and ignores writes, as on a PC's ISA bus.
"""
from __future__ import annotations

import bisect
from typing import Protocol


class PortDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusError(Exception):
    pass


class PortBus:
    def __init__(self) -> None:
        self._bases: list[int] = []
        self._ranges: list[tuple[int, int, PortDevice]] = []  # (base, length, dev), sorted by base

    def insert(self, device: PortDevice, base: int, length: int) -> None:
        if length <= 0 or base < 0 or base + length > 0x10000:
            raise BusError(f"bad port range {base:#x}+{length}")
        i = bisect.bisect_left(self._bases, base)
        if i > 0:
            pbase, plen, pdev = self._ranges[i - 1]
            if pbase + plen > base:
                raise BusError(f"ports {base:#x}+{length} overlap {type(pdev).__name__} at {pbase:#x}+{plen}")
        if i < len(self._ranges):
            nbase, nlen, ndev = self._ranges[i]
            if base + length > nbase:
                raise BusError(f"ports {base:#x}+{length} overlap {type(ndev).__name__} at {nbase:#x}+{nlen}")
        self._bases.insert(i, base)
        self._ranges.insert(i, (base, length, device))

    def find(self, port: int) -> tuple[PortDevice, int] | None:
        i = bisect.bisect_right(self._bases, port) - 1
        if i >= 0:
            base, length, dev = self._ranges[i]
            if port < base + length:
                return dev, port - base
        return None

    def read(self, port: int, size: int) -> int:
        hit = self.find(port)
        if hit is None:
            return (1 << (8 * size)) - 1
        dev, offset = hit
        return dev.read(offset, size) & ((1 << (8 * size)) - 1)

    def write(self, port: int, size: int, value: int) -> None:
        hit = self.find(port)
        if hit is not None:
            dev, offset = hit
            dev.write(offset, size, value & ((1 << (8 * size)) - 1))
