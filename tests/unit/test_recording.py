"""The recording container without a guest: round trip, cheap open, recovery
from truncation and from a killed recorder, damage found at every byte,
refused headers, and write errors."""
from __future__ import annotations

import errno
import os
import random
import struct
import subprocess
import sys
import zlib

import pytest

from conftest import ROOT
from rrstub import recording
from rrstub.recording import (CHUNK_HEADER_SIZE, FORMAT_VERSION, HEADER_SIZE, TRAILER_SIZE,
                              ChunkInfo, ChunkKind, Recording, RecordingError, RecordingWriter)

# The documented chunk header layout, kept apart from the module's own so a change shows here.
CHUNK = struct.Struct("<2sBBIIIIII")

CONFIG = {"mem": 64 << 20, "cmdline": "quiet", "engine": "singlestep"}
KERNEL = b"\x7fELF" + bytes(range(256)) * 4
SUMMARY = {"reason": "exit", "status": 0, "events": 7}


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def write_recording(path, blobs, events, *, finish=True) -> list[ChunkInfo]:
    """A marker per blob, with the event payloads after the first; returns the chunks added."""
    added = []
    with RecordingWriter(path, CONFIG, "hello.elf", KERNEL) as w:
        for i, blob in enumerate(blobs):
            added.append(w.add_marker({"index": i, "position": 100 * i, "label": f"m{i}"}, blob))
            if i == 0:
                for j, payload in enumerate(events):
                    added.append(w.add_events(10 * j, 10 * j + 9, 10, payload))
        if finish:
            w.finish(SUMMARY)
    return added


def small_recording(path, *, finish=True) -> list[ChunkInfo]:
    return write_recording(path, [b"snap0" * 20, b"snap1"], [b"ev0" * 30, b"ev1"], finish=finish)


def open_and_read_all(path) -> Recording:
    with Recording.open(path) as rec:
        rec.kernel_bytes()
        for c in rec.chunks:
            rec.payload(c)
    return rec


def test_round_trip(tmp_path):
    path = tmp_path / "rec.rrstub"
    blobs = [bytes(256 << 10), noise(4096, 1), b""]
    events = [noise(3000, 2), b"ab" * 5000, b"", b"x"]
    with RecordingWriter(path, CONFIG, "hello.elf", KERNEL) as w:
        added = [w.add_marker({"index": 0, "position": 0}, blobs[0])]
        added += [w.add_events(i, i + 1, 2, e) for i, e in enumerate(events[:2])]
        added += [w.add_marker({"index": 1, "position": 2, "regs": [1, 2]}, blobs[1])]
        added += [w.add_events(i, i + 1, 2, e) for i, e in enumerate(events[2:], 2)]
        added += [w.add_marker({"index": 2, "position": 4}, blobs[2])]
        assert w.raw_bytes == len(KERNEL) + sum(map(len, blobs + events))
        w.finish(SUMMARY)
        size = w.bytes_written
    assert 0 < size < w.raw_bytes
    with Recording.open(path) as rec:
        assert (rec.path, rec.version, rec.file_size) == (str(path), FORMAT_VERSION, size)
        assert (rec.recovered, rec.recovery_note, rec.summary) == (False, "", SUMMARY)
        assert rec.config == CONFIG
        assert rec.kernel_name == "hello.elf"
        assert rec.kernel_bytes() == KERNEL
        assert [c.kind for c in rec.chunks] == [ChunkKind.CONFIG, ChunkKind.KERNEL, *(c.kind for c in added),
                                                ChunkKind.END]
        assert rec.chunks[2:-1] == added
        assert rec.markers == [c for c in added if c.kind is ChunkKind.MARKER]
        assert [m.meta["regs"] for m in rec.markers if "regs" in m.meta] == [[1, 2]]
        assert [rec.payload(m) for m in rec.markers] == blobs
        assert [(c.meta, p) for c, p in rec.iter_event_payloads()] == [
            ({"first": i, "last": i + 1, "count": 2}, e) for i, e in enumerate(events)]
        assert rec.chunks[-1].offset + rec.chunks[-1].stored_size < size - TRAILER_SIZE


@pytest.mark.parametrize("finish", [True, False], ids=["index", "scan"])
def test_open_reads_no_payload(tmp_path, monkeypatch, finish):
    path = tmp_path / "rec"
    write_recording(path, [noise(50_000, i) for i in range(4)], [noise(50_000, 9)] * 6, finish=finish)
    reads = []
    real_pread = os.pread

    def pread(fd, n, offset):
        reads.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    with Recording.open(path) as rec:
        assert len(rec.markers) == 4 and len(rec.event_chunks) == 6
        assert rec.recovered is not finish
    assert sum(reads) < 2000 < rec.file_size // 100
    if finish:
        assert len(reads) <= 5


def test_unfinished_recording_is_recovered_whole(tmp_path):
    path = tmp_path / "rec"
    added = small_recording(path, finish=False)
    with Recording.open(path) as rec:
        assert rec.recovered and rec.summary is None
        assert rec.chunks[2:] == added
        assert rec.recovery_note == (
            "the recording is incomplete (no index at its end; the recorder was probably killed): "
            f"recovered {len(added) + 2} complete chunks up to byte offset {rec.file_size} of "
            f"{rec.file_size}")


def test_every_cut_in_the_last_chunks_recovers_the_complete_ones(tmp_path):
    full = tmp_path / "full"
    small_recording(full)
    data = full.read_bytes()
    with Recording.open(full) as rec:
        chunks, last_events = rec.chunks, rec.event_chunks[-1]
        payloads = {c.offset: rec.payload(c) for c in chunks}
    end = chunks[-1].offset + chunks[-1].stored_size
    index_end = len(data) - TRAILER_SIZE
    cut_path = tmp_path / "cut"
    for cut in range(last_events.offset, len(data)):
        cut_path.write_bytes(data[:cut])
        with Recording.open(cut_path) as rec:
            kept = [c for c in chunks if c.offset + c.stored_size <= cut]
            assert rec.chunks == kept, cut
            assert rec.recovered
            assert rec.summary == (SUMMARY if cut >= end else None)
            good_end = index_end if cut >= index_end else kept[-1].offset + kept[-1].stored_size
            assert (f"recovered {len(kept)} complete chunks up to byte offset {good_end} of {cut}"
                    in rec.recovery_note)
            if cut > good_end:
                assert f"the last {cut - good_end} bytes are an incomplete" in rec.recovery_note
            assert all(rec.payload(c) == payloads[c.offset] for c in rec.chunks)


@pytest.mark.parametrize("cut_in, message", [
    ("before CONFIG", "the machine configuration is missing"),
    ("inside CONFIG", "the machine configuration is missing"),
    ("after CONFIG", "the kernel image is missing"),
    ("inside KERNEL", "the kernel image is missing"),
    ("after KERNEL", "the initial snapshot is missing"),
    ("inside MARKER", "the initial snapshot is missing"),
])
def test_cut_before_the_first_snapshot_cannot_be_replayed(tmp_path, cut_in, message):
    path = tmp_path / "rec"
    small_recording(path, finish=False)
    data = path.read_bytes()
    with Recording.open(path) as rec:
        config, kernel, marker = rec.chunks[:3]
    cut = {"before CONFIG": HEADER_SIZE, "inside CONFIG": config.offset + 10,
           "after CONFIG": kernel.offset, "inside KERNEL": kernel.offset + CHUNK_HEADER_SIZE + 3,
           "after KERNEL": marker.offset, "inside MARKER": marker.offset + marker.stored_size - 1}[cut_in]
    path.write_bytes(data[:cut])
    with pytest.raises(RecordingError) as e:
        Recording.open(path)
    assert message in str(e.value) and "cannot be replayed" in str(e.value)
    assert str(path) in str(e.value) and e.value.path == str(path)


def regions(data: bytes, finished: bool):
    """(first byte, end, byte offset the error must name, found when) for every region of a file.

    Found "recovered": the damage is in the INDEX or the trailer, and the file
    opens by a scan of its chunks that names the damage in its recovery note.
    """
    out = [(0, len(recording.FILE_MAGIC), None, "open"), (len(recording.FILE_MAGIC), HEADER_SIZE, 0, "open")]
    pos, end = HEADER_SIZE, len(data) - (TRAILER_SIZE if finished else 0)
    while pos < end:
        _, kind, _, meta_len, stored_len, *_ = CHUNK.unpack_from(data, pos)
        payload_at = pos + CHUNK_HEADER_SIZE + meta_len
        found = "recovered" if kind == ChunkKind.INDEX else "payload" if finished else "open"
        out.append((pos, payload_at, pos, found))
        out.append((payload_at, payload_at + stored_len, pos,
                    "recovered" if kind == ChunkKind.INDEX else "payload"))
        pos = payload_at + stored_len
    if finished:
        out.append((end, len(data), end, "recovered"))
    return out


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
def test_a_flipped_byte_anywhere_is_reported_with_its_offset(tmp_path, finished):
    path = tmp_path / "rec"
    small_recording(path, finish=finished)
    data = path.read_bytes()
    open_and_read_all(path)
    for start, end, offset, found in regions(data, finished):
        for i in range(start, end):
            path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
            if found == "recovered":
                rec = open_and_read_all(path)
                assert rec.recovered and rec.summary == SUMMARY, i
                assert f"damaged at byte offset {offset} (" in rec.recovery_note, (i, rec.recovery_note)
                assert "nothing recorded is missing" in rec.recovery_note, i
                continue
            opened = False
            with pytest.raises(RecordingError) as e:
                with Recording.open(path) as rec:
                    opened = True
                    rec.kernel_bytes()
                    for c in rec.chunks:
                        rec.payload(c)
            msg = str(e.value)
            assert str(path) in msg, i
            if offset is None:
                assert "not an rrstub recording" in msg, i
            else:
                assert f"damaged at byte offset {offset} (" in msg and "re-copy it" in msg, (i, msg)
                assert e.value.offset == offset
            assert opened is (found == "payload"), (i, msg)


@pytest.mark.parametrize("content, message", [
    (b"", "truncated header: the file has 0 bytes"),
    (b"RRSTU", "truncated header: the file has 5 bytes"),
    (b"RRSTUBRC\x01\x00\x10", "truncated header"),
    (b"\x7fELF" + bytes(60), "is not an rrstub recording"),
    (b"hi", "is not an rrstub recording"),
])
def test_files_that_are_not_recordings(tmp_path, content, message):
    path = tmp_path / "rec"
    path.write_bytes(content)
    with pytest.raises(RecordingError, match=message) as e:
        Recording.open(path)
    assert str(path) in str(e.value)


def with_header(data: bytes, version: int, header_len: int) -> bytes:
    head = data[:8] + struct.pack("<HH", version, header_len)
    return head + struct.pack("<I", zlib.crc32(head)) + data[HEADER_SIZE:]


@pytest.mark.parametrize("version, header_len, message", [
    (2, HEADER_SIZE, "recorded by a newer rrstub (format 2, this rrstub reads up to 1): upgrade rrstub"),
    (0x100, 64, "recorded by a newer rrstub (format 256"),
    (0, HEADER_SIZE, "damaged at byte offset 0 (file header, format 0"),
    (1, 20, "damaged at byte offset 0 (file header, format 1 with a 20-byte header"),
])
def test_header_versions(tmp_path, version, header_len, message):
    path = tmp_path / "rec"
    small_recording(path)
    path.write_bytes(with_header(path.read_bytes(), version, header_len))
    with pytest.raises(RecordingError) as e:
        Recording.open(path)
    assert message in str(e.value)


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(RecordingError) as e:
        Recording.open(missing)
    assert str(e.value) == f"no such recording: {missing}"
    with pytest.raises(RecordingError, match="is a directory, not a recording"):
        Recording.open(tmp_path)


def test_kernel_sha256_is_checked_when_the_kernel_is_read(tmp_path):
    path = tmp_path / "rec"
    small_recording(path, finish=False)
    data = bytearray(path.read_bytes())
    with Recording.open(path) as rec:
        kernel = rec.chunks[1]
        sha = rec.kernel_sha256
    magic, kind, flags, meta_len, stored, raw, _, payload_crc, _ = CHUNK.unpack_from(data, kernel.offset)
    meta_at = kernel.offset + CHUNK_HEADER_SIZE
    meta = bytes(data[meta_at:meta_at + meta_len]).replace(sha.encode(), ("0" * 64).encode())
    head = CHUNK.pack(magic, kind, flags, meta_len, stored, raw, zlib.crc32(meta), payload_crc, 0)[:-4]
    data[kernel.offset:meta_at + meta_len] = head + struct.pack("<I", zlib.crc32(head)) + meta
    path.write_bytes(data)
    with Recording.open(path) as rec:
        assert rec.kernel_sha256 == "0" * 64
        with pytest.raises(RecordingError) as e:
            rec.kernel_bytes()
    assert f"damaged at byte offset {kernel.offset} (chunk kind KERNEL, the kernel image does not " \
           "match its sha256)" in str(e.value)


@pytest.mark.parametrize("forge, message", [
    (lambda w: w._add(ChunkKind.EVENTS, {"first": 0, "last": 0, "count": 0}, b""),
     "EVENTS at byte offset {} is out of place (events come before the initial snapshot)"),
    (lambda w: w._add(ChunkKind.KERNEL, {"name": "k", "sha256": "0"}, b""),
     "KERNEL at byte offset {} is out of place (a second KERNEL chunk)"),
    (lambda w: w._add(ChunkKind.END, {}, b""), "END at byte offset {} is out of place (chunks follow"),
])
def test_chunks_out_of_order_are_refused(tmp_path, forge, message):
    path = tmp_path / "rec"
    with RecordingWriter(path, CONFIG, "k", KERNEL) as w:
        at = w.bytes_written
        forge(w)
        w.add_marker({"index": 0, "position": 0}, b"")
    with pytest.raises(RecordingError) as e:
        Recording.open(path)
    assert message.format(at) in str(e.value)


@pytest.mark.parametrize("partial", [False, True], ids=["nothing-written", "half-written"])
def test_a_write_error_keeps_what_was_written(tmp_path, monkeypatch, partial):
    path = tmp_path / "rec"
    real_write = os.write
    w = RecordingWriter(path, CONFIG, "hello.elf", KERNEL)
    kept = [w.add_marker({"index": 0, "position": 0}, b"snap"), w.add_events(0, 5, 6, b"events")]
    good = w.bytes_written
    calls = []

    def full_disk(fd, data):
        calls.append(len(data))
        if partial and len(calls) == 1:
            return real_write(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(RecordingError) as e:
        w.add_events(6, 9, 4, noise(1000, 3))
    failed_at = good + (calls[0] // 2 if partial else 0)
    assert e.value.offset == failed_at == w.bytes_written
    assert (f"{path}: cannot write at byte offset {failed_at}: No space left on device; "
            f"the {good} bytes before this chunk are intact") == str(e.value)
    with pytest.raises(RecordingError, match="an earlier write to this recording failed"):
        w.finish(SUMMARY)
    w.close()
    monkeypatch.setattr(os, "write", real_write)
    with Recording.open(path) as rec:
        assert rec.recovered and rec.chunks[2:] == kept
        assert ("the last" in rec.recovery_note) is partial


def test_a_write_error_before_the_kernel_leaves_an_unreplayable_file(tmp_path, monkeypatch):
    path = tmp_path / "rec"
    real_write = os.write
    seen = []

    def third_write_fails(fd, data):
        seen.append(data)
        if len(seen) == 3:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", third_write_fails)
    with pytest.raises(RecordingError, match="Input/output error"):
        RecordingWriter(path, CONFIG, "hello.elf", KERNEL)
    monkeypatch.setattr(os, "write", real_write)
    with pytest.raises(RecordingError, match="the kernel image is missing"):
        Recording.open(path)


def test_fsync_failure_in_finish(tmp_path, monkeypatch):
    path = tmp_path / "rec"
    w = RecordingWriter(path, CONFIG, "k", KERNEL)
    w.add_marker({"index": 0, "position": 0}, b"")

    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(RecordingError, match="cannot flush the recording to disk: Input/output error"):
        w.finish(SUMMARY)
    w.close()


def test_sigkilled_recorder_leaves_every_complete_chunk(tmp_path):
    path = tmp_path / "rec"
    script = f"""
import os, signal
from rrstub.recording import RecordingWriter
w = RecordingWriter({str(path)!r}, {{"mem": 1}}, "k", b"kernel")
w.add_marker({{"index": 0, "position": 0}}, bytes(10000))
for i in range(5):
    w.add_events(i, i, 1, bytes([i]) * 100)
os.kill(os.getpid(), signal.SIGKILL)
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=30)
    assert r.returncode == -9, r.stderr
    with Recording.open(path) as rec:
        assert rec.recovered and rec.summary is None
        assert [p for _, p in rec.iter_event_payloads()] == [bytes([i]) * 100 for i in range(5)]
        assert rec.payload(rec.markers[0]) == bytes(10000)


def test_writer_contract(tmp_path, monkeypatch):
    w = RecordingWriter(tmp_path / "rec", CONFIG, "k", KERNEL)
    with pytest.raises(ValueError, match="initial snapshot first"):
        w.add_events(0, 1, 1, b"")
    with pytest.raises(ValueError, match="integer 'index' and 'position'"):
        w.add_marker({"index": 0}, b"")
    monkeypatch.setattr(recording, "_MAX_PAYLOAD", 10)
    with pytest.raises(RecordingError, match="a MARKER payload of 11 bytes is larger than a chunk can hold"):
        w.add_marker({"index": 0, "position": 0}, bytes(11))
    w.close()
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.add_marker({"index": 0, "position": 0}, b"")


def test_closed_recording_refuses_reads(tmp_path):
    path = tmp_path / "rec"
    small_recording(path)
    with Recording.open(path) as rec:
        pass
    rec.close()
    with pytest.raises(ValueError, match="closed"):
        rec.payload(rec.markers[0])
