"""Tests of the port bus: ranges, overlaps, offsets, unclaimed ports."""
import pytest

from vmm.bus import BusError, PortBus


class Recorder:
    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return 0x1234_5600 | offset

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


@pytest.mark.parametrize("base, length", [
    (0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3F0, 0x20), (0x3FA, 2),
])
def test_insert_refuses_overlaps(base, length):
    bus = PortBus()
    bus.insert(Recorder(), 0x3F8, 8)
    with pytest.raises(BusError):
        bus.insert(Recorder(), base, length)


def test_adjacent_ranges_are_fine_and_bad_ranges_refused():
    bus = PortBus()
    bus.insert(Recorder(), 0x3F8, 8)
    bus.insert(Recorder(), 0x3F0, 8)
    bus.insert(Recorder(), 0x400, 1)
    for base, length in ((0xFFFF, 2), (0x10, 0), (-1, 1)):
        with pytest.raises(BusError):
            bus.insert(Recorder(), base, length)


def test_devices_see_offsets_and_reads_are_masked_to_size():
    bus = PortBus()
    dev = Recorder()
    bus.insert(dev, 0x70, 2)
    assert bus.read(0x71, 1) == 0x01
    assert bus.read(0x71, 2) == 0x5601
    bus.write(0x70, 1, 0x1FF)
    assert dev.writes == [(0, 1, 0xFF)]


@pytest.mark.parametrize("size, ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF)])
def test_unclaimed_ports_read_all_ones_and_ignore_writes(size, ones):
    bus = PortBus()
    dev = Recorder()
    bus.insert(dev, 0x60, 5)
    assert bus.read(0x65, size) == ones
    assert bus.read(0x5F, size) == ones
    bus.write(0x65, size, 0)
    assert dev.writes == []
