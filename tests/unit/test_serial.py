"""Register-level tests of the 16550A model: no KVM, no clock."""
import pytest

from vmm.devices.serial import (
    FIFO_SIZE, IER, IER_EDSSI, IER_ELSI, IER_ERBFI, IER_ETBEI, IIR_FCR, LCR, LCR_DLAB, LSR,
    LSR_DR, LSR_OE, LSR_TEMT, LSR_THRE, MCR, MCR_DTR, MCR_LOOP, MCR_OUT1, MCR_OUT2, MCR_RTS,
    MSR, MSR_CTS, MSR_DCD, MSR_DCTS, MSR_DSR, MSR_RI, MSR_TERI, RBR_THR, SCR, Serial16550,
)

FIFO_ON = 0x01
FIFO_RX_RESET = 0x02
TRIGGER_BITS = {1: 0x00, 4: 0x40, 8: 0x80, 14: 0xC0}


class Uart:
    """A UART with its IRQ line and output recorded."""

    def __init__(self):
        self.irq_calls = []
        self.out = bytearray()
        self.dev = Serial16550(self.irq_calls.append, self.out.extend)

    def r(self, offset):
        return self.dev.read(offset, 1)

    def w(self, offset, value):
        self.dev.write(offset, 1, value)

    @property
    def line(self):
        return self.irq_calls[-1] if self.irq_calls else False


def test_reset_values():
    u = Uart()
    assert u.r(IIR_FCR) == 0x01
    assert u.r(LSR) == LSR_THRE | LSR_TEMT
    assert u.r(MSR) == MSR_CTS | MSR_DSR | MSR_DCD
    assert (u.r(IER), u.r(LCR), u.r(MCR)) == (0, 0, 0)


def test_transmit_is_immediate_and_divisor_latch_hides_thr():
    u = Uart()
    u.w(LCR, LCR_DLAB)
    u.w(RBR_THR, 0x01)
    u.w(IER, 0x00)
    assert (u.r(RBR_THR), u.r(IER)) == (0x01, 0x00)
    u.w(LCR, 0x03)
    for b in b"hi\n":
        u.w(RBR_THR, b)
        assert u.r(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
    assert bytes(u.out) == b"hi\n"
    u.w(LCR, LCR_DLAB)
    assert u.r(RBR_THR) == 0x01  # the divisor survived the THR writes
    u.w(SCR, 0x5A)
    assert u.r(SCR) == 0x5A


def test_thre_interrupt_cleared_by_iir_read_and_raised_by_thr_write():
    u = Uart()
    u.w(MCR, MCR_OUT2 | MCR_RTS)
    u.w(IER, IER_ETBEI)
    assert u.irq_calls == [True]
    assert u.r(IIR_FCR) == 0x02
    assert u.irq_calls == [True, False]
    assert u.r(IIR_FCR) == 0x01  # acknowledged
    u.w(RBR_THR, ord("x"))
    assert u.irq_calls == [True, False, True]


def test_thr_write_with_thre_pending_pulses_the_line():
    u = Uart()
    u.w(MCR, MCR_OUT2 | MCR_RTS)
    u.w(IER, IER_ETBEI)
    u.w(RBR_THR, ord("a"))
    # Cleared by the write, raised again as the byte leaves: a fresh edge.
    assert u.irq_calls == [True, False, True]


def test_etbei_rising_edge_raises_thre_again():
    u = Uart()
    u.w(MCR, MCR_OUT2 | MCR_RTS)
    u.w(IER, IER_ETBEI)
    u.r(IIR_FCR)
    u.w(IER, 0)
    u.w(IER, IER_ETBEI)
    assert u.r(IIR_FCR) == 0x02


def test_out2_gates_the_irq_line():
    u = Uart()
    u.w(IER, IER_ETBEI)
    assert u.irq_calls == []
    assert u.r(IIR_FCR) == 0x02  # pending all the same
    u.w(IER, 0)
    u.w(IER, IER_ETBEI)
    u.w(MCR, MCR_OUT2 | MCR_RTS)
    assert u.irq_calls == [True]
    u.w(MCR, 0)
    assert u.irq_calls == [True, False]


def test_host_input_waits_for_rts():
    """RS-232 hardware flow control: no input until the guest raises RTS."""
    u = Uart()
    u.w(MCR, MCR_DTR | MCR_OUT2)
    assert u.dev.rx_room() == 0
    assert u.dev.receive(b"early") == 0
    assert not u.r(LSR) & LSR_DR
    u.w(MCR, MCR_DTR | MCR_RTS | MCR_OUT2)
    assert u.dev.receive(b"early") == 1
    assert u.r(RBR_THR) == ord("e")
    u.w(MCR, MCR_DTR | MCR_OUT2)
    assert u.dev.receive(b"arly") == 0


def test_receive_without_fifo_takes_one_byte():
    u = Uart()
    u.w(MCR, MCR_RTS)
    assert u.dev.rx_room() == 1
    assert u.dev.receive(b"abc") == 1
    assert u.dev.rx_room() == 0
    assert u.dev.receive(b"bc") == 0
    assert u.r(LSR) & LSR_DR
    assert u.r(RBR_THR) == ord("a")
    assert not u.r(LSR) & LSR_DR
    assert u.dev.receive(b"bc") == 1
    assert u.r(RBR_THR) == ord("b")


def test_receive_with_fifo_back_pressure_never_overruns():
    u = Uart()
    u.w(MCR, MCR_RTS)
    u.w(IIR_FCR, FIFO_ON)
    assert u.dev.receive(bytes(range(20))) == FIFO_SIZE
    assert u.dev.receive(b"x") == 0
    assert not u.r(LSR) & LSR_OE
    assert [u.r(RBR_THR) for _ in range(FIFO_SIZE)] == list(range(16))
    assert u.r(LSR) == LSR_THRE | LSR_TEMT


@pytest.mark.parametrize("trigger", [1, 4, 8, 14])
def test_fifo_trigger_levels_and_character_timeout(trigger):
    u = Uart()
    u.w(MCR, MCR_OUT2 | MCR_RTS)
    u.w(IIR_FCR, FIFO_ON | TRIGGER_BITS[trigger])
    u.w(IER, IER_ERBFI)
    assert u.r(IIR_FCR) == 0xC1
    u.dev.receive(bytes(trigger - 1))
    if trigger > 1:
        assert u.r(IIR_FCR) == 0xCC  # below the trigger: timeout at once
        assert u.line
    u.dev.receive(b"!")
    assert u.r(IIR_FCR) == 0xC4
    u.r(RBR_THR)
    assert u.r(IIR_FCR) == (0xCC if trigger > 1 else 0xC1)
    for _ in range(trigger - 1):
        u.r(RBR_THR)
    assert u.r(IIR_FCR) == 0xC1
    assert not u.line


def test_received_data_outranks_thre_and_thre_outranks_modem_status():
    u = Uart()
    u.w(MCR, MCR_OUT2 | MCR_LOOP)
    u.w(IER, IER_ERBFI | IER_ETBEI | IER_EDSSI)
    u.w(MCR, MCR_OUT2 | MCR_LOOP | MCR_RTS)  # a CTS change in loopback
    u.w(RBR_THR, 0x41)                        # loops into the RX buffer
    assert u.r(IIR_FCR) == 0x04
    assert u.r(RBR_THR) == 0x41
    assert u.r(IIR_FCR) == 0x02
    assert u.r(IIR_FCR) == 0x00
    assert u.r(MSR) & MSR_DCTS
    assert u.r(IIR_FCR) == 0x01
    assert not u.line


def test_loopback_overrun_raises_line_status_above_received_data():
    u = Uart()
    u.w(MCR, MCR_OUT2 | MCR_LOOP)
    u.w(IER, IER_ERBFI | IER_ELSI)
    u.w(RBR_THR, 1)
    u.w(RBR_THR, 2)  # no FIFO: the holding register is full
    assert u.out == b""
    assert u.r(IIR_FCR) == 0x06
    assert u.r(LSR) == LSR_DR | LSR_OE | LSR_THRE | LSR_TEMT
    assert u.r(IIR_FCR) == 0x04  # reading LSR cleared the overrun
    assert u.r(RBR_THR) == 1


def test_loopback_modem_lines_follow_mcr_and_host_input_is_refused():
    u = Uart()
    u.w(MCR, MCR_LOOP | MCR_RTS | MCR_OUT2)  # what Linux's 8250 probe does
    assert u.r(MSR) & 0xF0 == MSR_CTS | MSR_DCD
    u.w(MCR, MCR_LOOP | MCR_DTR | MCR_OUT1)
    assert u.r(MSR) == MSR_DSR | MSR_RI | 0x0B  # DCTS, DDSR, DDCD
    u.w(MCR, MCR_LOOP)
    assert u.r(MSR) == MSR_TERI | 0x02  # ring's trailing edge; DSR dropped
    assert u.dev.rx_room() == 0
    assert u.dev.receive(b"x") == 0
    u.w(MCR, MCR_RTS)
    assert u.r(MSR) & 0xF0 == MSR_CTS | MSR_DSR | MSR_DCD
    assert u.dev.receive(b"x") == 1


def test_fifo_reset_and_disable_empty_the_fifo():
    u = Uart()
    u.w(MCR, MCR_RTS)
    u.w(IIR_FCR, FIFO_ON)
    u.dev.receive(b"abcd")
    u.w(IIR_FCR, FIFO_ON | FIFO_RX_RESET)
    assert not u.r(LSR) & LSR_DR
    u.dev.receive(b"abcd")
    u.w(IIR_FCR, 0)
    assert not u.r(LSR) & LSR_DR
    assert u.r(IIR_FCR) == 0x01  # FIFO bits clear when disabled
    assert u.dev.rx_room() == 1


def test_enabling_the_fifo_keeps_input_that_arrived_before():
    u = Uart()
    u.w(MCR, MCR_RTS)                 # a guest that raises RTS before enabling the FIFO
    assert u.dev.receive(b"xy") == 1
    u.w(IIR_FCR, 0x05)                # examples/lib/uart.c: FIFO on, TX reset
    assert u.dev.receive(b"y") == 1
    assert bytes([u.r(RBR_THR), u.r(RBR_THR)]) == b"xy"


def test_irq_called_only_on_level_changes():
    u = Uart()
    u.w(MCR, MCR_OUT2 | MCR_RTS)
    u.w(IIR_FCR, FIFO_ON | TRIGGER_BITS[4])
    u.w(IER, IER_ERBFI)
    for b in b"abcdef":
        u.dev.receive(bytes([b]))
    assert u.irq_calls == [True]
    for _ in range(6):
        u.r(RBR_THR)
    assert u.irq_calls == [True, False]


def test_state_restore_mid_operation():
    u = Uart()
    u.w(LCR, LCR_DLAB)
    u.w(RBR_THR, 0x03)
    u.w(LCR, 0x03)
    u.w(MCR, MCR_OUT2 | MCR_DTR | MCR_RTS)
    u.w(IIR_FCR, FIFO_ON | TRIGGER_BITS[8])
    u.w(IER, IER_ERBFI | IER_ETBEI)
    u.w(SCR, 0x77)
    u.dev.receive(b"hello")
    saved = u.dev.state()

    v = Uart()
    v.dev.restore(saved)
    assert v.irq_calls == []  # restore drives no edges
    assert v.dev.state() == saved
    assert v.r(IIR_FCR) == 0xCC
    assert bytes(v.r(RBR_THR) for _ in range(5)) == b"hello"
    assert v.r(IIR_FCR) == 0xC2
    assert v.r(IIR_FCR) == 0xC1
    assert v.irq_calls == [False]  # the restored line was high
    assert v.r(SCR) == 0x77
    v.w(LCR, 0x83)
    assert v.r(RBR_THR) == 0x03
