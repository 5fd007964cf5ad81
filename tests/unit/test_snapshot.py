"""Marker blobs without KVM: page sets, device states, vCPU states, and what a reader refuses."""
import pickle
import random
import struct
from dataclasses import fields, is_dataclass, replace

import pytest

from vmm._native import ffi
from vmm.clock import ManualClock
from vmm.devices.acpi import AcpiPm
from vmm.devices.misc import DebugExit, I8042, PostCode
from vmm.devices.pic import PicPair
from vmm.devices.pit import Pit8254
from vmm.devices.rtc import CmosRtc
from vmm.devices.serial import Serial16550
from vmm.kvm import (REG_NAMES, SEGMENT_NAMES, VCPU_STATE_MAGIC, Regs, Segment, Sregs, VcpuState,
                     decode_vcpu_state, encode_vcpu_state, vcpu_state_digest)
from vmm.memory import PAGE_SIZE, GuestMemory
from vmm.snapshot import (DEVICES_MAGIC, DEVICES_VERSION, PAGES_MAGIC, PAGES_VERSION, DirtyTracker,
                          SnapshotError, apply_pages, decode_devices, encode_devices, encode_pages,
                          memory_digest, nonzero_pages, seal, state_classes)

NPAGES = 32


def page_of(byte: int) -> bytes:
    return bytes([byte]) * PAGE_SIZE


def sample_memory() -> bytearray:
    """Pages 3, 5 and 31 hold data; the rest are zero."""
    mem = bytearray(NPAGES * PAGE_SIZE)
    mem[3 * PAGE_SIZE:4 * PAGE_SIZE] = page_of(0x33)
    mem[5 * PAGE_SIZE + 100] = 0x55
    mem[31 * PAGE_SIZE:32 * PAGE_SIZE] = page_of(0xFF)
    return mem


# ---------------------------------------------------------------------------
# Page sets


def test_page_set_round_trip_elides_zero_pages():
    mem = sample_memory()
    blob = encode_pages(mem, [7, 3, 5, 3, 0])           # unordered, a duplicate, two zero pages
    assert len(blob) < 3 * PAGE_SIZE                     # pages 0 and 7 are listed, not stored
    scribbled = bytearray(b"\xAA" * len(mem))
    assert apply_pages(scribbled, blob) == 4
    for p in (0, 3, 5, 7):
        assert scribbled[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] == mem[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
    assert scribbled[PAGE_SIZE:2 * PAGE_SIZE] == b"\xAA" * PAGE_SIZE   # not listed: untouched


def test_page_set_without_elision_stores_zero_pages():
    mem = sample_memory()
    elided = encode_pages(mem, range(8))
    full = encode_pages(mem, range(8), elide_zero=False)
    assert len(full) - len(elided) == 6 * PAGE_SIZE
    target = bytearray(b"\x01" * len(mem))
    apply_pages(target, full)
    assert target[:8 * PAGE_SIZE] == mem[:8 * PAGE_SIZE]


def test_full_marker_restores_all_of_ram_including_pages_written_since():
    mem = GuestMemory(2 << 20)
    try:
        mem.write(0x3000, b"kernel text")
        mem.write(0x1FF000, page_of(7))
        before = memory_digest(mem)
        blob = encode_pages(mem, range(mem.size // PAGE_SIZE))
        assert len(blob) < 3 * PAGE_SIZE + mem.size // PAGE_SIZE * 4 + 64
        mem.write(0x3000, b"overwritten")
        mem.write(0x80000, b"a page that was zero")
        assert memory_digest(mem) != before
        apply_pages(mem, blob)
        assert memory_digest(mem) == before
    finally:
        mem.close()


def test_encoding_is_stable():
    mem = sample_memory()
    assert encode_pages(mem, [5, 3, 0]) == encode_pages(bytearray(mem), [0, 3, 5])
    blob = encode_pages(mem, [0, 3])
    assert blob[:4] == PAGES_MAGIC and struct.unpack_from("<H", blob, 4) == (PAGES_VERSION,)


def test_nonzero_pages():
    assert nonzero_pages(sample_memory()) == [3, 5, 31]
    mem = GuestMemory(2 << 20)
    try:
        assert nonzero_pages(mem) == []
        mem.write(0x1FFFFF, b"\x01")
        mem.write(0x1000, b"\x01")
        assert nonzero_pages(mem) == [1, 511]
    finally:
        mem.close()


def test_encode_refuses_pages_outside_memory():
    with pytest.raises(ValueError, match="page numbers must lie in 0..31"):
        encode_pages(sample_memory(), [32])


def reseal_pages(blob: bytes, edit) -> bytes:
    """The same page set with its payload edited and a valid seal (header is 4+2+8 bytes)."""
    return seal(PAGES_MAGIC, PAGES_VERSION, [edit(bytearray(blob[14:-4]))])


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-1], "header says"),
    (lambda b: b[:10], "too short"),
    (lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:], "checksum mismatch"),
    (lambda b: b"XXXX" + b[4:], "expected b'RRPG'"),
    (lambda b: seal(PAGES_MAGIC, PAGES_VERSION + 1, [b[14:-4]]), "newer rrstub"),
    (lambda b: seal(b"RRDV", 1, [b[14:-4]]), "expected b'RRPG'"),
    (lambda b: reseal_pages(b, lambda p: struct.pack("<I", 8192) + p[4:]), "page size 8192"),
    (lambda b: reseal_pages(b, lambda p: p + b"\0"), "do not fill"),
    # the stored list is [3, 5]: make it [5, 3], then [3, 40]
    (lambda b: reseal_pages(b, lambda p: p[:16] + struct.pack("<II", 5, 3) + p[24:]), "not strictly ascending"),
    (lambda b: reseal_pages(b, lambda p: p[:16] + struct.pack("<II", 3, 40) + p[24:]), "beyond guest RAM"),
    # the zero list is [0]: make it [3], which is also stored
    (lambda b: reseal_pages(b, lambda p: p[:12] + struct.pack("<I", 3) + p[16:]), "both as zero and as stored"),
])
def test_bad_page_sets_are_refused_and_change_nothing(damage, message):
    mem = sample_memory()
    blob = encode_pages(mem, [0, 3, 5])
    target = bytearray(b"\xEE" * len(mem))
    with pytest.raises(SnapshotError, match=message):
        apply_pages(target, damage(blob))
    assert target == b"\xEE" * len(mem)


# ---------------------------------------------------------------------------
# Dirty tracking (KVM's side faked: reading the log clears it, as KVM does)


class FakeDirtyLog:
    def __init__(self):
        self.written: set[int] = set()
        self.reads = 0

    def get_dirty_log(self, slot, npages):
        self.reads += 1
        bits = sum(1 << p for p in self.written)
        self.written = set()
        return bits.to_bytes((npages + 63) // 64 * 8, "little")


def test_dirty_tracker_accumulates_until_reset():
    vm = FakeDirtyLog()
    t = DirtyTracker(vm, 0, 200 * PAGE_SIZE)
    vm.written = {3, 150}
    t.collect()
    vm.written = {3, 64, 199}
    assert t.pages() == [3, 150]                  # as of the last collect
    t.collect()
    assert t.pages() == [3, 64, 150, 199]
    vm.written = {7}
    t.reset()                                     # page 7 belongs to the old interval
    t.collect()
    assert t.pages() == []
    vm.written = {9}
    t.collect()
    assert t.pages() == [9]


def test_dirty_digest_covers_page_numbers_and_contents():
    mem = bytearray(64 * PAGE_SIZE)
    vm = FakeDirtyLog()
    t = DirtyTracker(vm, 0, len(mem))
    vm.written = {1, 2}
    t.collect()
    d = t.digest(mem)
    assert d == t.digest(bytearray(mem)) and 0 <= d < 1 << 64
    mem[2 * PAGE_SIZE + 5] = 1
    assert t.digest(mem) != d
    mem[2 * PAGE_SIZE + 5] = 0
    mem[3 * PAGE_SIZE] = 1                        # not dirty: not covered
    assert t.digest(mem) == d
    vm.written = {3}
    t.collect()
    assert t.digest(mem) != d


# ---------------------------------------------------------------------------
# Device states


def busy_devices() -> dict:
    """Every device model, driven out of its reset state."""
    clock = ManualClock(5_000_000)
    serial = Serial16550(lambda level: None, lambda data: None)
    serial.write(3, 1, 0x80)          # DLAB
    serial.write(0, 1, 0x01)          # divisor 1
    serial.write(3, 1, 0x03)
    serial.write(2, 1, 0x01)          # FIFO on
    serial.write(4, 1, 0x02)          # RTS: ready for input
    serial.receive(b"typed\x00\xff")
    pics = PicPair()
    for chip, base in ((pics.master, 0x20), (pics.slave, 0x28)):
        for value in (0x11, base, 4, 0x01):
            chip.write(0 if value == 0x11 else 1, 1, value)
    pics.set_irq(4, True)
    pics.set_irq(9, True)
    pics.acknowledge()
    pit = Pit8254(clock, lambda level: None)
    pit.write(3, 1, 0x34)             # channel 0, lo/hi, rate generator
    pit.write(0, 1, 0x9C)
    pit.write(0, 1, 0x2E)
    pit.write(3, 1, 0xB0)             # channel 2, lo/hi, mode 0: one byte written so far
    pit.write(2, 1, 0x10)
    pit.write(3, 1, 0x00)             # latch channel 0
    rtc = CmosRtc(clock, lambda level: None, 1_700_000_000 * 10**9)
    rtc.write(0, 1, 0x0B)
    rtc.write(1, 1, 0x80 | 0x02)      # SET held: the calendar is frozen
    rtc.write(0, 1, 0x20)
    rtc.write(1, 1, 0x42)             # CMOS storage
    post = PostCode()
    post.write(0, 1, 0x5A)
    kbc = I8042(lambda: None)
    kbc.write(0, 1, 0)
    return {"com1": serial.state(), "pic": pics.state(), "pit": pit.state(), "rtc": rtc.state(),
            "post": post.state(), "i8042": kbc.state(), "debug-exit": DebugExit(lambda s: None).state(),
            "acpi_pm": _busy_pm().state(), "port_b": _busy_port_b(clock)}


def _busy_port_b(clock):
    pit = Pit8254(clock, lambda level: None)
    pit.write(3, 1, 0xB0)             # channel 2, lo/hi, mode 0
    pit.write(2, 1, 0x00)
    pit.write(2, 1, 0x10)
    clock.advance(1_000_000)
    pit.port_b_write(0x02)            # gate low: paused; speaker data on
    return pit.port_b.state()


def _busy_pm() -> AcpiPm:
    pm = AcpiPm(lambda: None)
    pm.write(2, 2, 0x20)          # PM1_EN: power button enable
    pm.write(4, 2, 0x0C00)        # PM1_CNT: SLP_TYP 3, SLP_EN clear
    return pm


def classes_in(value, found: set) -> set:
    if is_dataclass(value):
        found.add(type(value))
        for f in fields(value):
            classes_in(getattr(value, f.name), found)
    elif isinstance(value, tuple):
        for item in value:
            classes_in(item, found)
    return found


def test_device_states_round_trip():
    states = busy_devices()
    decoded = decode_devices(encode_devices(states))
    assert decoded == states
    assert list(decoded) == list(states)
    assert decoded["rtc"].frozen is not None and decoded["com1"].rx == b"typed\x00\xff"
    assert decoded["pit"].counters[0].latched != ()


def test_every_device_state_class_is_exercised():
    """A new state dataclass in vmm/devices must join busy_devices()."""
    seen = set()
    for state in busy_devices().values():
        classes_in(state, seen)
    assert seen == set(state_classes().values())


def test_device_states_restore_into_fresh_devices():
    states = decode_devices(encode_devices(busy_devices()))
    serial = Serial16550(lambda level: None, lambda data: None)
    serial.restore(states["com1"])
    pics = PicPair()
    pics.restore(states["pic"])
    assert (serial.state(), pics.state()) == (states["com1"], states["pic"])


def device_blob(payload: bytes) -> bytes:
    return seal(DEVICES_MAGIC, DEVICES_VERSION, [payload])


def named(text: str, size="<H") -> bytes:
    return struct.pack(size, len(text)) + text.encode()


ONE_DEVICE = struct.pack("<I", 1) + named("dev")


@pytest.mark.parametrize("blob, message", [
    (pickle.dumps({"com1": 1}), "expected b'RRDV'"),
    (b"", "too short"),
    (device_blob(ONE_DEVICE + b"\x06" + named("os.system") + b"\0\0"), "not a device state"),
    (device_blob(ONE_DEVICE + b"\x06" + named("builtins.eval") + b"\0\0"), "not a device state"),
    (device_blob(ONE_DEVICE + b"\x06" + named("vmm.devices.misc.PostCode") + b"\0\0"), "not a device state"),
    (device_blob(ONE_DEVICE + b"\x06" + named("vmm.devices.misc.PostCodeState") + b"\0\0"), "has fields"),
    (device_blob(ONE_DEVICE + b"\x06" + named("vmm.devices.misc.PostCodeState") + b"\2\0"
                 + named("value", "<B") + b"\0" + named("value", "<B") + b"\0"), "has fields"),
    (device_blob(ONE_DEVICE + b"\x05\1\0\0\0" * 40 + b"\0"), "nest deeper"),
    (device_blob(ONE_DEVICE + b"\x05\xff\xff\xff\xff"), "cannot fit"),
    (device_blob(ONE_DEVICE + b"\x04\xff\xff\xff\x7f"), "runs past the end"),
    (device_blob(ONE_DEVICE + b"\x09"), "unknown value tag 9"),
    (device_blob(ONE_DEVICE + b"\x00\x00"), "unexpected bytes at the end"),
    (device_blob(struct.pack("<I", 2) + named("dev") + b"\0" + named("dev") + b"\0"), "appears twice"),
    (device_blob(struct.pack("<I", 1) + b"\2\0\xff\xfe\0"), "not UTF-8"),
    (device_blob(struct.pack("<I", 2) + named("dev") + b"\0"), "truncated"),
])
def test_bad_device_blobs_are_refused(blob, message):
    with pytest.raises(SnapshotError, match=message):
        decode_devices(blob)


def test_device_blob_fuzz_parses_or_refuses():
    payload = bytearray(encode_devices(busy_devices())[14:-4])
    rng = random.Random(1)
    for _ in range(2000):
        damaged = bytearray(payload)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        if rng.random() < 0.3:
            del damaged[rng.randrange(len(damaged)):]
        try:
            decode_devices(device_blob(bytes(damaged)))
        except SnapshotError:
            pass


def test_encoding_refuses_values_it_could_not_decode():
    with pytest.raises(SnapshotError, match="not a frozen dataclass of vmm.devices"):
        encode_devices({"x": [1, 2]})
    with pytest.raises(SnapshotError, match="not a frozen dataclass of vmm.devices"):
        encode_devices({"x": Regs()})


# ---------------------------------------------------------------------------
# vCPU states (synthetic: no KVM)


def synthetic_state(seed: int = 0) -> VcpuState:
    rng = random.Random(seed)
    regs = Regs(*(rng.getrandbits(64) for _ in REG_NAMES))
    segs = {n: Segment(rng.getrandbits(64), rng.getrandbits(32), rng.getrandbits(16),
                       *(rng.getrandbits(8) for _ in range(9))) for n in SEGMENT_NAMES}
    sregs = Sregs(**segs, gdt_base=rng.getrandbits(64), gdt_limit=0xFFFF, idt_base=rng.getrandbits(64),
                  idt_limit=0xFFF, cr0=0x80050033, cr2=rng.getrandbits(64), cr3=0x9000, cr4=0x6A0,
                  cr8=0xF, efer=0xD01, apic_base=0xFEE00900, interrupt_bitmap=(1 << 63, 0, 2, 0))

    def raw(ctype):
        return rng.randbytes(ffi.sizeof(ctype))

    return VcpuState(regs, sregs, raw("struct kvm_xsave"), raw("struct kvm_vcpu_events"),
                     raw("struct kvm_debugregs"), ((0x174, 0x10), (0xC0000082, (1 << 64) - 1)),
                     raw("struct kvm_xcrs"))


def test_vcpu_state_round_trip():
    state = synthetic_state()
    blob = encode_vcpu_state(state)
    assert blob[:4] == VCPU_STATE_MAGIC
    assert decode_vcpu_state(blob) == state
    assert encode_vcpu_state(decode_vcpu_state(blob)) == blob
    assert decode_vcpu_state(encode_vcpu_state(replace(state, msrs=()))).msrs == ()


def test_vcpu_state_digest():
    a, b = synthetic_state(), synthetic_state()
    assert vcpu_state_digest(a) == vcpu_state_digest(b) and len(vcpu_state_digest(a)) == 16
    b.regs.rip ^= 1
    assert vcpu_state_digest(a) != vcpu_state_digest(b)
    c = replace(a, events=a.events[:-1] + bytes([a.events[-1] ^ 0x80]))
    assert vcpu_state_digest(a) != vcpu_state_digest(c)


def test_bad_vcpu_states_are_refused():
    blob = encode_vcpu_state(synthetic_state())
    payload = blob[14:-4]
    with pytest.raises(SnapshotError, match="newer rrstub"):
        decode_vcpu_state(seal(VCPU_STATE_MAGIC, 2, [payload]))
    with pytest.raises(SnapshotError, match="truncated"):
        decode_vcpu_state(seal(VCPU_STATE_MAGIC, 1, [payload[:100]]))
    with pytest.raises(SnapshotError, match="2 MSRs do not fill"):
        decode_vcpu_state(seal(VCPU_STATE_MAGIC, 1, [payload + b"\0"]))
    short_xsave = encode_vcpu_state(replace(synthetic_state(), xsave=bytes(512)))
    with pytest.raises(SnapshotError, match="xsave is 512 bytes, struct kvm_xsave is 4096"):
        decode_vcpu_state(short_xsave)
    with pytest.raises(SnapshotError, match="expected b'RRVC'"):
        decode_vcpu_state(encode_pages(sample_memory(), [3]))
