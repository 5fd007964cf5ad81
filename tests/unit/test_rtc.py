"""Register- and timing-level tests of the CMOS RTC over a ManualClock."""
import pytest

from vmm.clock import ManualClock
from vmm.devices.rtc import CmosRtc

NS = 1_000_000_000
EPOCH_S = 1_700_000_000  # 2023-11-14 22:13:20 UTC, a Tuesday
SEC, MIN, HOUR, DOW, DAY, MONTH, YEAR, CENTURY = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32
SEC_ALARM, MIN_ALARM, HOUR_ALARM = 0x01, 0x03, 0x05
A, B, C, D = 0x0A, 0x0B, 0x0C, 0x0D
B_SET, B_PIE, B_AIE, B_UIE, B_BINARY, B_24H = 0x80, 0x40, 0x20, 0x10, 0x04, 0x02
TIME_REGS = (SEC, MIN, HOUR, DOW, DAY, MONTH, YEAR, CENTURY)


class Bench:
    def __init__(self, start_ns=0, epoch_ns=EPOCH_S * NS):
        self.clock = ManualClock(start_ns)
        self.irq = []
        self.rtc = CmosRtc(self.clock, lambda level: self.irq.append((self.clock.now_ns(), level)),
                           epoch_ns)

    def r(self, index):
        self.rtc.write(0, 1, index)
        return self.rtc.read(1, 1)

    def w(self, index, value):
        self.rtc.write(0, 1, index)
        self.rtc.write(1, 1, value)

    def time(self):
        return [self.r(i) for i in TIME_REGS]

    def rises(self):
        return [t for t, level in self.irq if level]


def test_bcd_24h_calendar_from_epoch_and_clock():
    b = Bench()
    assert b.time() == [0x20, 0x13, 0x22, 3, 0x14, 0x11, 0x23, 0x20]
    b.clock.advance(45 * NS)
    assert b.time()[:3] == [0x05, 0x14, 0x22]
    b.clock.advance((86400 * 48 - 45) * NS)  # into 2024, a Monday
    assert b.time() == [0x20, 0x13, 0x22, 2, 0x01, 0x01, 0x24, 0x20]


def test_binary_mode():
    b = Bench()
    b.w(B, B_24H | B_BINARY)
    assert b.time() == [20, 13, 22, 3, 14, 11, 23, 20]


@pytest.mark.parametrize("binary, evening, midnight, noon", [
    (False, 0x90, 0x12, 0x92),
    (True, 0x8A, 12, 0x8C),
])
def test_12_hour_mode(binary, evening, midnight, noon):
    b = Bench()
    b.w(B, B_BINARY if binary else 0)
    assert b.r(HOUR) == evening                 # 22h is 10 PM
    b.clock.advance((6400 + 30) * NS)
    assert b.r(HOUR) == midnight                # 00h is 12 AM
    b.clock.advance(12 * 3600 * NS)
    assert b.r(HOUR) == noon                    # 12h is 12 PM


def test_fixed_registers():
    b = Bench()
    assert b.r(A) == 0x26       # UIP reads 0
    assert b.r(B) == B_24H
    assert b.r(C) == 0
    assert b.r(D) == 0x80
    b.w(A, 0xA6)                # UIP is read-only
    assert b.r(A) == 0x26
    b.w(D, 0)
    assert b.r(D) == 0x80


def test_periodic_interrupt_is_level_until_register_c_is_read():
    b = Bench()
    b.w(B, B_24H | B_PIE)     # rate 6: 1024 Hz, on the grid of whole seconds
    b.clock.advance(NS // 1024 * 3)
    assert b.irq == [(-(-NS // 1024), True)]  # one rise; the line stays up
    assert b.r(C) == 0xC0
    assert b.irq[-1] == (b.clock.now_ns(), False)
    assert b.r(C) == 0
    b.clock.advance(NS // 1024)
    assert b.rises()[-1] == -(-3 * NS // 1024)
    assert b.r(C) == 0xC0


def test_periodic_deadlines_follow_the_rate_without_drift():
    b = Bench(epoch_ns=EPOCH_S * NS + 123_456)
    b.w(A, 0x23)              # rate 3: 8192 Hz
    b.w(B, B_24H | B_PIE)
    for _ in range(8192 * 3):
        before = len(b.irq)
        b.clock.advance(b.clock.next_deadline() - b.clock.now_ns())
        assert len(b.irq) == before + 1
        b.r(C)
    # Each rise is the first UNIX nanosecond of a 1/8192 s tick, and the
    # ticks are consecutive: no period is lost or stretched.
    unix = [EPOCH_S * NS + 123_456 + t for t in b.rises()]
    ticks = [u * 8192 // NS for u in unix]
    assert all((u - 1) * 8192 // NS == k - 1 for u, k in zip(unix, ticks))
    assert ticks == list(range(ticks[0], ticks[0] + 8192 * 3))


@pytest.mark.parametrize("rate, hz", [(15, 2), (6, 1024), (1, 256), (2, 128), (8, 256)])
def test_periodic_rate_select(rate, hz):
    b = Bench()
    b.w(A, 0x20 | rate)
    b.w(B, B_24H | B_PIE)
    for _ in range(10):
        b.clock.advance(b.clock.next_deadline() - b.clock.now_ns())
        b.r(C)
    assert b.rises()[-1] == -(-10 * NS // hz)


def test_rate_zero_or_pie_clear_stops_the_periodic_interrupt():
    b = Bench()
    b.w(B, B_24H | B_PIE)
    b.w(A, 0x20)
    assert b.clock.next_deadline() is None
    b.w(A, 0x26)
    b.w(B, B_24H)
    assert b.clock.next_deadline() is None
    b.clock.advance(NS)
    assert b.r(C) == 0


def test_set_freezes_and_written_time_runs_on():
    b = Bench()
    b.clock.advance(NS // 4)
    b.w(B, B_24H | B_SET)
    b.clock.advance(5 * NS)
    assert b.r(SEC) == 0x20                     # frozen
    for reg, value in ((SEC, 0x58), (MIN, 0x59), (HOUR, 0x23), (DAY, 0x31),
                       (MONTH, 0x12), (YEAR, 0x99), (CENTURY, 0x19)):
        b.w(reg, value)
    b.clock.advance(7 * NS)
    assert b.time()[:3] == [0x58, 0x59, 0x23]   # reads what was written
    b.w(B, B_24H)
    assert b.time() == [0x58, 0x59, 0x23, 6, 0x31, 0x12, 0x99, 0x19]  # Friday 1999-12-31
    b.clock.advance(2 * NS)
    assert b.time() == [0x00, 0x00, 0x00, 7, 0x01, 0x01, 0x00, 0x20]


def test_calendar_wraps_after_year_9999():
    b = Bench()
    b.w(B, B_24H | B_SET)
    for reg, value in ((SEC, 0x59), (MIN, 0x59), (HOUR, 0x23), (DAY, 0x31),
                       (MONTH, 0x12), (YEAR, 0x99), (CENTURY, 0x99)):
        b.w(reg, value)
    b.w(B, B_24H)
    b.clock.advance(2 * NS)
    assert b.time() == [0x01, 0x00, 0x00, 2, 0x01, 0x01, 0x01, 0x00]  # Monday 0001-01-01


def test_out_of_range_writes_are_clamped_when_the_clock_runs():
    b = Bench()
    b.w(B, B_24H | B_SET)
    b.w(MONTH, 0x02)
    b.w(DAY, 0x31)
    b.w(SEC, 0xFF)
    assert b.r(SEC) == 0x65  # held as written (decoded 165, two digits)
    b.w(B, B_24H)
    assert [b.r(SEC), b.r(DAY), b.r(MONTH)] == [0x59, 0x28, 0x02]


def test_write_while_running_shifts_the_clock():
    b = Bench()
    b.w(B, B_24H | B_BINARY)
    b.w(MIN, 40)
    assert b.time()[:3] == [20, 40, 22]
    b.clock.advance(60 * NS)
    assert b.time()[:3] == [20, 41, 22]


def test_set_clears_uie():
    b = Bench()
    b.w(B, B_24H | B_UIE)
    b.w(B, B_24H | B_UIE | B_SET)
    assert b.r(B) == B_24H | B_SET


def test_update_ended_interrupt_each_second():
    b = Bench(epoch_ns=EPOCH_S * NS + NS // 3)
    b.w(B, B_24H | B_UIE)
    b.clock.advance(NS)
    assert b.rises() == [NS - NS // 3]
    assert b.r(C) == 0x90
    b.clock.advance(NS)
    assert b.r(C) == 0x90
    assert b.rises() == [NS - NS // 3, 2 * NS - NS // 3]


def test_alarm_interrupt_with_dont_care_fields():
    b = Bench()
    b.w(SEC_ALARM, 0x25)
    b.w(MIN_ALARM, 0xC0)
    b.w(HOUR_ALARM, 0xFF)
    b.w(B, B_24H | B_AIE)
    b.clock.advance(4 * NS)
    assert b.irq == []
    b.clock.advance(NS)
    assert b.rises() == [5 * NS]
    assert b.r(C) == 0xB0            # IRQF | AF | UF (UF alone would not interrupt)
    b.clock.advance(59 * NS)
    assert b.rises() == [5 * NS]
    b.clock.advance(NS)
    assert b.rises() == [5 * NS, 65 * NS]


def test_cmos_storage_and_nmi_mask():
    b = Bench()
    for index in range(0x0E, 0x80):
        if index != CENTURY:
            b.w(index, index ^ 0x5A)
    assert all(b.r(i) == i ^ 0x5A for i in range(0x0E, 0x80) if i != CENTURY)
    b.rtc.write(0, 1, 0x80 | 0x10)
    assert b.rtc.nmi_disabled
    assert b.rtc.read(1, 1) == 0x10 ^ 0x5A
    assert b.rtc.read(0, 1) == 0xFF  # the index port is write-only
    b.rtc.write(0, 1, 0x10)
    assert not b.rtc.nmi_disabled


def test_restored_rtc_continues_firing_at_the_same_absolute_times():
    a = Bench()
    a.w(A, 0x2A)                     # 64 Hz
    a.w(B, B_24H | B_PIE | B_UIE)
    a.w(0x40, 0x99)
    a.clock.advance(NS + NS // 10)
    saved = a.rtc.state()
    now = a.clock.now_ns()

    b = Bench(start_ns=now, epoch_ns=0)
    b.rtc.restore(saved)
    assert b.rtc.state() == saved
    assert b.irq == []
    for bench in (a, b):
        del bench.irq[:]
        for _ in range(100):
            bench.clock.advance(bench.clock.next_deadline() - bench.clock.now_ns())
            bench.r(C)
    assert a.irq == b.irq
    assert a.time() == b.time()
    assert b.r(0x40) == 0x99


def test_restore_while_set_keeps_the_frozen_calendar():
    a = Bench()
    a.w(B, B_24H | B_SET)
    a.w(HOUR, 0x07)
    saved = a.rtc.state()
    b = Bench(start_ns=a.clock.now_ns(), epoch_ns=0)
    b.rtc.restore(saved)
    b.clock.advance(10 * NS)
    assert b.r(HOUR) == 0x07 and b.r(SEC) == 0x20
    b.w(B, B_24H)
    assert b.time()[:3] == [0x20, 0x13, 0x07]
