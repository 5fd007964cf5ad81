"""Register- and timing-level tests of the 8254 over a ManualClock."""
import random

from vmm.clock import ManualClock
from vmm.devices.pit import CONTROL, PIT_HZ, Pit8254

NS = 1_000_000_000


def ns_for(ticks):
    """The first nanosecond at which ``ticks`` input clocks have elapsed."""
    return -(-ticks * NS // PIT_HZ)


class Bench:
    """A PIT on a manual clock, recording IRQ 0 as (time, level) pairs."""

    def __init__(self, start_ns=0):
        self.clock = ManualClock(start_ns)
        self.irq = []
        self.pit = Pit8254(self.clock, lambda level: self.irq.append((self.clock.now_ns(), level)))

    def program(self, channel, mode, count, access=3):
        self.pit.write(CONTROL, 1, channel << 6 | access << 4 | mode << 1)
        if access in (1, 3):
            self.pit.write(channel, 1, count & 0xFF)
        if access in (2, 3):
            self.pit.write(channel, 1, count >> 8 & 0xFF)

    def edges(self):
        """Times of rising edges, checking each is a clean pulse."""
        assert all(level is (i % 2 == 0) for i, (_, level) in enumerate(self.irq))
        assert all(self.irq[i][0] == self.irq[i + 1][0] for i in range(0, len(self.irq), 2))
        return [t for t, level in self.irq if level]

    def read16(self, channel):
        low = self.pit.read(channel, 1)
        return low | self.pit.read(channel, 1) << 8

    def latch(self, channel):
        self.pit.write(CONTROL, 1, channel << 6)
        return self.read16(channel)


def test_mode2_rate_generator_fires_once_per_period_without_drift():
    b = Bench(start_ns=123_456_789)
    n = 11932  # ~100 Hz, an inexact period in ns
    b.program(0, 2, n)
    rng = random.Random(7)
    end = 123_456_789 + ns_for(10000 * n)
    while b.clock.now_ns() < end:
        b.clock.advance(min(rng.randrange(1, 30_000_000), end - b.clock.now_ns()))
    edges = b.edges()
    assert len(edges) == 10000
    assert edges == [123_456_789 + ns_for(k * n) for k in range(1, 10001)]
    assert edges[-1] - 123_456_789 == ns_for(10000 * n)  # 100 s of ticks, to the ns


def test_mode2_counter_counts_down_and_reloads():
    b = Bench()
    b.program(0, 2, 1000)
    assert b.read16(0) == 1000
    b.clock.advance(ns_for(1))
    assert b.read16(0) == 999
    b.clock.advance(ns_for(999) - ns_for(1))
    assert b.read16(0) == 1
    b.clock.advance(ns_for(1000) - ns_for(999))
    assert b.read16(0) == 1000  # reloaded at the period end
    b.clock.advance(ns_for(1500) - ns_for(1000))
    assert b.read16(0) == 500


def test_mode3_square_wave_one_edge_per_period_and_counts_by_two():
    b = Bench()
    b.program(0, 3, 100)
    b.clock.advance(ns_for(10))
    assert b.latch(0) == 80
    b.clock.advance(ns_for(60) - ns_for(10))
    assert b.latch(0) == 80  # second half reloads and counts down again
    b.clock.advance(ns_for(1000) - ns_for(60))
    assert b.edges() == [ns_for(k * 100) for k in range(1, 11)]


def test_mode3_status_output_is_high_for_the_first_half():
    b = Bench()
    b.program(0, 3, 101)
    status = []
    for tick in (0, 50, 51, 100, 101):
        b.clock.advance(ns_for(tick) - b.clock.now_ns())
        b.pit.write(CONTROL, 1, 0xE2)  # read-back: status only, channel 0
        status.append(b.pit.read(0, 1) & 0x80)
    assert status == [0x80, 0x80, 0, 0, 0x80]


def test_mode0_interrupts_once_at_terminal_count_then_wraps():
    b = Bench()
    b.program(0, 0, 500)
    b.clock.advance(ns_for(499))
    assert b.irq == []
    b.clock.advance(ns_for(500) - ns_for(499))
    assert b.edges() == [ns_for(500)]
    b.clock.advance(ns_for(600) - ns_for(500))
    assert b.edges() == [ns_for(500)]
    assert b.read16(0) == 0x10000 - 100  # keeps counting past zero


def test_mode0_count_write_restarts_and_first_byte_stops_the_interrupt():
    b = Bench()
    b.program(0, 0, 500)
    b.clock.advance(ns_for(400))
    b.pit.write(0, 1, 0x10)  # first byte: counting stops
    b.clock.advance(ns_for(800) - ns_for(400))
    assert b.irq == []
    b.pit.write(0, 1, 0x01)  # count 0x110 from now
    b.clock.advance(ns_for(800 + 0x110 + 1) - ns_for(800))
    start = ns_for(800)
    assert b.edges() == [start + ns_for(0x110)]


def test_mode4_strobe_edge_one_tick_after_terminal_count():
    b = Bench()
    b.program(0, 4, 50)
    b.clock.advance(ns_for(60))
    assert b.edges() == [ns_for(51)]


def test_count_zero_means_65536():
    b = Bench()
    b.program(0, 2, 0)
    b.clock.advance(2 * ns_for(65536))
    assert b.edges() == [ns_for(65536), ns_for(2 * 65536)]
    assert 2 * ns_for(65536) // 1000 == 109_850  # 18.2 Hz


def test_latch_freezes_the_value_until_read():
    b = Bench()
    b.program(2, 0, 0x1234)
    b.clock.advance(ns_for(0x34))
    b.pit.write(CONTROL, 1, 0x80)   # latch channel 2
    b.clock.advance(ns_for(0x134) - ns_for(0x34))
    b.pit.write(CONTROL, 1, 0x80)   # a second latch before reading is ignored
    assert b.read16(2) == 0x1200
    assert b.read16(2) == 0x1100


def test_lohi_reads_alternate_bytes_of_the_live_count():
    b = Bench()
    b.program(1, 0, 0xABCD)
    assert b.pit.read(1, 1) == 0xCD
    assert b.pit.read(1, 1) == 0xAB
    assert b.pit.read(1, 1) == 0xCD


def test_lobyte_and_hibyte_access_modes():
    b = Bench()
    b.program(1, 2, 0x80, access=1)
    assert b.pit.read(1, 1) == 0x80
    assert b.pit.read(1, 1) == 0x80
    b.program(1, 2, 0x2000, access=2)
    assert b.pit.read(1, 1) == 0x20
    b.clock.advance(ns_for(0x100))
    assert b.pit.read(1, 1) == 0x1F
    b.pit.write(CONTROL, 1, 0x40)   # latch: hibyte access gives one byte
    assert b.pit.read(1, 1) == 0x1F


def test_read_back_latches_status_then_count_for_selected_channels():
    b = Bench()
    b.program(0, 2, 1000)
    b.program(2, 3, 2000)
    b.pit.write(CONTROL, 1, 0x34)   # channel 0 reprogrammed, no count yet
    b.clock.advance(ns_for(100))
    b.pit.write(CONTROL, 1, 0xC0 | 0x08 | 0x02)  # count and status, channels 0 and 2
    assert b.pit.read(0, 1) == 0x80 | 0x40 | 0x34  # OUT high, null count, lohi mode 2
    assert b.read16(0) == 1000                    # stopped by the control word
    assert b.pit.read(2, 1) == 0x80 | 0x36
    assert b.read16(2) == 2000 - 200
    b.pit.write(CONTROL, 1, 0xD0 | 0x02)          # status only
    b.pit.write(CONTROL, 1, 0xD0 | 0x02)          # the second status latch is ignored
    b.pit.write(0, 1, 0x00)
    assert b.pit.read(0, 1) & 0x40                # latched before the first byte


def test_status_mode0_output_and_null_count():
    b = Bench()
    b.pit.write(CONTROL, 1, 0x31)                 # mode 0, BCD bit (counted as binary)
    b.pit.write(CONTROL, 1, 0xE2)
    assert b.pit.read(0, 1) == 0x40 | 0x31        # OUT low, null count
    b.pit.write(0, 1, 10)
    b.pit.write(0, 1, 0)
    b.pit.write(CONTROL, 1, 0xE2)
    assert b.pit.read(0, 1) == 0x31
    b.clock.advance(ns_for(10))
    b.pit.write(CONTROL, 1, 0xE2)
    assert b.pit.read(0, 1) == 0x80 | 0x31


def test_channels_1_and_2_never_interrupt():
    b = Bench()
    b.program(1, 2, 100)
    b.program(2, 3, 100)
    b.clock.advance(ns_for(10_000))
    assert b.irq == []
    assert b.clock.next_deadline() is None


def test_reprogramming_cancels_the_pending_interrupt():
    b = Bench()
    b.program(0, 2, 1000)
    b.clock.advance(ns_for(500))
    b.pit.write(CONTROL, 1, 0x34)
    b.clock.advance(ns_for(5000))
    assert b.irq == []


def test_restored_pit_fires_at_the_same_absolute_times():
    a = Bench()
    a.program(0, 2, 4567)
    a.program(2, 0, 0x4000)
    a.clock.advance(ns_for(4567 * 3 + 1234))
    a.pit.write(CONTROL, 1, 0x80)                 # a latch pending in the snapshot
    a.pit.write(1, 1, 0)
    saved = a.pit.state()
    now = a.clock.now_ns()

    b = Bench(start_ns=now)
    b.pit.restore(saved)
    assert b.pit.state() == saved
    for bench in (a, b):
        del bench.irq[:]
        bench.clock.advance(ns_for(4567 * 10))
    assert a.edges() == b.edges() == [ns_for(k * 4567) for k in range(4, 14)]
    assert a.read16(2) == b.read16(2)
    assert a.latch(0) == b.latch(0)


def test_restore_over_a_running_pit_replaces_its_timer():
    b = Bench()
    b.program(0, 2, 1000)
    saved = b.pit.state()
    b.program(0, 2, 300)
    b.pit.restore(saved)
    b.clock.advance(ns_for(2000))
    assert b.edges() == [ns_for(1000), ns_for(2000)]


# -- channel 2's gate and port 0x61 (system control port B) ----------------------

def port_b_out2(b):
    return bool(b.pit.port_b_read() & 0x20)


def test_port_b_reads_back_its_enables_and_powers_on_with_the_gate_high():
    b = Bench()
    assert b.pit.port_b_read() & 0x0F == 0x01
    b.pit.port_b_write(0xFE)                     # read-only bits 4..7 are not stored
    assert b.pit.port_b_read() & 0xCF == 0x0E
    b.pit.port_b_write(0x03)
    assert b.pit.port_b_read() & 0xCF == 0x03


def test_port_b_refresh_bit_toggles_with_virtual_time():
    b = Bench()
    seen = []
    for _ in range(8):
        seen.append(bool(b.pit.port_b_read() & 0x10))
        b.clock.advance(15_085)
    assert seen == [False, True] * 4


def test_linux_pit_calibration_loop_sees_out2_rise_at_terminal_count():
    """What Linux's pit_calibrate_tsc does: gate high, speaker off, mode 0, poll bit 5."""
    b = Bench()
    b.pit.port_b_write((b.pit.port_b_read() & ~0x02) | 0x01)
    b.program(2, 0, 11931)                       # the 10 ms latch Linux uses
    assert not port_b_out2(b)
    b.clock.advance(ns_for(11930))
    assert not port_b_out2(b)
    b.clock.advance(ns_for(11931) - ns_for(11930))
    assert port_b_out2(b)
    assert b.irq == []                           # channel 2 has no interrupt line


def test_quick_calibration_reads_the_channel2_msb_counting_down():
    b = Bench()
    b.pit.port_b_write(0x01)
    b.program(2, 0, 0xFFFF)
    msbs = []
    for _ in range(5):
        b.pit.read(2, 1)                          # Linux reads the LSB and throws it away
        msbs.append(b.pit.read(2, 1))
        b.clock.advance(ns_for(256))
    assert msbs == [0xFF, 0xFE, 0xFD, 0xFC, 0xFB]


def test_gate_low_pauses_mode0_and_rising_resumes_where_it_was():
    b = Bench()
    b.program(2, 0, 1000)
    b.clock.advance(ns_for(300))
    b.pit.port_b_write(0x00)
    held = b.latch(2)
    assert held == 700
    b.clock.advance(ns_for(5000))
    assert b.latch(2) == 700 and not port_b_out2(b)
    b.pit.port_b_write(0x01)
    b.clock.advance(ns_for(699) + 1)
    assert not port_b_out2(b)
    b.clock.advance(ns_for(2))
    assert port_b_out2(b)


def test_count_loaded_with_the_gate_low_waits_for_the_gate():
    b = Bench()
    b.pit.port_b_write(0x00)
    b.program(2, 0, 500)
    b.clock.advance(ns_for(10_000))
    assert b.latch(2) == 500
    b.pit.port_b_write(0x01)
    b.clock.advance(ns_for(100))
    assert b.latch(2) == 400


def test_gate_low_stops_square_wave_with_out_high_and_rising_edge_reloads():
    b = Bench()
    b.program(2, 3, 100)
    b.clock.advance(ns_for(70))                   # in the low half
    assert b.pit.read(CONTROL, 1) == 0xFF
    b.pit.write(CONTROL, 1, 0xE8)                 # read-back status of channel 2
    assert not b.pit.read(2, 1) & 0x80
    b.pit.port_b_write(0x00)
    b.pit.write(CONTROL, 1, 0xE8)
    assert b.pit.read(2, 1) & 0x80                # gate low forces OUT high
    b.clock.advance(ns_for(1000))
    b.pit.port_b_write(0x01)                      # the rising edge starts a new period
    b.clock.advance(ns_for(10))
    assert b.latch(2) == 80


def test_mode1_one_shot_is_triggered_by_the_rising_gate_edge():
    b = Bench()
    b.pit.port_b_write(0x00)
    b.program(2, 1, 50)
    before = b.latch(2)
    b.clock.advance(ns_for(500))
    assert b.latch(2) == before                   # not counting until triggered
    b.pit.port_b_write(0x01)
    b.pit.write(CONTROL, 1, 0xE8)
    assert not b.pit.read(2, 1) & 0x80            # OUT goes low for the shot
    b.clock.advance(ns_for(50))
    assert port_b_out2(b)


def test_gate_and_port_b_survive_a_snapshot():
    a = Bench()
    a.program(2, 0, 1000)
    a.clock.advance(ns_for(200))
    a.pit.port_b_write(0x02)                      # gate low (paused at 800), speaker on
    saved, saved_b = a.pit.state(), a.pit.port_b.state()
    assert saved_b.paused_ticks == 200 and saved_b.loaded
    b = Bench(start_ns=a.clock.now_ns())
    b.pit.restore(saved)
    b.pit.port_b.restore(saved_b)                 # after the PIT: it completes channel 2
    assert (b.pit.state(), b.pit.port_b.state()) == (saved, saved_b)
    for bench in (a, b):
        bench.pit.port_b_write(0x03)
        bench.clock.advance(ns_for(800))
    assert port_b_out2(a) and port_b_out2(b)
    assert a.pit.port_b_read() == b.pit.port_b_read()
