"""The CMOS real-time clock (MC146818) and its 128 bytes of CMOS memory.

Owns the index port (with the NMI mask bit), the calendar registers, the
control registers A-D, the periodic and update-ended interrupts on IRQ 8,
and the plain CMOS storage.  The time is never ticked: the guest sees
``base_ns + clock.now_ns()`` as UNIX time (``base_ns`` starts as the
``epoch_ns`` given, the UNIX time at clock 0), so the date advances with
the virtual clock alone and replays exactly.

Invariants:
* Setting the time moves ``base_ns`` only, keeping the sub-second phase;
  with register B.SET the calendar is frozen in ``frozen`` (what the guest
  reads and writes) and on SET's release the clock goes on from there.
* IRQF = (PF and PIE) or (AF and AIE) or (UF and UIE), and the IRQ 8 line
  equals IRQF: it rises when a flag raises IRQF and falls when the guest
  reads register C, which clears the flags.  ``irq8`` is called only on a
  change, so a guest that never reads C gets no further interrupts, as on
  a PC.
* Flags are only raised while their interrupt is enabled: PF while PIE is
  set, UF and AF while UIE or AIE is set (each needs a timer, and only
  these run).  Periodic deadlines are the instants at which UNIX time
  crosses a multiple of the period and update deadlines whole seconds,
  both derived from ``base_ns``, so neither drifts.
* UIP always reads 0: the update is instantaneous.  The divider bits of
  register A are kept but do not stop the clock.
* Written calendar values are decoded in the current format and clamped
  to a valid date when the clock runs from them; the day of the week is
  recomputed from the date then.  Past 9999-12-31 the calendar wraps to
  0001-01-01.
"""
from __future__ import annotations

import calendar
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Callable, Optional

from vmm.clock import Clock

PORT_COUNT = 2  # 0x70 index, 0x71 data
INDEX = 0
DATA = 1
INDEX_MASK = 0x7F
INDEX_NMI_DISABLE = 0x80
# The index port is write-only; a read floats to all ones.
INDEX_READ = 0xFF

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_DAY_OF_WEEK = 0x06
REG_DAY_OF_MONTH = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32  # by PC convention
CMOS_SIZE = 128

ALARMS = (REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM)
ALARM_TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS)
ALARM_DONT_CARE = 0xC0  # an alarm byte with both top bits set matches any value

REG_A_RATE_MASK = 0x0F
REG_A_WRITABLE = 0x7F   # bit 7 is UIP, read-only (and always 0 here)

REG_B_SET = 0x80
REG_B_PIE = 0x40
REG_B_AIE = 0x20
REG_B_UIE = 0x10
REG_B_DM_BINARY = 0x04
REG_B_24H = 0x02

REG_C_IRQF = 0x80
REG_C_PF = 0x40
REG_C_AF = 0x20
REG_C_UF = 0x10

REG_D_VRT = 0x80  # the battery is good

HOUR_PM = 0x80

# What a PC BIOS leaves: 32.768 kHz divider, 1024 Hz rate; BCD, 24-hour.
INITIAL_REG_A = 0x26
INITIAL_REG_B = REG_B_24H

NS_PER_S = 1_000_000_000
TIME_BASE_HZ = 32768
UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# The registers reach 0001-01-01 .. 9999-12-31; time past either end wraps.
CALENDAR_FIRST = datetime(1, 1, 1, tzinfo=timezone.utc)
CALENDAR_SPAN_S = (datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
                   - CALENDAR_FIRST) // timedelta(seconds=1) + 1


@dataclass(frozen=True, slots=True)
class CalendarTime:
    """A broken-down UTC time; ``weekday`` is 1 (Sunday) .. 7, as the RTC counts."""
    year: int
    month: int
    day: int
    hour: int
    minute: int
    second: int
    weekday: int


@dataclass(frozen=True, slots=True)
class RtcState:
    index: int
    nmi_disabled: bool
    reg_a: int
    reg_b: int
    flags: int                      # register C's PF/AF/UF
    base_ns: int                    # UNIX time in ns at clock 0
    frozen: Optional[CalendarTime]  # the calendar while SET is held
    alarms: tuple[int, int, int]    # seconds, minutes, hours alarm bytes
    cmos: bytes                     # plain storage; calendar/control slots unused
    periodic_deadline_ns: Optional[int]
    update_deadline_ns: Optional[int]


def _calendar_from_unix(seconds: int) -> CalendarTime:
    since_first = (UNIX_EPOCH - CALENDAR_FIRST) // timedelta(seconds=1) + seconds
    t = CALENDAR_FIRST + timedelta(seconds=since_first % CALENDAR_SPAN_S)
    return CalendarTime(t.year, t.month, t.day, t.hour, t.minute, t.second,
                        t.isoweekday() % 7 + 1)


def _unix_from_calendar(c: CalendarTime) -> int:
    year = min(max(c.year, 1), 9999)
    month = min(max(c.month, 1), 12)
    day = min(max(c.day, 1), calendar.monthrange(year, month)[1])
    t = datetime(year, month, day, min(c.hour, 23), min(c.minute, 59), min(c.second, 59),
                 tzinfo=timezone.utc)
    return (t - UNIX_EPOCH) // timedelta(seconds=1)


def _periodic_ticks(rate: int, unix_ns: int) -> int:
    """Periodic-interrupt ticks since the UNIX epoch for rate select ``rate``."""
    return unix_ns * TIME_BASE_HZ // (NS_PER_S << _periodic_shift(rate))


def _periodic_unix_ns(rate: int, ticks: int) -> int:
    """The first UNIX ns at which ``ticks`` periodic ticks have passed."""
    return -(-ticks * (NS_PER_S << _periodic_shift(rate)) // TIME_BASE_HZ)


def _periodic_shift(rate: int) -> int:
    # Rate r divides the 32768 Hz base by 2**(r-1); rates 1 and 2 are
    # too fast for the divider and behave as 8 and 9 (MC146818 table 3).
    return (rate + 7 if rate < 3 else rate) - 1


class CmosRtc:
    def __init__(self, clock: Clock, irq8: Callable[[bool], None], epoch_ns: int) -> None:
        self._clock = clock
        self._irq8 = irq8
        self._periodic = clock.timer(self._periodic_tick, "rtc-periodic")
        self._update = clock.timer(self._update_ended, "rtc-update")
        self.restore(RtcState(
            index=0, nmi_disabled=False, reg_a=INITIAL_REG_A, reg_b=INITIAL_REG_B, flags=0,
            base_ns=epoch_ns, frozen=None, alarms=(0, 0, 0), cmos=bytes(CMOS_SIZE),
            periodic_deadline_ns=None, update_deadline_ns=None,
        ))

    @property
    def nmi_disabled(self) -> bool:
        """Bit 7 of the last index written: the guest's NMI mask."""
        return self._nmi_disabled

    def read(self, offset: int, size: int) -> int:
        if offset == INDEX:
            return INDEX_READ
        index = self._index
        if index in _CALENDAR_FIELDS:
            return self._encode(index, self._calendar())
        if index in ALARMS:
            return self._alarms[ALARMS.index(index)]
        if index == REG_A:
            return self._reg_a
        if index == REG_B:
            return self._reg_b
        if index == REG_C:
            value = self._flags | (REG_C_IRQF if self._irqf() else 0)
            self._flags = 0
            self._update_irq()
            return value
        if index == REG_D:
            return REG_D_VRT
        return self._cmos[index]

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == INDEX:
            self._index = value & INDEX_MASK
            self._nmi_disabled = bool(value & INDEX_NMI_DISABLE)
            return
        index = self._index
        if index in _CALENDAR_FIELDS:
            self._write_calendar(index, value)
        elif index in ALARMS:
            self._alarms[ALARMS.index(index)] = value
        elif index == REG_A:
            self._reg_a = value & REG_A_WRITABLE
            self._arm_timers()
        elif index == REG_B:
            self._write_reg_b(value)
        elif index not in (REG_C, REG_D):  # C and D are read-only
            self._cmos[index] = value

    def state(self) -> RtcState:
        return RtcState(
            index=self._index, nmi_disabled=self._nmi_disabled, reg_a=self._reg_a,
            reg_b=self._reg_b, flags=self._flags, base_ns=self._base_ns,
            frozen=self._frozen, alarms=tuple(self._alarms), cmos=bytes(self._cmos),
            periodic_deadline_ns=self._periodic.deadline_ns,
            update_deadline_ns=self._update.deadline_ns,
        )

    def restore(self, state: RtcState) -> None:
        """Put the RTC back as saved, re-arming its timers at the saved
        deadlines; does not call ``irq8`` (the PIC's state holds the line)."""
        self._index = state.index
        self._nmi_disabled = state.nmi_disabled
        self._reg_a = state.reg_a
        self._reg_b = state.reg_b
        self._flags = state.flags
        self._base_ns = state.base_ns
        self._frozen = state.frozen
        self._alarms = list(state.alarms)
        self._cmos = bytearray(state.cmos)
        for timer, deadline in ((self._periodic, state.periodic_deadline_ns),
                                (self._update, state.update_deadline_ns)):
            timer.cancel()
            if deadline is not None:
                timer.arm(deadline)
        self._irq_level = self._irqf()

    # ---- calendar ----

    def _unix_ns(self) -> int:
        return self._base_ns + self._clock.now_ns()

    def _calendar(self) -> CalendarTime:
        if self._frozen is not None:
            return self._frozen
        return _calendar_from_unix(self._unix_ns() // NS_PER_S)

    def _write_calendar(self, index: int, value: int) -> None:
        field = _CALENDAR_FIELDS[index]
        now = self._calendar()
        if index == REG_HOURS:
            decoded = self._decode_hour(value)
        elif index == REG_YEAR:
            decoded = now.year // 100 * 100 + self._decode(value)
        elif index == REG_CENTURY:
            decoded = self._decode(value) * 100 + now.year % 100
        else:
            decoded = self._decode(value)
        written = replace(now, **{field: decoded})
        if self._frozen is not None:
            self._frozen = written
        else:
            self._base_ns = self._base_for(written)
            self._arm_timers()

    def _base_for(self, c: CalendarTime) -> int:
        """The ``base_ns`` that makes the clock read ``c`` now, keeping the
        phase within the second (the divider chain runs on)."""
        sub_second = self._unix_ns() % NS_PER_S
        return _unix_from_calendar(c) * NS_PER_S + sub_second - self._clock.now_ns()

    def _encode(self, index: int, c: CalendarTime) -> int:
        if index == REG_HOURS:
            if self._reg_b & REG_B_24H:
                return self._encode_number(c.hour)
            pm = HOUR_PM if c.hour >= 12 else 0
            return self._encode_number(c.hour % 12 or 12) | pm
        if index == REG_YEAR:
            return self._encode_number(c.year % 100)
        if index == REG_CENTURY:
            return self._encode_number(c.year // 100)
        return self._encode_number(getattr(c, _CALENDAR_FIELDS[index]))

    def _encode_number(self, n: int) -> int:
        if self._reg_b & REG_B_DM_BINARY:
            return n
        return (n // 10 % 10) << 4 | n % 10  # a guest's out-of-range write stays two digits

    def _decode(self, value: int) -> int:
        if self._reg_b & REG_B_DM_BINARY:
            return value
        return (value >> 4) * 10 + (value & 0x0F)

    def _decode_hour(self, value: int) -> int:
        if self._reg_b & REG_B_24H:
            return self._decode(value)
        hour = self._decode(value & ~HOUR_PM) % 12
        return hour + 12 if value & HOUR_PM else hour

    # ---- control and interrupts ----

    def _write_reg_b(self, value: int) -> None:
        if value & REG_B_SET:
            value &= ~REG_B_UIE  # raising SET clears UIE (datasheet)
            if self._frozen is None:
                self._frozen = self._calendar()
        elif self._frozen is not None:
            self._base_ns = self._base_for(self._frozen)
            self._frozen = None
        self._reg_b = value
        self._arm_timers()
        self._update_irq()

    def _arm_timers(self) -> None:
        self._arm_periodic()
        self._arm_update()

    def _arm_periodic(self) -> None:
        """Arm for the next multiple of the period in UNIX time after now.

        Deadlines sit on that fixed grid whenever they are computed, so a
        late callback skips ticks rather than shifting the ones after it.
        """
        rate = self._reg_a & REG_A_RATE_MASK
        if not (self._reg_b & REG_B_PIE and rate):
            self._periodic.cancel()
            return
        ticks = _periodic_ticks(rate, self._unix_ns()) + 1
        self._periodic.arm(_periodic_unix_ns(rate, ticks) - self._base_ns)

    def _arm_update(self) -> None:
        """Arm for the next whole UNIX second while UF or AF is wanted."""
        if self._reg_b & (REG_B_UIE | REG_B_AIE) and not self._reg_b & REG_B_SET:
            self._update.arm((self._unix_ns() // NS_PER_S + 1) * NS_PER_S - self._base_ns)
        else:
            self._update.cancel()

    def _periodic_tick(self) -> None:
        self._flags |= REG_C_PF
        self._arm_periodic()
        self._update_irq()

    def _update_ended(self) -> None:
        self._flags |= REG_C_UF
        now = self._calendar()
        if all(alarm & ALARM_DONT_CARE == ALARM_DONT_CARE or alarm == self._encode(reg, now)
               for alarm, reg in zip(self._alarms, ALARM_TIME_REGS)):
            self._flags |= REG_C_AF
        self._arm_update()
        self._update_irq()

    def _irqf(self) -> bool:
        # Each flag of register C sits at the bit of its enable in register B.
        return bool(self._flags & self._reg_b & (REG_C_PF | REG_C_AF | REG_C_UF))

    def _update_irq(self) -> None:
        level = self._irqf()
        if level != self._irq_level:
            self._irq_level = level
            self._irq8(level)


# Calendar registers and the CalendarTime field each one shows.
_CALENDAR_FIELDS = {
    REG_SECONDS: "second", REG_MINUTES: "minute", REG_HOURS: "hour",
    REG_DAY_OF_WEEK: "weekday", REG_DAY_OF_MONTH: "day", REG_MONTH: "month",
    REG_YEAR: "year", REG_CENTURY: "year",
}
