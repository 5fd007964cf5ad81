"""The index's parts that need no KVM: columns from the C records, segments, the reverse-watch answer."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT
from rrstub.index.builder import segments
from rrstub.index.capture import _WRITE, StepRecorder
from rrstub.index.query import Index, Write, last_change


def test_write_columns_keep_each_records_bytes_and_unknown_old_bytes_are_null():
    rec = StepRecorder([0x1000])
    w = np.zeros(3, _WRITE)
    w["pos"] = [5, 6, 9]
    w["va"] = [0x2000, 0x3000, 0x4000]
    w["size"] = [4, 2, 8]
    w["has_old"] = [1, 0, 1]
    w["kind"] = [0, 1, 0]
    w["vector"] = [0, 32, 0]
    rec._writes = [w]
    rec._old = [b"\x01\x02\x03\x04" + b"ABCDEFGH"]          # only the records that have old bytes
    rec._new = [b"\x05\x06\x07\x08" + b"\xaa\xbb" + b"abcdefgh"]
    t = rec._write_table().to_pylist()
    assert [r["old"] for r in t] == [b"\x01\x02\x03\x04", None, b"ABCDEFGH"]
    assert [r["new"] for r in t] == [b"\x05\x06\x07\x08", b"\xaa\xbb", b"abcdefgh"]
    assert [r["kind"] for r in t] == ["store", "frame", "store"]
    assert [r["vector"] for r in t] == [None, 32, None]


def _marker(index, position):
    return SimpleNamespace(meta={"index": index, "position": position})


def test_an_exact_recording_is_cut_at_its_markers_and_a_fast_one_is_one_segment():
    exact = SimpleNamespace(config={"mode": "exact"}, markers=[_marker(0, 0), _marker(1, 100), _marker(2, 250)],
                            position_range=lambda: (0, 400))
    got = [(s.marker, s.start, s.end, s.next_marker) for s in segments(exact)]
    assert got == [(0, 0, 100, 1), (1, 100, 250, 2), (2, 250, None, None)]
    assert segments(exact)[1].words() == "segment m1..m2"
    fast = SimpleNamespace(config={"mode": "fast"}, markers=exact.markers, position_range=lambda: (0, 400))
    assert [(s.marker, s.start, s.end) for s in segments(fast)] == [(None, 0, None)]


class _FakeIndex:
    """``last_change`` asks only for ``meta``, ``_covers`` and ``_writes``: a list of writes to one address."""
    _covers = Index._covers

    def __init__(self, writes, meta=None):
        self.writes = writes
        self.meta = meta or {"undecoded": 0, "dropped": 0}

    def _writes(self, sql, params):
        before, first = params[3], params[4]
        found = sorted((w for w in self.writes if first <= w.pos < before), key=lambda w: -w.pos)
        return found[:256]


def _w(pos, old, new, vaddr=0x100):
    return Write(pos, 0, vaddr, vaddr, len(new), old, new, "store", None, "f")


def test_reverse_watch_answer_skips_writes_that_left_the_watched_bytes_as_they_were():
    ix = _FakeIndex([_w(10, b"\0\0", b"\1\0"), _w(20, b"\1\0", b"\1\0"), _w(30, b"\1\0", b"\1\7")])
    assert last_change(ix, 0x100, 1, 1000, 0) == (True, ix.writes[0])     # only byte 0x100 is watched
    assert last_change(ix, 0x101, 1, 1000, 0) == (True, ix.writes[2])
    assert last_change(ix, 0x100, 2, 30, 0) == (True, ix.writes[0])       # before 30: 20 changed nothing
    assert last_change(ix, 0x100, 2, 10, 0) == (True, None)               # nothing before 10
    assert last_change(ix, 0x100, 2, 1000, 11) == (True, ix.writes[2])


def test_reverse_watch_answer_pages_through_unchanged_writes_and_gives_up_where_it_cannot_know():
    same = [_w(p, b"\5", b"\5") for p in range(100, 700)]
    ix = _FakeIndex([_w(50, b"\0", b"\5")] + same)
    assert last_change(ix, 0x100, 1, 10_000, 0) == (True, ix.writes[0])
    assert last_change(_FakeIndex([_w(5, None, b"\1")]), 0x100, 1, 100, 0) == (False, None)
    assert last_change(_FakeIndex([], {"undecoded": 3, "dropped": 0}), 0x100, 1, 100, 0) == (False, None)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rrstub", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_commands_name_a_missing_recording_and_a_missing_question(tmp_path):
    r = _cli("query", str(tmp_path / "none.rrr"), "who-wrote", "counter")
    assert r.returncode == 2 and "no such recording" in r.stderr, r.stderr
    r = _cli("index", str(tmp_path / "none.rrr"))
    assert r.returncode == 2 and "no such recording" in r.stderr, r.stderr
    r = _cli("query", str(tmp_path / "none.rrr"))
    assert r.returncode == 2 and "give a question" in r.stderr, r.stderr
    r = _cli("index", str(tmp_path / "none.rrr"), "--workers", "0")
    assert r.returncode == 2 and "--workers 0" in r.stderr, r.stderr
