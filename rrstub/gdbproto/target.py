"""The x86-64 target description served to gdb, and the register packing.

One table, ``REGISTERS``, drives both the XML (``TARGET_XML``) and the byte
layout of ``g``/``p`` replies, so the two cannot disagree.

Invariants:

* A register's number (its ``regnum`` in the XML, its ``p``/``P`` number)
  is its index in ``REGISTERS``; the ``g`` packet is the registers in that
  order, each little-endian at its own width, with no gaps
  (``G_PACKET_SIZE`` is the sum of the sizes).
* The features are the ones GDB 13's amd64 support validates by name:
  ``org.gnu.gdb.i386.core`` (general registers, eflags, segment selectors,
  x87), ``org.gnu.gdb.i386.sse`` (xmm0-15, mxcsr) and
  ``org.gnu.gdb.i386.segments`` (fs_base, gs_base).  The system registers a
  kernel debugger needs live in a feature of our own,
  ``org.rrstub.x86.system``, which GDB shows as plain named registers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

_CORE = "org.gnu.gdb.i386.core"
_SSE = "org.gnu.gdb.i386.sse"
_SEGMENTS = "org.gnu.gdb.i386.segments"
_SYSTEM = "org.rrstub.x86.system"


@dataclass(frozen=True)
class Register:
    """One register: its place in the ``g`` packet and its XML attributes."""
    name: str
    bits: int
    offset: int        # byte offset in the g packet
    type: str
    feature: str
    group: str = ""

    @property
    def size(self) -> int:
        return self.bits // 8


# (name, bits, type, feature, group) in g-packet order.
_SPECS: tuple[tuple[str, int, str, str, str], ...] = (
    *((name, 64, "int64", _CORE, "") for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi")),
    ("rbp", 64, "data_ptr", _CORE, ""),
    ("rsp", 64, "data_ptr", _CORE, ""),
    *((f"r{n}", 64, "int64", _CORE, "") for n in range(8, 16)),
    ("rip", 64, "code_ptr", _CORE, ""),
    ("eflags", 32, "i386_eflags", _CORE, ""),
    *((name, 32, "int32", _CORE, "") for name in ("cs", "ss", "ds", "es", "fs", "gs")),
    *((f"st{n}", 80, "i387_ext", _CORE, "") for n in range(8)),
    *((name, 32, "int32", _CORE, "float")
      for name in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")),
    *((f"xmm{n}", 128, "vec128", _SSE, "") for n in range(16)),
    ("mxcsr", 32, "i386_mxcsr", _SSE, "vector"),
    ("fs_base", 64, "int64", _SEGMENTS, ""),
    ("gs_base", 64, "int64", _SEGMENTS, ""),
    *((name, 64, "uint64", _SYSTEM, "system")
      for name in ("k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer")),
)


def _layout() -> tuple[Register, ...]:
    registers = []
    offset = 0
    for name, bits, type_, feature, group in _SPECS:
        registers.append(Register(name, bits, offset, type_, feature, group))
        offset += bits // 8
    return tuple(registers)


REGISTERS: tuple[Register, ...] = _layout()
REGISTER_INDEX: dict[str, int] = {reg.name: n for n, reg in enumerate(REGISTERS)}
G_PACKET_SIZE: int = sum(reg.size for reg in REGISTERS)


def _flags(type_id: str, size: int, fields: tuple[tuple[str, int], ...]) -> str:
    lines = "".join(f'\n    <field name="{name}" start="{bit}" end="{bit}"/>' for name, bit in fields)
    return f'  <flags id="{type_id}" size="{size}">{lines}\n  </flags>\n'


_EFLAGS_TYPE = _flags("i386_eflags", 4, (
    ("CF", 0), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9),
    ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18),
    ("VIF", 19), ("VIP", 20), ("ID", 21)))

_MXCSR_TYPE = _flags("i386_mxcsr", 4, (
    ("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6),
    ("IM", 7), ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15)))

_VEC128_TYPE = """\
  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v4_float" type="v4f"/>
    <field name="v2_double" type="v2d"/>
    <field name="v16_int8" type="v16i8"/>
    <field name="v8_int16" type="v8i16"/>
    <field name="v4_int32" type="v4i32"/>
    <field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>
"""

_FEATURE_TYPES = {_CORE: _EFLAGS_TYPE, _SSE: _VEC128_TYPE + _MXCSR_TYPE}


def _target_xml() -> str:
    parts = ['<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n<target>\n'
             "  <architecture>i386:x86-64</architecture>\n"]
    features = list(dict.fromkeys(reg.feature for reg in REGISTERS))
    for feature in features:
        parts.append(f'<feature name="{feature}">\n')
        parts.append(_FEATURE_TYPES.get(feature, ""))
        for number, reg in enumerate(REGISTERS):
            if reg.feature == feature:
                group = f' group="{reg.group}"' if reg.group else ""
                parts.append(f'  <reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}"'
                             f' regnum="{number}"{group}/>\n')
        parts.append("</feature>\n")
    parts.append("</target>\n")
    return "".join(parts)


TARGET_XML: str = _target_xml()


def encode_register(number: int, values: Mapping[str, int | bytes]) -> bytes:
    """Register ``number``'s bytes, little-endian at its width.

    ``values[name]`` is an unsigned int that fits the width, or bytes of
    exactly the register's size.  Raises ValueError for an unknown number, a
    missing register or a value that does not fit.
    """
    if not 0 <= number < len(REGISTERS):
        raise ValueError(f"no register number {number}")
    reg = REGISTERS[number]
    if reg.name not in values:
        raise ValueError(f"missing value for register {reg.name}")
    value = values[reg.name]
    if isinstance(value, bytes):
        if len(value) != reg.size:
            raise ValueError(f"{reg.name} needs {reg.size} bytes, got {len(value)}")
        return value
    if not 0 <= value < 1 << reg.bits:
        raise ValueError(f"{reg.name} value {value:#x} does not fit in {reg.bits} bits")
    return value.to_bytes(reg.size, "little")


def encode_registers(values: Mapping[str, int | bytes]) -> bytes:
    """The ``g`` packet's register file (``G_PACKET_SIZE`` bytes); names not
    in ``REGISTERS`` are ignored, a missing register raises ValueError."""
    return b"".join(encode_register(number, values) for number in range(len(REGISTERS)))
