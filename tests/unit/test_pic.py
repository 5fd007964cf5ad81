"""Register-level tests of the cascaded 8259A pair."""
import pytest

from vmm.devices.pic import COMMAND, DATA, PicPair

READ_IRR = 0x0A
READ_ISR = 0x0B
POLL = 0x0C
EOI = 0x20
ROTATE_EOI = 0xA0
SET_SMM = 0x68
CLEAR_SMM = 0x48


def specific_eoi(line):
    return 0x60 | line


def init_linux(pair, auto_eoi=False):
    """arch/x86/kernel/i8259.c init_8259A: vectors 0x30/0x38, all masked."""
    m, s = pair.master, pair.slave
    m.write(DATA, 1, 0xFF)
    s.write(DATA, 1, 0xFF)
    m.write(COMMAND, 1, 0x11)
    m.write(DATA, 1, 0x30)
    m.write(DATA, 1, 0x04)
    m.write(DATA, 1, 0x03 if auto_eoi else 0x01)
    s.write(COMMAND, 1, 0x11)
    s.write(DATA, 1, 0x38)
    s.write(DATA, 1, 0x02)
    s.write(DATA, 1, 0x01)
    m.write(DATA, 1, 0xFB)  # everything masked but the cascade
    s.write(DATA, 1, 0xFF)


def init_small(pair):
    """examples/lib/pic.c: both chips interleaved, vectors 0x20/0x28, then
    (here) everything unmasked."""
    m, s = pair.master, pair.slave
    m.write(COMMAND, 1, 0x11)
    s.write(COMMAND, 1, 0x11)
    m.write(DATA, 1, 0x20)
    s.write(DATA, 1, 0x28)
    m.write(DATA, 1, 0x04)
    s.write(DATA, 1, 0x02)
    m.write(DATA, 1, 0x01)
    s.write(DATA, 1, 0x01)
    m.write(DATA, 1, 0x00)
    s.write(DATA, 1, 0x00)


def regs(chip):
    chip.write(COMMAND, 1, READ_IRR)
    irr = chip.read(COMMAND, 1)
    chip.write(COMMAND, 1, READ_ISR)
    isr = chip.read(COMMAND, 1)
    return irr, isr, chip.read(DATA, 1)


def pulse(pair, irq):
    pair.set_irq(irq, True)
    pair.set_irq(irq, False)


@pytest.fixture
def pair():
    p = PicPair()
    init_small(p)
    return p


def test_linux_init_sequence_and_masking():
    p = PicPair()
    init_linux(p)
    assert regs(p.master) == (0, 0, 0xFB)
    assert regs(p.slave) == (0, 0, 0xFF)
    pulse(p, 0)
    assert not p.has_interrupt()       # masked, but latched
    assert regs(p.master)[0] == 0x01
    p.master.write(DATA, 1, 0xFA)
    assert p.has_interrupt()
    assert p.acknowledge() == 0x30
    assert regs(p.master) == (0, 0x01, 0xFA)


def test_single_mode_skips_icw3_and_no_icw4_means_normal_eoi():
    p = PicPair()
    p.master.write(COMMAND, 1, 0x12)   # SNGL, no IC4
    p.master.write(DATA, 1, 0x40)      # ICW2, then ready at once
    p.master.write(DATA, 1, 0xFD)      # so this is OCW1
    assert p.master.read(DATA, 1) == 0xFD
    pulse(p, 1)
    assert p.acknowledge() == 0x41
    assert regs(p.master)[1] == 0x02   # in service: not auto-EOI


def test_edge_triggering_latches_pulses_and_needs_a_fresh_edge(pair):
    pulse(pair, 3)
    assert pair.has_interrupt()        # the request outlived the pulse
    assert pair.acknowledge() == 0x23
    pair.master.write(COMMAND, 1, EOI)
    pair.set_irq(4, True)
    assert pair.acknowledge() == 0x24
    pair.master.write(COMMAND, 1, EOI)
    pair.set_irq(4, True)              # still high: no new edge
    assert not pair.has_interrupt()
    pulse(pair, 4)
    pulse(pair, 4)
    assert pair.has_interrupt()


def test_priority_order_and_nesting(pair):
    pulse(pair, 5)
    pulse(pair, 1)
    pulse(pair, 3)
    assert pair.acknowledge() == 0x21
    assert not pair.has_interrupt()    # 3 and 5 wait behind 1
    pulse(pair, 0)
    assert pair.acknowledge() == 0x20  # 0 outranks 1: nests
    assert regs(pair.master)[1] == 0x03
    pair.master.write(COMMAND, 1, EOI)  # non-specific: clears 0
    assert regs(pair.master)[1] == 0x02
    assert not pair.has_interrupt()
    pair.master.write(COMMAND, 1, EOI)
    assert pair.acknowledge() == 0x23
    pair.master.write(COMMAND, 1, EOI)
    assert pair.acknowledge() == 0x25


def test_specific_eoi_clears_the_named_level(pair):
    pulse(pair, 6)
    pair.acknowledge()
    pulse(pair, 1)
    pair.acknowledge()
    pair.master.write(COMMAND, 1, specific_eoi(6))
    assert regs(pair.master)[1] == 0x02


def test_rotate_on_non_specific_eoi_makes_the_served_line_lowest(pair):
    pulse(pair, 0)
    assert pair.acknowledge() == 0x20
    pulse(pair, 0)
    pulse(pair, 7)
    pair.master.write(COMMAND, 1, ROTATE_EOI)  # IR0 now lowest, IR1 highest
    assert pair.acknowledge() == 0x27
    pair.master.write(COMMAND, 1, ROTATE_EOI)  # IR7 lowest, IR0 highest again
    assert pair.acknowledge() == 0x20


def test_set_priority_and_rotate_on_specific_eoi(pair):
    pair.master.write(COMMAND, 1, 0xC0 | 4)    # IR4 lowest, IR5 highest
    for line in (0, 4, 5, 6):
        pulse(pair, line)
    assert pair.acknowledge() == 0x25
    pair.master.write(COMMAND, 1, 0xE0 | 5)    # rotate on specific EOI 5: IR6 highest
    assert pair.acknowledge() == 0x26
    pair.master.write(COMMAND, 1, EOI)
    assert pair.acknowledge() == 0x20
    pair.master.write(COMMAND, 1, EOI)
    assert pair.acknowledge() == 0x24


def test_auto_eoi_and_rotate_in_auto_eoi_mode():
    p = PicPair()
    init_linux(p, auto_eoi=True)
    p.master.write(DATA, 1, 0x00)
    pulse(p, 2 + 1)
    pulse(p, 5)
    assert p.acknowledge() == 0x33
    assert regs(p.master)[1] == 0      # AEOI: nothing in service
    assert p.acknowledge() == 0x35
    p.master.write(COMMAND, 1, 0x80)   # rotate in AEOI mode: set
    pulse(p, 0)
    assert p.acknowledge() == 0x30     # IR0 now lowest
    pulse(p, 0)
    pulse(p, 7)
    assert p.acknowledge() == 0x37
    p.master.write(COMMAND, 1, 0x00)   # clear: priorities stay where they are
    pulse(p, 0)
    pulse(p, 1)
    assert p.acknowledge() == 0x30


def test_spurious_interrupt_on_master(pair):
    pair.set_irq(5, True)
    pair.master.write(DATA, 1, 0x20)   # masked before INTA
    assert pair.acknowledge() == 0x27
    assert regs(pair.master)[1] == 0   # spurious IRQ7 is not in service


def test_cascade_delivers_slave_vectors(pair):
    pulse(pair, 8)
    assert regs(pair.master)[0] == 0x04  # slave INT on master IR2
    assert pair.acknowledge() == 0x28
    assert regs(pair.master)[1] == 0x04
    assert regs(pair.slave)[1] == 0x01
    pulse(pair, 14)
    assert not pair.has_interrupt()      # master IR2 still in service
    pair.slave.write(COMMAND, 1, EOI)
    pair.master.write(COMMAND, 1, EOI)
    assert pair.acknowledge() == 0x2E
    pair.slave.write(COMMAND, 1, EOI)
    pair.master.write(COMMAND, 1, EOI)
    pulse(pair, 12)
    pulse(pair, 1)
    assert pair.acknowledge() == 0x21    # master IR1 outranks the cascade
    pair.master.write(COMMAND, 1, EOI)
    assert pair.acknowledge() == 0x2C


def test_spurious_interrupt_on_slave_leaves_master_ir2_in_service(pair):
    pair.set_irq(10, True)
    pair.slave.write(DATA, 1, 0x04)      # slave masks it after raising INT
    assert pair.has_interrupt()          # the master latched the edge on IR2
    assert pair.acknowledge() == 0x2F
    assert regs(pair.slave)[1] == 0
    assert regs(pair.master)[1] == 0x04  # the guest must EOI the master


def test_level_triggered_mode_follows_the_line():
    p = PicPair()
    p.master.write(COMMAND, 1, 0x19)     # LTIM
    for icw in (0x20, 0x04, 0x01):
        p.master.write(DATA, 1, icw)
    p.set_irq(3, True)
    assert p.acknowledge() == 0x23
    assert regs(p.master)[0] == 0x08     # INTA does not clear a level request
    p.master.write(COMMAND, 1, EOI)
    assert p.has_interrupt()             # still high: interrupts again
    p.set_irq(3, False)
    assert not p.has_interrupt()


def test_poll_command_acknowledges_without_inta(pair):
    pair.master.write(COMMAND, 1, POLL)
    assert pair.master.read(COMMAND, 1) == 0x00
    pulse(pair, 6)
    pair.master.write(COMMAND, 1, POLL)
    assert pair.master.read(COMMAND, 1) == 0x86
    assert regs(pair.master)[:2] == (0, 0x40)
    assert not pair.has_interrupt()


def test_special_mask_mode_lets_lower_levels_through(pair):
    pulse(pair, 1)
    assert pair.acknowledge() == 0x21
    pair.master.write(DATA, 1, 0x02)     # the handler masks its own level
    pulse(pair, 5)
    assert not pair.has_interrupt()      # fully nested: 1 blocks 5
    pair.master.write(COMMAND, 1, SET_SMM)
    assert pair.has_interrupt()
    assert pair.acknowledge() == 0x25
    pair.master.write(COMMAND, 1, EOI)   # non-specific EOI skips masked IS1
    assert regs(pair.master)[1] == 0x02
    pair.master.write(COMMAND, 1, CLEAR_SMM)
    pair.master.write(COMMAND, 1, specific_eoi(1))
    assert regs(pair.master)[1] == 0


def test_intr_callback_reports_changes_only():
    calls = []
    p = PicPair(calls.append)
    init_small(p)
    pulse(p, 0)
    pulse(p, 1)
    assert calls == [True]
    p.acknowledge()
    assert calls == [True, False]       # 1 waits behind in-service 0
    p.master.write(COMMAND, 1, EOI)
    assert calls == [True, False, True]


def test_reinit_clears_state_and_requires_new_edges(pair):
    pair.set_irq(4, True)
    pair.acknowledge()
    init_small(pair)
    assert regs(pair.master) == (0, 0, 0)
    assert not pair.has_interrupt()


def test_reinit_of_the_slave_drops_its_cascade_output(pair):
    pair.set_irq(9, True)
    pair.master.write(DATA, 1, 0x04)     # master IR2 masked: the request waits
    init_small(pair)                     # slave IRR cleared, its INT falls
    pulse(pair, 8)                       # so a new request is a new IR2 edge
    assert pair.acknowledge() == 0x28


def test_cascade_line_is_not_a_device_line(pair):
    for irq in (2, -1, 16):
        with pytest.raises(ValueError):
            pair.set_irq(irq, True)


def test_state_restore_mid_operation(pair):
    pair.master.write(COMMAND, 1, 0xC0 | 2)   # IR3 highest
    pulse(pair, 9)
    pulse(pair, 4)
    pulse(pair, 3)
    assert pair.acknowledge() == 0x23
    pair.slave.write(COMMAND, 1, READ_ISR)
    saved = pair.state()

    calls = []
    twin = PicPair(calls.append)
    twin.restore(saved)
    assert calls == []
    assert twin.state() == saved
    assert twin.slave.read(COMMAND, 1) == 0   # OCW3 read select survived
    for p in (pair, twin):
        p.master.write(COMMAND, 1, EOI)
        assert p.acknowledge() == 0x24
        p.master.write(COMMAND, 1, EOI)
        assert p.acknowledge() == 0x29
    assert calls == [True, False, True, False]
