"""ACPI fixed hardware: the PM1a event block and the PM1a control block.

One device covers both blocks, six consecutive ports (``vmm.boot.acpi``
puts them at 0x600 and says so in the FADT):

  offset 0  PM1_STS  16 bits, write 1 to clear
  offset 2  PM1_EN   16 bits, read/write
  offset 4  PM1_CNT  16 bits: SCI_EN (bit 0), BM_RLD (1), GBL_RLS (2, write-only),
                     SLP_TYP (10..12), SLP_EN (13, write-only)

It is there so that a Linux guest can power off: writing SLP_EN with
SLP_TYP = ``SLP_TYP_S5`` (the value the DSDT's ``_S5`` reports) calls
``power_off``.

Owns the three registers' stored bits.  There is no PM timer, no GPE block
and no PM1b block (the FADT describes none).

Invariants:
* No SCI is ever raised: the device has no interrupt line at all.  Nothing
  sets a PM1_STS bit (no timer, no buttons, no RTC or wake events, no
  global-lock handshake: nothing here owns the global lock); PM1_STS keeps
  what ``restore`` put there and loses bits only when the guest writes 1s.
* SCI_EN always reads 1 (the FADT's SMI_CMD is 0: the machine is always in
  ACPI mode); writes to it are ignored.  GBL_RLS and SLP_EN read 0.
* PM1_EN keeps exactly its defined enable bits (TMR, GBL, PWRBTN, SLPBTN,
  RTC, PCIEXP_WAKE_DIS) as written, so OSPM's read-back of an enable (which
  ACPICA does for the global lock) succeeds; enabling changes nothing else.
* A write with SLP_EN set is a sleep request for the SLP_TYP that PM1_CNT
  then holds.  ``SLP_TYP_S5`` calls ``power_off`` (once per such write);
  any other type is ignored, and SLP_TYP just reads back as written.  The
  DSDT offers only \\_S0 and \\_S5, so OSPM never asks for S1..S4; one that
  did anyway would wait for WAK_STS forever, as on a board without them.
* Every access width works, at any offset: an access is split into bytes,
  each register sees the bytes that fall in it, merged with its current
  value (a byte write to offset 5 alone can request sleep).  Bytes past
  offset 5 read as 0xFF and ignore writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

PORT_COUNT = 6
PM1_STS = 0
PM1_EN = 2
PM1_CNT = 4
PM1_EVT_LEN = 4   # PM1_STS + PM1_EN
PM1_CNT_LEN = 2
REGISTER_BYTES = 2

# PM1_STS / PM1_EN bits (ACPI 6.x section 4.8.3.1)
TMR_STS = 1 << 0
BM_STS = 1 << 4
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
PCIEXP_WAKE_STS = 1 << 14
WAK_STS = 1 << 15
STS_BITS = (TMR_STS | BM_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS
            | PCIEXP_WAKE_STS | WAK_STS)

TMR_EN = 1 << 0
GBL_EN = 1 << 5
PWRBTN_EN = 1 << 8
SLPBTN_EN = 1 << 9
RTC_EN = 1 << 10
PCIEXP_WAKE_DIS = 1 << 14
EN_BITS = TMR_EN | GBL_EN | PWRBTN_EN | SLPBTN_EN | RTC_EN | PCIEXP_WAKE_DIS

# PM1_CNT bits (ACPI 6.x section 4.8.3.2.1)
SCI_EN = 1 << 0
BM_RLD = 1 << 1
GBL_RLS = 1 << 2
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
CNT_STORED = BM_RLD | SLP_TYP_MASK

# This board's sleep-type encodings, which the DSDT's \_S0 and \_S5 report.
SLP_TYP_S0 = 0
SLP_TYP_S5 = 5

_FLOATING = 0xFF


@dataclass(frozen=True, slots=True)
class AcpiPmState:
    status: int    # PM1_STS bits
    enable: int    # PM1_EN bits
    control: int   # PM1_CNT's stored bits (BM_RLD, SLP_TYP); SCI_EN is not state


class AcpiPm:
    """PM1a_EVT_BLK and PM1a_CNT_BLK; ``power_off`` is called on a request for S5."""

    def __init__(self, power_off: Callable[[], None]) -> None:
        self._power_off = power_off
        self._status = 0
        self._enable = 0
        self._control = 0

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for reg in (PM1_STS, PM1_EN, PM1_CNT):
            lanes = data = 0
            for i in range(size):
                byte = offset + i - reg
                if 0 <= byte < REGISTER_BYTES:
                    lanes |= 0xFF << (8 * byte)
                    data |= ((value >> (8 * i)) & 0xFF) << (8 * byte)
            if lanes:
                self._write_register(reg, data, lanes)

    def state(self) -> AcpiPmState:
        return AcpiPmState(status=self._status, enable=self._enable, control=self._control)

    def restore(self, state: AcpiPmState) -> None:
        self._status = state.status & STS_BITS
        self._enable = state.enable & EN_BITS
        self._control = state.control & CNT_STORED

    def _register(self, reg: int) -> int:
        if reg == PM1_STS:
            return self._status
        if reg == PM1_EN:
            return self._enable
        return self._control | SCI_EN

    def _read_byte(self, offset: int) -> int:
        if not 0 <= offset < PORT_COUNT:
            return _FLOATING
        reg = offset - offset % REGISTER_BYTES
        return (self._register(reg) >> (8 * (offset - reg))) & 0xFF

    def _write_register(self, reg: int, data: int, lanes: int) -> None:
        """``data`` holds the written bytes at their places; ``lanes`` masks them."""
        if reg == PM1_STS:
            self._status &= ~data
        elif reg == PM1_EN:
            self._enable = ((self._enable & ~lanes) | data) & EN_BITS
        else:
            merged = (self._control & ~lanes) | data
            self._control = merged & CNT_STORED
            if data & SLP_EN and (merged & SLP_TYP_MASK) >> SLP_TYP_SHIFT == SLP_TYP_S5:
                self._power_off()
