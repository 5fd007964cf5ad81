"""The two cascaded 8259A interrupt controllers of a PC.

Owns IRR/ISR/IMR, the init (ICW) sequence, EOI and rotation, and the INTA
cycle that turns a request into a vector.  The slave's INT output drives
the master's IR2; the machine loop asks ``PicPair.has_interrupt()`` and, when
it may inject, ``PicPair.acknowledge()`` for the vector.

Invariants:
* Priorities: ``priority_add`` is the line with the highest priority; the
  rest follow in circular order.  Only rotation and ICW1 change it.
* Edge mode (the default) latches a 0->1 transition of a line into IRR;
  IRR stays set until INTA even if the line drops first, so a device may
  pulse a line.  Level mode (ICW1.LTIM) makes IRR follow the lines.
* A chip's INT output is "an unmasked IRR bit outranks every in-service
  level" (in special mask mode, masked in-service levels do not count);
  ``output`` is called only when that changes.
* Special fully nested mode, buffered mode and the ICW3 cascade wiring are
  accepted and ignored: the PC wiring is fixed (slave on master IR2).

Registers are eight bits wide; a wider access acts on the addressed port
with the low byte (reads zero-extend).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

PORT_COUNT = 2  # master 0x20-0x21, slave 0xA0-0xA1
COMMAND = 0
DATA = 1

CASCADE_LINE = 2    # the master input the slave drives
SPURIOUS_LINE = 7   # the vector offset INTA gives when nothing is pending
LINES = 8

ICW1 = 0x10         # command-port bit that starts initialization
ICW1_IC4 = 0x01     # an ICW4 follows
ICW1_SNGL = 0x02    # single chip: no ICW3
ICW1_LTIM = 0x08    # level-triggered inputs
ICW2_BASE_MASK = 0xF8
ICW4_AEOI = 0x02

OCW3 = 0x08         # command-port bit (with ICW1 clear) selecting OCW3
OCW3_RIS = 0x01     # with RR: read ISR rather than IRR
OCW3_RR = 0x02
OCW3_POLL = 0x04
OCW3_SMM = 0x20
OCW3_ESMM = 0x40

OCW2_LEVEL_MASK = 0x07
OCW2_COMMAND_MASK = 0xE0
OCW2_ROTATE_AEOI_CLEAR = 0x00
OCW2_NONSPECIFIC_EOI = 0x20
OCW2_SPECIFIC_EOI = 0x60
OCW2_ROTATE_AEOI_SET = 0x80
OCW2_ROTATE_NONSPECIFIC_EOI = 0xA0
OCW2_SET_PRIORITY = 0xC0
OCW2_ROTATE_SPECIFIC_EOI = 0xE0

POLL_INTERRUPT = 0x80  # poll word: a request was pending

# Init sequence position: which ICW the data port expects next.
READY, EXPECT_ICW2, EXPECT_ICW3, EXPECT_ICW4 = range(4)


@dataclass(frozen=True, slots=True)
class PicState:
    irr: int
    isr: int
    imr: int
    lines: int          # current input levels, for edge detection
    init_step: int
    expect_icw4: bool
    single: bool
    level_triggered: bool
    vector_base: int
    auto_eoi: bool
    rotate_on_auto_eoi: bool
    priority_add: int
    read_isr: bool
    special_mask: bool
    poll: bool


# Before any ICW1: idle, edge-triggered, nothing masked, vectors from 0.
POWER_ON = PicState(
    irr=0, isr=0, imr=0, lines=0, init_step=READY, expect_icw4=False, single=False,
    level_triggered=False, vector_base=0, auto_eoi=False, rotate_on_auto_eoi=False,
    priority_add=0, read_isr=False, special_mask=False, poll=False,
)


@dataclass(frozen=True, slots=True)
class PicPairState:
    master: PicState
    slave: PicState


class Pic8259:
    """One 8259A: a PortDevice over its command and data ports."""

    def __init__(self, output: Callable[[bool], None]) -> None:
        self._output = output
        self.restore(POWER_ON)

    @property
    def vector_base(self) -> int:
        return self._vector_base

    def set_irq(self, line: int, level: bool) -> None:
        bit = 1 << line
        if level:
            if self._level_triggered or not self._lines & bit:
                self._irr |= bit
            self._lines |= bit
        else:
            if self._level_triggered:
                self._irr &= ~bit
            self._lines &= ~bit
        self._update_output()

    def requested_line(self) -> Optional[int]:
        """The line INTA would take now, or None (what INT signals)."""
        line = self._highest(self._irr & ~self._imr)
        if line is None:
            return None
        serving = self._highest(self._in_service_that_blocks())
        if serving is None or self._rank(line) < self._rank(serving):
            return line
        return None

    def acknowledge(self, line: int) -> None:
        """The INTA cycle for ``line``: in service (unless AEOI), IRR cleared
        for edge-triggered inputs."""
        bit = 1 << line
        if self._auto_eoi:
            if self._rotate_on_auto_eoi:
                self._priority_add = (line + 1) % LINES
        else:
            self._isr |= bit
        if not self._level_triggered:
            self._irr &= ~bit
        self._update_output()

    def read(self, offset: int, size: int) -> int:
        if self._poll:
            # A poll command makes the next read an INTA in disguise.
            self._poll = False
            line = self.requested_line()
            if line is None:
                return 0
            self.acknowledge(line)
            return POLL_INTERRUPT | line
        if offset == DATA:
            return self._imr
        return self._isr if self._read_isr else self._irr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == COMMAND:
            if value & ICW1:
                self._write_icw1(value)
            elif value & OCW3:
                self._write_ocw3(value)
            else:
                self._write_ocw2(value)
        elif self._init_step == EXPECT_ICW2:
            self._vector_base = value & ICW2_BASE_MASK
            self._init_step = self._step_after_icw3() if self._single else EXPECT_ICW3
        elif self._init_step == EXPECT_ICW3:
            self._init_step = self._step_after_icw3()
        elif self._init_step == EXPECT_ICW4:
            self._auto_eoi = bool(value & ICW4_AEOI)
            self._init_step = READY
        else:
            self._imr = value  # OCW1
            self._update_output()

    def state(self) -> PicState:
        return PicState(
            irr=self._irr, isr=self._isr, imr=self._imr, lines=self._lines,
            init_step=self._init_step, expect_icw4=self._expect_icw4,
            single=self._single, level_triggered=self._level_triggered,
            vector_base=self._vector_base, auto_eoi=self._auto_eoi,
            rotate_on_auto_eoi=self._rotate_on_auto_eoi,
            priority_add=self._priority_add, read_isr=self._read_isr,
            special_mask=self._special_mask, poll=self._poll,
        )

    def restore(self, state: PicState) -> None:
        """Put the chip back as saved, without calling ``output``."""
        self._load(state)
        self._output_level = self.requested_line() is not None

    def _load(self, state: PicState) -> None:
        self._irr = state.irr
        self._isr = state.isr
        self._imr = state.imr
        self._lines = state.lines
        self._init_step = state.init_step
        self._expect_icw4 = state.expect_icw4
        self._single = state.single
        self._level_triggered = state.level_triggered
        self._vector_base = state.vector_base
        self._auto_eoi = state.auto_eoi
        self._rotate_on_auto_eoi = state.rotate_on_auto_eoi
        self._priority_add = state.priority_add
        self._read_isr = state.read_isr
        self._special_mask = state.special_mask
        self._poll = state.poll

    def _write_icw1(self, value: int) -> None:
        # ICW1 resets the chip's mode: IMR and ISR clear, IR7 becomes lowest
        # priority, and an edge input must make a fresh 0->1 transition.
        level_triggered = bool(value & ICW1_LTIM)
        self._load(replace(
            POWER_ON, lines=self._lines, irr=self._lines if level_triggered else 0,
            level_triggered=level_triggered, init_step=EXPECT_ICW2,
            expect_icw4=bool(value & ICW1_IC4), single=bool(value & ICW1_SNGL),
        ))
        self._update_output()

    def _step_after_icw3(self) -> int:
        return EXPECT_ICW4 if self._expect_icw4 else READY

    def _write_ocw2(self, value: int) -> None:
        command = value & OCW2_COMMAND_MASK
        level = value & OCW2_LEVEL_MASK
        if command in (OCW2_NONSPECIFIC_EOI, OCW2_ROTATE_NONSPECIFIC_EOI):
            line = self._highest(self._in_service_that_blocks())
            if line is not None:
                self._isr &= ~(1 << line)
                if command == OCW2_ROTATE_NONSPECIFIC_EOI:
                    self._priority_add = (line + 1) % LINES
        elif command in (OCW2_SPECIFIC_EOI, OCW2_ROTATE_SPECIFIC_EOI):
            self._isr &= ~(1 << level)
            if command == OCW2_ROTATE_SPECIFIC_EOI:
                self._priority_add = (level + 1) % LINES
        elif command == OCW2_SET_PRIORITY:
            self._priority_add = (level + 1) % LINES  # ``level`` becomes lowest
        elif command in (OCW2_ROTATE_AEOI_SET, OCW2_ROTATE_AEOI_CLEAR):
            self._rotate_on_auto_eoi = command == OCW2_ROTATE_AEOI_SET
        self._update_output()

    def _write_ocw3(self, value: int) -> None:
        if value & OCW3_RR:
            self._read_isr = bool(value & OCW3_RIS)
        if value & OCW3_ESMM:
            self._special_mask = bool(value & OCW3_SMM)
        self._poll = bool(value & OCW3_POLL)
        self._update_output()

    def _in_service_that_blocks(self) -> int:
        # In special mask mode a masked in-service level neither blocks
        # other levels nor is cleared by a non-specific EOI.
        return self._isr & ~self._imr if self._special_mask else self._isr

    def _rank(self, line: int) -> int:
        return (line - self._priority_add) % LINES

    def _highest(self, bits: int) -> Optional[int]:
        for rank in range(LINES):
            line = (rank + self._priority_add) % LINES
            if bits & (1 << line):
                return line
        return None

    def _update_output(self) -> None:
        level = self.requested_line() is not None
        if level != self._output_level:
            self._output_level = level
            self._output(level)


class PicPair:
    """Master and slave 8259A as wired in a PC; ``master`` and ``slave`` are
    the PortDevices to insert at 0x20 and 0xA0."""

    def __init__(self, intr: Callable[[bool], None] = lambda level: None) -> None:
        """``intr`` hears every change of the master's INT output, for a
        loop that would rather be told than ask ``has_interrupt``."""
        self.master = Pic8259(intr)
        self.slave = Pic8259(lambda level: self.master.set_irq(CASCADE_LINE, level))

    def set_irq(self, irq: int, level: bool) -> None:
        """Drive ISA IRQ line ``irq`` (0..15, not the cascade line 2)."""
        if not 0 <= irq < 2 * LINES or irq == CASCADE_LINE:
            raise ValueError(f"IRQ {irq} is not a device line")
        if irq < LINES:
            self.master.set_irq(irq, level)
        else:
            self.slave.set_irq(irq - LINES, level)

    def has_interrupt(self) -> bool:
        return self.master.requested_line() is not None

    def acknowledge(self) -> int:
        """Run an INTA cycle and return the vector to inject.

        With nothing pending this is a spurious interrupt: the vector of
        IR7 of the chip that was asked, with no ISR bit set on that chip.
        """
        line = self.master.requested_line()
        if line is None:
            return self.master.vector_base + SPURIOUS_LINE
        if line == CASCADE_LINE:
            slave_line = self.slave.requested_line()
            if slave_line is None:
                vector = self.slave.vector_base + SPURIOUS_LINE
            else:
                self.slave.acknowledge(slave_line)
                vector = self.slave.vector_base + slave_line
        else:
            vector = self.master.vector_base + line
        # The master takes IR2 into service even for a spurious slave
        # interrupt, so the guest must still EOI the master.
        self.master.acknowledge(line)
        return vector

    def state(self) -> PicPairState:
        return PicPairState(master=self.master.state(), slave=self.slave.state())

    def restore(self, state: PicPairState) -> None:
        self.master.restore(state.master)
        self.slave.restore(state.slave)
