"""Tests of the POST code port, the i8042 reset line and the debug-exit port."""
from vmm.devices.misc import DebugExit, I8042, PostCode


def test_post_code_reads_back_the_last_write():
    post = PostCode()
    assert post.read(0, 1) == 0
    post.write(0, 1, 0xA5)
    post.write(0, 1, 0x3C)
    assert post.read(0, 1) == 0x3C
    saved = post.state()
    other = PostCode()
    other.restore(saved)
    assert other.read(0, 1) == 0x3C


def test_i8042_reset_command():
    resets = []
    kbc = I8042(lambda: resets.append(True))
    kbc.write(4, 1, 0xAA)          # self-test: accepted, no reply, no reset
    kbc.write(4, 1, 0xFF)          # pulse nothing: bit 0 stays high
    assert resets == []
    kbc.write(0, 1, 0xFE)          # 0xFE to the data port is a keyboard byte
    assert resets == []
    kbc.write(4, 1, 0xFE)
    assert resets == [True]
    kbc.write(4, 1, 0xF0)          # pulses every output bit, reset included
    assert resets == [True, True]


def test_i8042_status_and_data():
    kbc = I8042(lambda: None)
    assert kbc.read(4, 1) == 0x1C  # no output buffer, system flag, unlocked
    assert kbc.read(0, 1) == 0
    kbc.write(0, 1, 0x00)
    assert kbc.read(4, 1) == 0x14  # the last write was data
    assert kbc.read(1, 1) == 0     # port 0x61: no NMI reason
    saved = kbc.state()
    other = I8042(lambda: None)
    other.restore(saved)
    assert other.read(4, 1) == 0x14


def test_debug_exit_on_byte_writes_only():
    codes = []
    port = DebugExit(codes.append)
    assert port.read(0, 1) == 0xFF
    port.write(0, 2, 0x0102)
    assert codes == []
    port.write(0, 1, 0x2A)
    assert codes == [0x2A]
    port.restore(port.state())
