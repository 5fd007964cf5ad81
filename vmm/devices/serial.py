"""A 16550A UART: the guest's console and its byte-stream link to the host.

Owns the eight UART registers, the 16-byte receive FIFO and the interrupt
line.  The transmitter is infinitely fast: a THR write hands the byte to
``output`` (or, in loopback, to the receive FIFO) before the write returns,
so THRE and TEMT always read set.  The host feeds input with ``receive``,
which takes only what fits in the FIFO: input is never lost to overrun,
the caller keeps the rest and offers it again once ``rx_room()`` grows.

Invariants:
* The IRQ line equals "an interrupt is pending and MCR.OUT2 is set";
  ``irq(level)`` is called only when that value changes.
* IIR reports the highest-priority pending source, as in the datasheet:
  receiver line status > received data / character timeout > THR empty >
  modem status.
* The only line-status error that can arise is overrun, and only in
  loopback (the guest's own bytes fill the FIFO); parity, framing and break
  never happen on this virtual line.
* Host input waits on RS-232 hardware flow control: it enters only while
  the guest asserts RTS (MCR bit 1) and is not in loopback, so a guest that
  configures the UART before raising RTS loses nothing to a slow start.
* Host input is lost only when the guest asks: RX reset, or switching the
  FIFO off (switching it on keeps a byte already held, unlike the chip).
* The character timeout is immediate: with the FIFO enabled, a FIFO holding
  fewer bytes than the trigger level interrupts at once, since no more
  input is on its way that instant.

Every register is eight bits wide; a wider access acts on the addressed
register with the low byte (reads zero-extend).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

PORT_COUNT = 8  # COM1 is 0x3F8..0x3FF, IRQ 4

# Register offsets.
RBR_THR = 0  # DLL when LCR.DLAB
IER = 1      # DLM when LCR.DLAB
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04   # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F

IIR_NONE = 0x01
IIR_RLS = 0x06
IIR_RDA = 0x04
IIR_CTI = 0x0C
IIR_THRE = 0x02
IIR_MSI = 0x00
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_RX_RESET = 0x02
FCR_TRIGGER_SHIFT = 6
TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08  # gates the IRQ line on a PC
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
# Outside loopback the host end of the line is always ready.
MSR_LINES_CONNECTED = MSR_CTS | MSR_DSR | MSR_DCD

FIFO_SIZE = 16
# The datasheet leaves the divisor undefined at reset; 12 is 9600 baud.
RESET_DIVISOR = 12


@dataclass(frozen=True, slots=True)
class SerialState:
    ier: int
    lcr: int
    mcr: int
    scr: int
    divisor: int
    fifo_enabled: bool
    trigger_level: int
    rx: bytes
    overrun: bool
    thre_pending: bool
    msr_delta: int


RESET = SerialState(
    ier=0, lcr=0, mcr=0, scr=0, divisor=RESET_DIVISOR, fifo_enabled=False,
    trigger_level=TRIGGER_LEVELS[0], rx=b"", overrun=False, thre_pending=False, msr_delta=0,
)


class Serial16550:
    def __init__(self, irq: Callable[[bool], None], output: Callable[[bytes], None]) -> None:
        self._irq = irq
        self._output = output
        self.restore(RESET)

    # ---- host side ----

    def rx_room(self) -> int:
        """How many bytes ``receive`` would accept now (0 without RTS, or in loopback)."""
        if self._mcr & MCR_LOOP or not self._mcr & MCR_RTS:
            return 0  # loopback: the receiver hears only the transmitter
        return self._rx_capacity() - len(self._rx)

    def receive(self, data: bytes) -> int:
        """Queue host input; returns how many leading bytes were taken."""
        taken = min(len(data), self.rx_room())
        self._rx.extend(data[:taken])
        if taken:
            self._update_irq()
        return taken

    # ---- guest side ----

    def read(self, offset: int, size: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                return self._divisor & 0xFF
            value = self._rx.popleft() if self._rx else 0
            self._update_irq()
            return value
        if offset == IER:
            return self._divisor >> 8 if dlab else self._ier
        if offset == IIR_FCR:
            source = self._pending_source()
            if source == IIR_THRE:
                self._thre_pending = False  # reading IIR acknowledges THRE
                self._update_irq()
            return source | (IIR_FIFO_ENABLED if self._fifo_enabled else 0)
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            value = LSR_THRE | LSR_TEMT
            if self._rx:
                value |= LSR_DR
            if self._overrun:
                value |= LSR_OE
                self._overrun = False
                self._update_irq()
            return value
        if offset == MSR:
            value = self._modem_lines() | self._msr_delta
            if self._msr_delta:
                self._msr_delta = 0
                self._update_irq()
            return value
        return self._scr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif offset == IER:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value & IER_MASK)
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._write_mcr(value & MCR_MASK)
        elif offset == SCR:
            self._scr = value
        # LSR and MSR are read-only; the factory-test writes they accept on
        # real parts have no use here.

    # ---- snapshots ----

    def state(self) -> SerialState:
        return SerialState(
            ier=self._ier, lcr=self._lcr, mcr=self._mcr, scr=self._scr,
            divisor=self._divisor, fifo_enabled=self._fifo_enabled,
            trigger_level=self._trigger_level, rx=bytes(self._rx),
            overrun=self._overrun, thre_pending=self._thre_pending,
            msr_delta=self._msr_delta,
        )

    def restore(self, state: SerialState) -> None:
        """Put the UART back as saved; does not call ``irq``, since the
        interrupt controller's own state already holds the line level."""
        self._ier = state.ier
        self._lcr = state.lcr
        self._mcr = state.mcr
        self._scr = state.scr
        self._divisor = state.divisor
        self._fifo_enabled = state.fifo_enabled
        self._trigger_level = state.trigger_level
        self._rx = deque(state.rx)
        self._overrun = state.overrun
        self._thre_pending = state.thre_pending
        self._msr_delta = state.msr_delta
        self._irq_level = self._line_level()

    # ---- internals ----

    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self._fifo_enabled else 1

    def _transmit(self, byte: int) -> None:
        # Writing THR clears the THRE interrupt; the byte then leaves at once
        # and THR is empty again, so the interrupt comes back.  The line can
        # thus drop and rise within one write, which gives an edge-triggered
        # PIC a fresh request, as a real (slower) UART would a moment later.
        self._thre_pending = False
        self._update_irq()
        if self._mcr & MCR_LOOP:
            if len(self._rx) < self._rx_capacity():
                self._rx.append(byte)
            else:
                self._overrun = True  # the shift register's byte is lost
        else:
            self._output(bytes([byte]))
        self._thre_pending = True
        self._update_irq()

    def _write_ier(self, value: int) -> None:
        rising = value & ~self._ier
        self._ier = value
        if rising & IER_ETBEI:
            self._thre_pending = True  # THR is always empty
        elif not value & IER_ETBEI:
            self._thre_pending = False
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE)
        # A real 16550 empties its FIFOs whenever the enable bit changes.
        # Here switching them on keeps the byte already held, so host input
        # offered before the guest set its UART up is not lost; switching
        # them off, or an RX reset, empties them.
        if value & FCR_RX_RESET or (self._fifo_enabled and not enable):
            self._rx.clear()
        self._fifo_enabled = enable
        # The other FCR bits are only programmed while bit 0 is written as 1.
        if enable:
            self._trigger_level = TRIGGER_LEVELS[value >> FCR_TRIGGER_SHIFT]
        self._update_irq()

    def _write_mcr(self, value: int) -> None:
        before = self._modem_lines()
        self._mcr = value
        changed = before ^ self._modem_lines()
        if changed & MSR_CTS:
            self._msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_delta |= MSR_DDSR
        if changed & MSR_DCD:
            self._msr_delta |= MSR_DDCD
        if before & MSR_RI and changed & MSR_RI:
            self._msr_delta |= MSR_TERI  # trailing edge of ring only
        self._update_irq()

    def _modem_lines(self) -> int:
        mcr = self._mcr
        if not mcr & MCR_LOOP:
            return MSR_LINES_CONNECTED
        # Loopback wires RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
        return ((MSR_CTS if mcr & MCR_RTS else 0) | (MSR_DSR if mcr & MCR_DTR else 0)
                | (MSR_RI if mcr & MCR_OUT1 else 0) | (MSR_DCD if mcr & MCR_OUT2 else 0))

    def _pending_source(self) -> int:
        ier = self._ier
        if ier & IER_ELSI and self._overrun:
            return IIR_RLS
        if ier & IER_ERBFI:
            count = len(self._rx)
            trigger = self._trigger_level if self._fifo_enabled else 1
            if count >= trigger:
                return IIR_RDA
            if count:
                return IIR_CTI
        if ier & IER_ETBEI and self._thre_pending:
            return IIR_THRE
        if ier & IER_EDSSI and self._msr_delta:
            return IIR_MSI
        return IIR_NONE

    def _line_level(self) -> bool:
        return self._pending_source() != IIR_NONE and bool(self._mcr & MCR_OUT2)

    def _update_irq(self) -> None:
        level = self._line_level()
        if level != self._irq_level:
            self._irq_level = level
            self._irq(level)
