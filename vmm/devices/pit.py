"""The 8254 programmable interval timer: three counters, channel 0 on IRQ 0.

Owns the counters' programming (control words, count writes, latches,
read-back) and channel 0's interrupt timer.  Counter values are never
stored as they tick: each is derived from the virtual clock as the ticks of
the 1193182 Hz input since the count was loaded, so reading a counter has
no side effect on time and replays exactly.

Invariants:
* A counting counter is (mode, initial count N, start_ns); its value and
  OUT level at time t are functions of ticks(t - start_ns) alone.
* Channel 0 raises IRQ 0 as an edge, ``irq0(True)`` then ``irq0(False)``,
  at each rising edge of its OUT: mode 0 at terminal count, mode 4 one tick
  after it, modes 2 and 3 at the end of every period.  The k-th periodic
  deadline is start_ns + ns(k * N), computed from k, so periods never drift.
  The level of OUT between edges is not driven onto the line.
* Channels 0 and 1 have their gates tied high, so their gate-triggered
  modes 1 and 5 wait forever for a trigger.  Channel 2's gate is bit 0 of
  the PC's system control port B (0x61, ``port_b_read``/``port_b_write``):
  gate low pauses modes 0 and 4 (they resume where they were) and stops
  modes 2 and 3 with OUT high; a rising edge restarts modes 1, 2, 3 and 5
  from the loaded count.  A counter paused by its gate holds its value in
  ``held`` and the ticks it had counted in ``paused_ticks``.  What the gate
  needs beyond ``PitState`` (port B's bits, channel 2's ``loaded`` and
  ``paused_ticks``) is the separate ``PortBState``, so that the state of a
  machine whose guest never touches port 0x61 is what it was before port B
  existed (markers made then stay comparable).
* Port B: bits 0 (channel 2 gate), 1 (speaker data enable), 2 and 3
  (parity and channel-check enables) read back as written; bit 4 is the
  DRAM refresh request, toggling every ``REFRESH_NS`` of virtual time;
  bit 5 is channel 2's OUT; bits 6 and 7 (NMI sources) read 0.  At power-on
  the gate is high (port B reads 1).

Simplifications, each invisible to guests that program the PIT the usual
way (control word, then the count):
* A count takes effect the instant its last byte is written (a real 8254
  loads it on the next input clock, and in modes 2 and 3 defers a count
  written while counting to the end of the current period or half-period).
* BCD counting is treated as binary; the BCD bit is kept for the status
  byte only.
* Until its first control word a counter is idle: mode 0, lobyte/hibyte
  access, count 0, not counting (there is no BIOS here to start channel 0).

Registers are eight bits wide; a wider access acts on the addressed port
with the low byte (reads zero-extend).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from vmm.clock import Clock

PIT_HZ = 1193182
NS_PER_S = 1_000_000_000
PORT_COUNT = 4
CONTROL = 3     # offsets 0..2 are the counters
CHANNELS = 3
COUNT_MAX = 0x10000  # a count of 0 means 65536

CW_CHANNEL_SHIFT = 6
CW_READ_BACK = 3      # channel field value that selects read-back
CW_ACCESS_SHIFT = 4
CW_MODE_SHIFT = 1
CW_BCD = 0x01
CW_PROGRAM_MASK = 0x3F  # access, mode and BCD: what the status byte echoes

ACCESS_LATCH = 0
ACCESS_LOBYTE = 1
ACCESS_HIBYTE = 2
ACCESS_LOHI = 3

MODE_INTERRUPT_ON_TC = 0
MODE_ONE_SHOT = 1
MODE_RATE = 2
MODE_SQUARE = 3
MODE_SOFTWARE_STROBE = 4
MODE_HARDWARE_STROBE = 5
GATE_TRIGGERED = (MODE_ONE_SHOT, MODE_HARDWARE_STROBE)
PERIODIC = (MODE_RATE, MODE_SQUARE)

RB_NO_COUNT = 0x20    # read-back: do not latch the count
RB_NO_STATUS = 0x10   # read-back: do not latch the status
RB_CHANNEL0 = 0x02    # read-back select bits: channel i is 0x02 << i

STATUS_OUTPUT = 0x80
STATUS_NULL_COUNT = 0x40

# A port with no read function floats to all ones on the ISA bus.
CONTROL_READ = 0xFF

PORT_B_WRITABLE = 0x0F   # gate 2, speaker, parity and channel-check enables
PORT_B_GATE2 = 0x01
PORT_B_REFRESH = 0x10
PORT_B_OUT2 = 0x20
PORT_B_POWER_ON = PORT_B_GATE2
REFRESH_NS = 15_085       # the ISA refresh request toggles every 15.085 us
GATED = 2                 # the one channel whose gate the guest controls

INITIAL_CONTROL = ACCESS_LOHI << CW_ACCESS_SHIFT | MODE_INTERRUPT_ON_TC << CW_MODE_SHIFT


def _ticks(ns: int) -> int:
    """Input clock ticks completed in ``ns`` nanoseconds."""
    return ns * PIT_HZ // NS_PER_S


def _ns(ticks: int) -> int:
    """The fewest nanoseconds in which ``ticks`` ticks complete."""
    return -(-ticks * NS_PER_S // PIT_HZ)


@dataclass(frozen=True, slots=True)
class CounterState:
    control: int             # access, mode and BCD bits of the last control word
    count: int               # initial count N, 1..65536
    start_ns: Optional[int]  # when N was loaded; None while not counting
    held: int                # the value read while not counting
    write_low: Optional[int]  # low byte of a lobyte/hibyte count being written
    read_high: bool          # next unlatched lobyte/hibyte read gives the high byte
    latched: tuple[int, ...]  # bytes of a latched count still to be read
    latched_status: Optional[int]


@dataclass(frozen=True, slots=True)
class PitState:
    counters: tuple[CounterState, CounterState, CounterState]
    irq_deadline_ns: Optional[int]  # channel 0's next IRQ edge


@dataclass(frozen=True, slots=True)
class PortBState:
    bits: int                     # the writable bits of port 0x61 (bit 0: channel 2's gate)
    loaded: bool                  # a channel 2 count was written since its control word
    paused_ticks: Optional[int]   # channel 2 in mode 0/4 held by a low gate: ticks counted so far


_STORED = tuple(f for f in CounterState.__dataclass_fields__)


class _Counter:
    __slots__ = ("control", "count", "start_ns", "held", "write_low", "read_high",
                 "latched", "latched_status", "loaded", "paused_ticks")

    def __init__(self, state: CounterState) -> None:
        self.restore(state)

    def restore(self, state: CounterState) -> None:
        for name in _STORED:
            setattr(self, name, getattr(state, name))
        self.loaded, self.paused_ticks = False, None    # channel 2's come from PortBState

    def state(self) -> CounterState:
        return CounterState(**{name: getattr(self, name) for name in _STORED})

    @property
    def access(self) -> int:
        return self.control >> CW_ACCESS_SHIFT

    @property
    def mode(self) -> int:
        mode = (self.control >> CW_MODE_SHIFT) & 0x7
        return mode - 4 if mode > MODE_HARDWARE_STROBE else mode  # 6, 7 alias 2, 3

    def value(self, now_ns: int) -> int:
        if self.start_ns is None:
            return self.held
        elapsed, n = _ticks(now_ns - self.start_ns), self.count
        mode = self.mode
        if mode == MODE_RATE:
            value = n - elapsed % n
        elif mode == MODE_SQUARE:
            value = _square_wave_value(n, elapsed % n)
        else:
            value = n - elapsed  # modes 0 and 4 wrap on past terminal count
        return value % COUNT_MAX

    def output(self, now_ns: int) -> bool:
        mode = self.mode
        if self.paused_ticks is not None:
            elapsed, n = self.paused_ticks, self.count
        elif self.start_ns is None:
            return mode != MODE_INTERRUPT_ON_TC
        else:
            elapsed, n = _ticks(now_ns - self.start_ns), self.count
        if mode in (MODE_INTERRUPT_ON_TC, MODE_ONE_SHOT):
            return elapsed >= n
        if mode == MODE_RATE:
            return elapsed % n != n - 1   # low for the tick at count 1
        if mode == MODE_SQUARE:
            return elapsed % n < (n + 1) // 2
        return elapsed != n               # modes 4 and 5: low for one tick at TC

    def gate_falls(self, now_ns: int) -> None:
        """Modes 0/4 pause where they are; modes 2/3 stop with OUT high; 1/5 run on."""
        if self.start_ns is None:
            return
        mode = self.mode
        if mode in (MODE_INTERRUPT_ON_TC, MODE_SOFTWARE_STROBE):
            self.held = self.value(now_ns)
            self.paused_ticks = _ticks(now_ns - self.start_ns)
            self.start_ns = None
        elif mode in PERIODIC:
            self.held = self.value(now_ns)
            self.start_ns = None

    def gate_rises(self, now_ns: int) -> None:
        """Modes 0/4 resume; modes 1, 2, 3 and 5 (re)start from the loaded count."""
        if self.paused_ticks is not None:
            self.start_ns = now_ns - _ns(self.paused_ticks)
            self.paused_ticks = None
        elif self.loaded and self.write_low is None and self.mode not in (MODE_INTERRUPT_ON_TC,
                                                                          MODE_SOFTWARE_STROBE):
            self.start_ns = now_ns

    def status(self, now_ns: int) -> int:
        null_count = self.start_ns is None or self.write_low is not None
        return ((STATUS_OUTPUT if self.output(now_ns) else 0)
                | (STATUS_NULL_COUNT if null_count else 0) | self.control)

    def latch(self, now_ns: int) -> None:
        if self.latched:
            return  # a second latch before the first is read is ignored
        value = self.value(now_ns)
        self.latched = {ACCESS_LOBYTE: (value & 0xFF,), ACCESS_HIBYTE: (value >> 8,),
                        ACCESS_LOHI: (value & 0xFF, value >> 8)}[self.access]

    def read(self, now_ns: int) -> int:
        if self.latched_status is not None:
            value, self.latched_status = self.latched_status, None
            return value
        if self.latched:
            value, self.latched = self.latched[0], self.latched[1:]
            return value
        value = self.value(now_ns)
        access = self.access
        high = access == ACCESS_HIBYTE or (access == ACCESS_LOHI and self.read_high)
        if access == ACCESS_LOHI:
            self.read_high = not self.read_high
        return value >> 8 if high else value & 0xFF


def _square_wave_value(n: int, phase: int) -> int:
    """Mode 3's counter at ``phase`` ticks into a period of ``n``: it counts
    down by two through each half, an odd count loading n - 1 and spending
    one extra tick at zero in the high half (8254 datasheet, mode 3)."""
    if n % 2 == 0:
        return n - 2 * (phase % (n // 2))
    high_ticks = (n + 1) // 2
    return n - 1 - 2 * (phase if phase < high_ticks else phase - high_ticks)


def _idle_counter() -> CounterState:
    return CounterState(control=INITIAL_CONTROL, count=COUNT_MAX, start_ns=None, held=0,
                        write_low=None, read_high=False, latched=(), latched_status=None)


class Pit8254:
    def __init__(self, clock: Clock, irq0: Callable[[bool], None]) -> None:
        self._clock = clock
        self._irq0 = irq0
        self._counters = tuple(_Counter(_idle_counter()) for _ in range(CHANNELS))
        self._timer = clock.timer(self._fire, "pit-channel0")
        self._port_b = PORT_B_POWER_ON
        self.port_b = PortB(self)       # its state, for markers (vmm.machine's "port_b")

    def read(self, offset: int, size: int) -> int:
        if offset == CONTROL:
            return CONTROL_READ
        return self._counters[offset].read(self._clock.now_ns())

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == CONTROL:
            self._write_control(value)
        else:
            self._write_count(offset, value)

    def state(self) -> PitState:
        counters = tuple(counter.state() for counter in self._counters)
        return PitState(counters=counters, irq_deadline_ns=self._timer.deadline_ns)

    def restore(self, state: PitState) -> None:
        """Restore ``port_b`` after this: it holds channel 2's gate state."""
        for counter, saved in zip(self._counters, state.counters):
            counter.restore(saved)
        self._arm_irq(state.irq_deadline_ns)

    def port_b_state(self) -> PortBState:
        counter = self._counters[GATED]
        return PortBState(bits=self._port_b, loaded=counter.loaded, paused_ticks=counter.paused_ticks)

    def restore_port_b(self, state: PortBState) -> None:
        counter = self._counters[GATED]
        self._port_b, counter.loaded, counter.paused_ticks = state.bits, state.loaded, state.paused_ticks

    # -- port 0x61, system control port B ----------------------------------
    def port_b_read(self) -> int:
        now = self._clock.now_ns()
        refresh = PORT_B_REFRESH if (now // REFRESH_NS) & 1 else 0
        out2 = PORT_B_OUT2 if self._gate2 and self._counters[GATED].output(now) else 0
        return self._port_b | refresh | out2

    def port_b_write(self, value: int) -> None:
        was, self._port_b = self._gate2, value & PORT_B_WRITABLE
        if was != self._gate2:
            counter, now = self._counters[GATED], self._clock.now_ns()
            counter.gate_rises(now) if self._gate2 else counter.gate_falls(now)

    @property
    def _gate2(self) -> bool:
        return bool(self._port_b & PORT_B_GATE2)

    def _write_control(self, value: int) -> None:
        now = self._clock.now_ns()
        channel = value >> CW_CHANNEL_SHIFT
        if channel == CW_READ_BACK:
            for index, counter in enumerate(self._counters):
                if not value & (RB_CHANNEL0 << index):
                    continue
                if not value & RB_NO_STATUS and counter.latched_status is None:
                    counter.latched_status = counter.status(now)
                if not value & RB_NO_COUNT:
                    counter.latch(now)
            return
        counter = self._counters[channel]
        if (value >> CW_ACCESS_SHIFT) & 0x3 == ACCESS_LATCH:
            counter.latch(now)
            return
        # A control word resets the counter's logic: it stops until a count
        # is written, holding the value it had.
        counter.held = counter.value(now)
        counter.control = value & CW_PROGRAM_MASK
        counter.start_ns = None
        counter.write_low = None
        counter.read_high = False
        counter.latched = ()
        counter.latched_status = None
        counter.loaded = False
        counter.paused_ticks = None
        if channel == 0:
            self._arm_irq(None)

    def _write_count(self, channel: int, byte: int) -> None:
        counter = self._counters[channel]
        access = counter.access
        if access == ACCESS_LOBYTE:
            self._load(channel, byte)
        elif access == ACCESS_HIBYTE:
            self._load(channel, byte << 8)
        elif counter.write_low is None:
            counter.write_low = byte
            if counter.mode == MODE_INTERRUPT_ON_TC:
                # Mode 0 stops counting at the first byte, OUT low.
                counter.held = counter.value(self._clock.now_ns())
                counter.start_ns = None
                counter.paused_ticks = None
                if channel == 0:
                    self._arm_irq(None)
        else:
            low, counter.write_low = counter.write_low, None
            self._load(channel, low | byte << 8)

    def _load(self, channel: int, count: int) -> None:
        counter = self._counters[channel]
        counter.count = count or COUNT_MAX
        counter.loaded = True
        counter.paused_ticks = None
        if counter.mode in GATE_TRIGGERED:
            return  # waits for a rising gate edge (never, on channels 0 and 1)
        if channel == GATED and not self._gate2:
            # Gate low: modes 0/4 hold the count until it rises, 2/3 start on the edge.
            counter.held = counter.count % COUNT_MAX
            counter.start_ns = None
            if counter.mode in (MODE_INTERRUPT_ON_TC, MODE_SOFTWARE_STROBE):
                counter.paused_ticks = 0
            return
        counter.start_ns = self._clock.now_ns()
        if channel == 0:
            self._arm_irq(self._edge_deadline(1))

    def _edge_deadline(self, k: int) -> int:
        """Channel 0's k-th rising OUT edge (k >= 1; one-shot modes have one)."""
        counter = self._counters[0]
        n = counter.count
        if counter.mode in PERIODIC:
            return counter.start_ns + _ns(k * n)
        if counter.mode == MODE_SOFTWARE_STROBE:
            return counter.start_ns + _ns(n + 1)
        return counter.start_ns + _ns(n)

    def _arm_irq(self, deadline_ns: Optional[int]) -> None:
        if deadline_ns is None:
            self._timer.cancel()
        else:
            self._timer.arm(deadline_ns)

    def _fire(self) -> None:
        counter = self._counters[0]
        if counter.mode in PERIODIC:
            # The next period end after now, on the grid fixed by start_ns:
            # a late callback skips edges instead of shifting later ones.
            elapsed = _ticks(self._clock.now_ns() - counter.start_ns)
            self._arm_irq(self._edge_deadline(elapsed // counter.count + 1))
        self._irq0(True)
        self._irq0(False)


class PortB:
    """Port B's part of the machine state, as a device of its own: ``Pit8254.port_b``."""

    def __init__(self, pit: Pit8254) -> None:
        self._pit = pit

    def state(self) -> PortBState:
        return self._pit.port_b_state()

    def restore(self, state: PortBState) -> None:
        self._pit.restore_port_b(state)
