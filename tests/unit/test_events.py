"""The event log codec: round trips, delta state per chunk, and malformed input."""
import random

import pytest

from rrstub import events as ev

ENTRIES = [
    ev.Point(0, time_ns=1000, ps_per_instr=610000),
    ev.Point(5, input=b"hello\n"),
    ev.ClockRead(5, 999),                    # time may go backwards in the log (zigzag delta)
    ev.Random(7, (1 << 64) - 1),
    ev.Check(9, (1 << 16) | 0x3F8, 0xFFFFFFFF80001000, 0x123456789ABCDEF0),
    ev.Point(12, time_ns=5_000_000_000, marker=3, marker_digest=bytes(range(16))),
    ev.Point(13, time_ns=5_000_000_001, landmark=tuple(range(18)), landmark_digest=42,
             check=(0x100000, 7)),
    ev.Point(13, input=b"\x00\xff" * 300),
    ev.End(20, "exit", 1, "detail text"),
]


def test_round_trip_keeps_every_field():
    enc = ev.EventEncoder()
    for e in ENTRIES:
        enc.add(e)
    first, count, payload = enc.take()
    assert (first, count) == (0, len(ENTRIES))
    assert list(ev.decode_events(payload)) == ENTRIES


def test_each_chunk_decodes_on_its_own():
    enc = ev.EventEncoder()
    enc.add(ENTRIES[0])
    enc.add(ENTRIES[1])
    _, _, one = enc.take()
    for e in ENTRIES[2:]:
        enc.add(e)
    first, count, two = enc.take()
    assert first == ENTRIES[2].pos and count == len(ENTRIES) - 2
    assert list(ev.decode_events(one)) == ENTRIES[:2]
    assert list(ev.decode_events(two)) == ENTRIES[2:]


def test_positions_must_not_go_backwards():
    enc = ev.EventEncoder()
    enc.add(ev.Point(10, input=b"x"))
    with pytest.raises(ValueError, match="backwards"):
        enc.add(ev.Point(9, input=b"y"))


@pytest.mark.parametrize("payload, message", [
    (b"\x00\x63", "unknown event kind"),
    (b"\x00\x01\x80", "unknown point flags"),
    (b"\x00\x01\x02\x05ab", "ends inside an entry"),
    (b"\xff\xff", "ends inside a number"),
    (b"\x00" + bytes([ev.KIND_RANDOM]) + b"\x01\x02", "ends inside an entry"),
])
def test_malformed_payloads_are_log_errors(payload, message):
    with pytest.raises(ev.LogError, match=message):
        list(ev.decode_events(payload))


def test_every_truncation_of_a_valid_payload_fails_cleanly_or_decodes_a_prefix():
    enc = ev.EventEncoder()
    for e in ENTRIES:
        enc.add(e)
    _, _, payload = enc.take()
    for cut in range(len(payload)):
        try:
            got = list(ev.decode_events(payload[:cut]))
        except ev.LogError:
            continue
        assert got == ENTRIES[:len(got)]


def test_random_bytes_either_decode_or_raise_log_error():
    rng = random.Random(1234)
    for _ in range(3000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        try:
            list(ev.decode_events(data))
        except ev.LogError:
            pass


def test_sigterm_during_a_flush_waits_until_the_chunk_is_written():
    """A SIGTERM handler raises in the main thread; between taking the buffered
    entries and writing them it would lose them (seen: a recording whose log began at its End)."""
    import os
    import signal

    from rrstub.engines.log import LogSink
    from rrstub.session import Terminated

    written = []

    class Writer:
        def add_events(self, first, last, count, payload):
            os.kill(os.getpid(), signal.SIGTERM)      # arrives while the chunk is being written
            written.append((first, last, count, payload))

    sink = LogSink(Writer())
    sink.emit(ev.Check(12, 1 << 16 | 0x3F9, 0x100000, 7))
    previous = signal.signal(signal.SIGTERM, Terminated.handler)
    try:
        with pytest.raises(Terminated):
            sink.flush(12)
            for _ in range(1000):                     # the handler runs at the next bytecodes
                pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(written) == 1 and written[0][2] == 1
    assert [e.pos for e in ev.decode_events(written[0][3])] == [12]
