"""The memory and device halves of a marker, and the sealed blob format all halves share.

A marker is what a replay needs to resume at a point: the vCPU state
(``vmm.kvm.VcpuState``, encoded by ``vmm.kvm.encode_vcpu_state``), guest
RAM (a page set from ``encode_pages``: all of RAM for a full marker, the
dirty pages for an incremental one) and the device models' ``state()``
dataclasses (``encode_devices``).

Invariants:
* Every blob is sealed: a 4-byte magic naming its kind, a format version, the
  payload length, the payload, and a CRC-32 of all that.  A reader refuses
  another kind, a truncated or corrupted blob, and a newer version, each with
  a ``SnapshotError`` saying which.  All integers are little-endian.
* Decoding never runs code named by the blob: device states are rebuilt only
  as frozen dataclasses defined in ``vmm.devices.*``, from a closed set of
  value types (None, bool, int, bytes, tuple, those dataclasses).
* A page set is applied all or nothing: it is checked completely before the
  first byte of guest memory changes.
* ``DirtyTracker`` sees only writes made by the guest through KVM; the VMM's
  own writes into guest RAM (loading a kernel, a device doing DMA) are not in
  KVM's dirty log.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import pkgutil
import struct
import zlib
from dataclasses import fields, is_dataclass
from typing import Iterable, Union

from vmm._native import lib
from vmm.memory import PAGE_SIZE, GuestMemory

# The memslot flag that makes KVM_GET_DIRTY_LOG report a slot's writes.
LOG_DIRTY_PAGES = lib.KVM_MEM_LOG_DIRTY_PAGES

PAGES_MAGIC = b"RRPG"
PAGES_VERSION = 1
DEVICES_MAGIC = b"RRDV"
DEVICES_VERSION = 1

ZERO_PAGE = bytes(PAGE_SIZE)

_SEAL_HEADER = struct.Struct("<4sHQ")   # magic, version, payload length
_SEAL_CRC = struct.Struct("<I")

Memory = Union[GuestMemory, bytearray, memoryview]


class SnapshotError(Exception):
    """A snapshot blob is not one this rrstub can read (wrong kind, damaged, newer)."""


def _view(mem: Memory) -> memoryview:
    return mem.view if isinstance(mem, GuestMemory) else memoryview(mem)


# ---------------------------------------------------------------------------
# The sealed envelope


def seal(magic: bytes, version: int, parts: Iterable[bytes]) -> bytes:
    """One blob: header, the parts concatenated (copied once), CRC-32 of both."""
    parts = list(parts)
    header = _SEAL_HEADER.pack(magic, version, sum(len(p) for p in parts))
    crc = zlib.crc32(header)
    for p in parts:
        crc = zlib.crc32(p, crc)
    return b"".join([header, *parts, _SEAL_CRC.pack(crc)])


def unseal(blob: bytes, magic: bytes, newest: int, what: str) -> tuple[int, memoryview]:
    """(version, payload) of a blob sealed with ``magic``; SnapshotError names ``what`` otherwise."""
    view = memoryview(blob).cast("B")
    if len(view) < _SEAL_HEADER.size + _SEAL_CRC.size:
        raise SnapshotError(f"{what}: {len(view)} bytes is too short to be one")
    found, version, length = _SEAL_HEADER.unpack_from(view)
    if found != magic:
        raise SnapshotError(f"{what}: starts with {found!r}, expected {magic!r}")
    if version > newest:
        raise SnapshotError(f"{what}: format version {version} was written by a newer rrstub "
                            f"(this one reads versions up to {newest})")
    if version == 0:
        raise SnapshotError(f"{what}: format version 0 does not exist")
    end = _SEAL_HEADER.size + length
    if end + _SEAL_CRC.size != len(view):
        raise SnapshotError(f"{what}: header says {length} payload bytes, blob holds "
                            f"{len(view) - _SEAL_HEADER.size - _SEAL_CRC.size}")
    (crc,) = _SEAL_CRC.unpack_from(view, end)
    if zlib.crc32(view[:end]) != crc:
        raise SnapshotError(f"{what}: checksum mismatch (the blob is damaged)")
    return version, view[_SEAL_HEADER.size:end]


class Reader:
    """Reads fixed structures off a payload; running past its end is a SnapshotError."""

    def __init__(self, payload: memoryview, what: str):
        self.buf = payload
        self.pos = 0
        self.what = what

    def unpack(self, fmt: struct.Struct) -> tuple:
        if self.pos + fmt.size > len(self.buf):
            raise SnapshotError(f"{self.what}: truncated at byte {self.pos}")
        values = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return values

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise SnapshotError(f"{self.what}: a {n}-byte field at byte {self.pos} runs past the end")
        piece = self.buf[self.pos:self.pos + n]
        self.pos += n
        return piece

    def finish(self) -> None:
        if self.pos != len(self.buf):
            raise SnapshotError(f"{self.what}: {len(self.buf) - self.pos} unexpected bytes at the end")


# ---------------------------------------------------------------------------
# Guest memory


def memory_digest(mem: Memory) -> bytes:
    """A 16-byte hash of all of guest RAM (end-of-run comparisons)."""
    return hashlib.blake2b(_view(mem), digest_size=16).digest()


def nonzero_pages(mem: Memory) -> list[int]:
    """Page numbers of the pages holding any non-zero byte, ascending."""
    view = _view(mem)
    # bytes(slice) == ZERO_PAGE is a memcpy and a memcmp; comparing the
    # memoryview slice directly goes element by element and is 10x slower.
    return [p for p in range(len(view) // PAGE_SIZE)
            if bytes(view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]) != ZERO_PAGE]


_PAGES_HEADER = struct.Struct("<III")   # page size, zero pages, stored pages


def encode_pages(mem: Memory, page_numbers: Iterable[int], *, elide_zero: bool = True) -> bytes:
    """The listed pages (duplicates dropped, ascending) with their contents.

    With ``elide_zero`` a page of zeros is listed, not stored, and applying
    the blob writes zeros there.
    """
    view = _view(mem)
    npages = len(view) // PAGE_SIZE
    pages = sorted(set(page_numbers))
    if pages and not 0 <= pages[0] <= pages[-1] < npages:
        raise ValueError(f"page numbers must lie in 0..{npages - 1}, got {pages[0]}..{pages[-1]}")
    zeros, stored, contents = [], [], []
    for p in pages:
        page = view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
        if elide_zero and bytes(page) == ZERO_PAGE:
            zeros.append(p)
        else:
            stored.append(p)
            contents.append(page)
    return seal(PAGES_MAGIC, PAGES_VERSION, [
        _PAGES_HEADER.pack(PAGE_SIZE, len(zeros), len(stored)),
        struct.pack(f"<{len(zeros)}I", *zeros),
        struct.pack(f"<{len(stored)}I", *stored),
        *contents,
    ])


def _page_list(r: Reader, n: int, npages: int, kind: str) -> list[int]:
    pages = list(r.unpack(struct.Struct(f"<{n}I")))
    if any(a >= b for a, b in zip(pages, pages[1:])):
        raise SnapshotError(f"{r.what}: {kind} page numbers are not strictly ascending")
    if pages and pages[-1] >= npages:
        raise SnapshotError(f"{r.what}: {kind} page {pages[-1]} lies beyond guest RAM "
                            f"({npages} pages)")
    return pages


def decode_pages(blob: bytes, npages: int) -> list[tuple[int, bytes]]:
    """The (page number, contents) pairs of a page set from ``encode_pages``, zero pages included."""
    what = "page set"
    _, payload = unseal(blob, PAGES_MAGIC, PAGES_VERSION, what)
    r = Reader(payload, what)
    page_size, nzero, nstored = r.unpack(_PAGES_HEADER)
    if page_size != PAGE_SIZE:
        raise SnapshotError(f"{what}: page size {page_size}, this rrstub uses {PAGE_SIZE}")
    if (nzero + nstored) * 4 + nstored * PAGE_SIZE != len(payload) - _PAGES_HEADER.size:
        raise SnapshotError(f"{what}: {nzero} zero and {nstored} stored pages do not fill "
                            f"{len(payload)} payload bytes")
    zeros = _page_list(r, nzero, npages, "zero")
    stored = _page_list(r, nstored, npages, "stored")
    if not set(zeros).isdisjoint(stored):
        raise SnapshotError(f"{what}: a page is listed both as zero and as stored")
    data = bytes(r.take(nstored * PAGE_SIZE))
    r.finish()
    return [(p, ZERO_PAGE) for p in zeros] + [(p, data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
                                              for i, p in enumerate(stored)]


def apply_pages(mem: Memory, blob: bytes) -> int:
    """Write a page set from ``encode_pages`` into ``mem``; returns how many pages it set."""
    view = _view(mem)
    pages = decode_pages(blob, len(view) // PAGE_SIZE)
    for p, data in pages:
        view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = data
    return len(pages)


class DirtyTracker:
    """Pages of one memslot the guest wrote since the last ``reset()``.

    The slot must be registered with ``LOG_DIRTY_PAGES``.  KVM_GET_DIRTY_LOG
    clears KVM's log as it reads it, so every read is ORed into an
    accumulated set here and nothing the guest wrote is lost between
    ``collect()`` calls.  Page numbers are relative to the slot's start.
    """

    def __init__(self, vm, slot: int, mem_size: int):
        self.vm = vm
        self.slot = slot
        self.npages = mem_size // PAGE_SIZE
        self._dirty = 0          # bit p set: page p written since the last reset
        self._pages: list[int] = []
        # A second interval with its own start (``mark``), which ``reset``
        # does not end: pages written since a recorded marker, while the
        # replay timeline resets the first interval at its own checkpoints.
        self.marked = 0

    def collect(self) -> None:
        """Fold KVM's dirty log (and clear it) into the accumulated sets."""
        bits = int.from_bytes(self.vm.get_dirty_log(self.slot, self.npages), "little")
        self._dirty |= bits
        self.marked |= bits
        self._pages = _set_bits(self._dirty)

    def mark(self) -> None:
        """Start the second interval here (``collect()`` first, or earlier writes join it)."""
        self.marked = 0

    def marked_digest(self, mem: Memory, extra: Iterable[int] = ()) -> int:
        """``digest`` of the pages written since ``mark()`` (as of the last ``collect()``) and ``extra``."""
        return pages_digest(mem, sorted(set(_set_bits(self.marked)).union(extra)))

    def take_new(self) -> list[int]:
        """Pages written since KVM's log was last read, ascending; clears KVM's log WITHOUT
        adding them to the accumulated set (for writes the caller undoes at once: a VAssert
        evaluation, rrstub/vassert.py).  ``collect()`` first, or earlier writes are lost."""
        bitmap = self.vm.get_dirty_log(self.slot, self.npages)
        return _set_bits(int.from_bytes(bitmap, "little"))

    def pages(self) -> list[int]:
        """Accumulated dirty page numbers as of the last ``collect()``, ascending."""
        return list(self._pages)

    def reset(self) -> None:
        """Start a new interval: collect what KVM holds, then forget all of it (but not ``marked``)."""
        self.collect()
        self._dirty = 0
        self._pages = []

    def digest(self, mem: Memory) -> int:
        """A 64-bit hash of ``pages()``: their numbers, then their contents in that order."""
        return pages_digest(mem, self._pages)


def pages_digest(mem: Memory, pages: list[int]) -> int:
    """A 64-bit hash of guest pages: their numbers (ascending), then their contents in that order."""
    view = _view(mem)
    h = hashlib.blake2b(struct.pack(f"<{len(pages)}Q", *pages), digest_size=8)
    for p in pages:
        h.update(view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE])
    return int.from_bytes(h.digest(), "little")


def _set_bits(x: int) -> list[int]:
    # bin() and str.find scan in C: one Python step per set bit, not per page.
    bits = bin(x)[:1:-1]   # least significant bit first, '0b' dropped
    out = []
    i = bits.find("1")
    while i >= 0:
        out.append(i)
        i = bits.find("1", i + 1)
    return out


# ---------------------------------------------------------------------------
# Device states

_NONE, _FALSE, _TRUE, _INT, _BYTES, _TUPLE, _STATE = range(7)
_MAX_DEPTH = 16
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

@functools.cache
def state_classes() -> dict[str, type]:
    """Every frozen dataclass defined in a vmm.devices module, by 'module.QualName'.

    The only classes a device-state blob may name.  Imported on first use:
    vmm.devices.hypercall imports vmm.kvm, which imports this module.
    """
    import vmm.devices
    found = {}
    for info in pkgutil.iter_modules(vmm.devices.__path__, "vmm.devices."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (isinstance(obj, type) and is_dataclass(obj) and obj.__module__ == module.__name__
                    and obj.__dataclass_params__.frozen):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def _name(text: str, size: struct.Struct) -> list[bytes]:
    raw = text.encode()
    return [size.pack(len(raw)), raw]


def _encode_value(value, out: list[bytes], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise SnapshotError(f"device state nests deeper than {_MAX_DEPTH} levels")
    kind = type(value)
    if value is None:
        out.append(_U8.pack(_NONE))
    elif kind is bool:
        out.append(_U8.pack(_TRUE if value else _FALSE))
    elif kind is int:
        raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        if len(raw) > 255:
            raise SnapshotError(f"device state integer of {value.bit_length()} bits is too large")
        out += [_U8.pack(_INT), _U8.pack(len(raw)), raw]
    elif kind is bytes:
        out += [_U8.pack(_BYTES), _U32.pack(len(value)), value]
    elif kind is tuple:
        out += [_U8.pack(_TUPLE), _U32.pack(len(value))]
        for item in value:
            _encode_value(item, out, depth + 1)
    else:
        name = f"{kind.__module__}.{kind.__qualname__}"
        if state_classes().get(name) is not kind:
            raise SnapshotError(f"device state holds a {name}, which is not a frozen dataclass of "
                                "vmm.devices (or one of None, bool, int, bytes, tuple)")
        names = [f.name for f in fields(kind)]
        out += [_U8.pack(_STATE), *_name(name, _U16), _U16.pack(len(names))]
        for field_name in names:
            out += _name(field_name, _U8)
            _encode_value(getattr(value, field_name), out, depth + 1)


def _decode_name(r: Reader, size: struct.Struct) -> str:
    (n,) = r.unpack(size)
    try:
        return str(r.take(n), "utf-8")
    except UnicodeDecodeError:
        raise SnapshotError(f"{r.what}: a name at byte {r.pos - n} is not UTF-8") from None


def _decode_value(r: Reader, depth: int):
    if depth > _MAX_DEPTH:
        raise SnapshotError(f"{r.what}: values nest deeper than {_MAX_DEPTH} levels")
    (tag,) = r.unpack(_U8)
    if tag == _NONE:
        return None
    if tag in (_FALSE, _TRUE):
        return tag == _TRUE
    if tag == _INT:
        (n,) = r.unpack(_U8)
        return int.from_bytes(r.take(n), "little", signed=True)
    if tag == _BYTES:
        (n,) = r.unpack(_U32)
        return bytes(r.take(n))
    if tag == _TUPLE:
        (n,) = r.unpack(_U32)
        if n > len(r.buf) - r.pos:   # every item takes at least one byte
            raise SnapshotError(f"{r.what}: a tuple of {n} items cannot fit in what is left")
        return tuple(_decode_value(r, depth + 1) for _ in range(n))
    if tag == _STATE:
        name = _decode_name(r, _U16)
        cls = state_classes().get(name)
        if cls is None:
            raise SnapshotError(f"{r.what}: names class {name!r}, which is not a device state "
                                "of this rrstub")
        (n,) = r.unpack(_U16)
        values = {}
        for _ in range(n):
            field_name = _decode_name(r, _U8)
            values[field_name] = _decode_value(r, depth + 1)
        expected = [f.name for f in fields(cls)]
        if sorted(values) != sorted(expected) or len(values) != n:
            raise SnapshotError(f"{r.what}: {name} has fields {sorted(values)}, this rrstub's "
                                f"has {sorted(expected)}")
        return cls(**values)
    raise SnapshotError(f"{r.what}: unknown value tag {tag} at byte {r.pos - 1}")


def encode_devices(states: dict[str, object]) -> bytes:
    """Device name -> ``state()`` dataclass, as one sealed blob."""
    out = [_U32.pack(len(states))]
    for name, state in states.items():
        out += _name(name, _U16)
        _encode_value(state, out, 0)
    return seal(DEVICES_MAGIC, DEVICES_VERSION, out)


def decode_devices(blob: bytes) -> dict[str, object]:
    what = "device states"
    _, payload = unseal(blob, DEVICES_MAGIC, DEVICES_VERSION, what)
    r = Reader(payload, what)
    (n,) = r.unpack(_U32)
    states = {}
    for _ in range(n):
        name = _decode_name(r, _U16)
        if name in states:
            raise SnapshotError(f"{what}: device {name!r} appears twice")
        states[name] = _decode_value(r, 0)
    r.finish()
    return states
