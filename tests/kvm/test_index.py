"""`rrstub index` and `rrstub query` on real recordings, checked against `rrstub trace` and the replay.

The index is built on a real Dask cluster: a ``LocalCluster`` of 2 worker
processes (through the CLI), and a scheduler and a worker started as
separate processes on loopback (``--scheduler``).  Every expectation comes
from the recording itself: its trace (each store the trace shows, each
interrupt line), its serial output, its markers, or a replay.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import marker_every, recording_info, rrstub as _rrstub, symbol

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(240)]

INCREMENTS = 1000
WORKERS = 3      # race.c
ARGS = ("--mode", "exact", "--mem", "4M", "--cmdline", f"increments={INCREMENTS}", "--timeout", "60")
RACE_LINE = re.compile(r"race: counter=(\d+) expected=(\d+) lost=(\d+)")
_RIP_OPERAND = re.compile(r"\[rip \+ (0x[0-9a-f]+)\]")


def rrstub(*args: str, timeout: float = 60):
    return _rrstub(*args, timeout=timeout, text=True)


@pytest.fixture(scope="module")
def race(kernels, tmp_path_factory):
    """race, exact, about four markers, indexed by a local cluster of 2 workers; its whole trace."""
    d = tmp_path_factory.mktemp("index")
    path = d / "race.rrr"
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(path), *ARGS,
               "--marker-every", marker_every(4, kernels / "race.elf", *ARGS))
    assert r.returncode == 1, r.stderr
    serial = r.stdout
    info = recording_info(path)
    assert len(info["markers"]) >= 3, info["markers"]
    t = rrstub("trace", str(path), "--format", "jsonl", "-o", str(d / "all.jsonl"), timeout=120)
    assert t.returncode == 0, t.stderr
    lines = [json.loads(line) for line in (d / "all.jsonl").read_text().splitlines()]
    built = rrstub("index", str(path), "--workers", "2", "--json", timeout=180)
    assert built.returncode == 0, built.stderr
    return {"path": path, "info": info, "trace": lines, "serial": serial, "meta": json.loads(built.stdout),
            "log": built.stderr, "elf": kernels / "race.elf"}


def query(path, *words: str):
    r = rrstub("query", str(path), *words, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def stores_to(trace: list[dict], address: int) -> list[int]:
    """The positions of the trace's stores to ``address`` (mov to [rip + disp], the way race stores)."""
    out = []
    for x in trace:
        m = _RIP_OPERAND.search(x["asm"])
        if m and x["asm"].startswith("mov dword ptr") and x["asm"].index("[") < x["asm"].index(","):
            if int(x["rip"], 16) + len(x["bytes"]) // 2 + int(m.group(1), 16) == address:
                out.append(x["pos"])
    return out


def test_the_index_covers_every_segment_and_instruction(race):
    meta, info = race["meta"], race["info"]
    assert meta["instructions"] == info["end"]["position"] - info["markers"][0]["position"]
    assert [s["start"] for s in meta["segments"]] == [m["position"] for m in info["markers"]]
    assert [s["end"] for s in meta["segments"]][:-1] == [m["position"] for m in info["markers"]][1:]
    assert meta["undecoded"] == 0 and meta["dropped"] == 0
    assert meta["workers"] == 2
    assert "a local Dask cluster of 2 worker processes" in race["log"]
    for m in info["markers"][:-1]:
        assert f"segment m{m['index']}..m{m['index'] + 1}" in race["log"], race["log"]
    assert os.path.getsize(race["path"].with_name("race.rrr.index") / "writes.parquet") > 0


def test_history_has_one_entry_per_store_the_trace_shows(race):
    counter, _ = symbol("counter", race["elf"])
    expected = stores_to(race["trace"], counter)
    assert len(expected) == WORKERS * INCREMENTS
    got = query(race["path"], "history", "counter")["writes"]
    assert [w["pos"] for w in got] == expected
    assert {(w["kind"], w["size"], w["where"]) for w in got} == {("store", 4, got[0]["where"])}
    assert got[0]["where"].startswith("increment+")
    # Each write's old bytes are the previous one's new bytes, and every store adds one to what it loaded.
    for a, b in zip(got, got[1:]):
        assert b["old"] == a["new"], (a, b)
    assert int.from_bytes(bytes.fromhex(got[0]["old"]), "little") == 0


def test_who_wrote_is_the_last_store_and_holds_the_final_count(race):
    final = int(RACE_LINE.search(race["serial"]).group(1))
    history = query(race["path"], "history", "counter")["writes"]
    answer = query(race["path"], "who-wrote", "counter")["write"]
    assert answer == history[-1]
    assert int.from_bytes(bytes.fromhex(answer["new"]), "little") == final
    middle = history[len(history) // 2]
    before = query(race["path"], "who-wrote", "counter", "--before", str(middle["pos"] + 1))["write"]
    assert before == middle
    earlier = query(race["path"], "who-wrote", "counter", "--before", str(middle["pos"]))["write"]
    assert earlier == history[len(history) // 2 - 1]
    first = query(race["path"], "who-wrote", "counter", "--before", str(history[0]["pos"]))
    assert first["write"] is None


def test_calls_events_io_and_hot_spots_agree_with_the_trace(race):
    trace, path = race["trace"], race["path"]
    increment, _ = symbol("increment", race["elf"])
    entered = [x["pos"] for x in trace if int(x["rip"], 16) == increment and "interrupt" not in x]
    assert query(path, "calls", "increment")["positions"] == entered
    assert len(entered) == WORKERS * INCREMENTS
    interrupts = [(x["pos"], x["interrupt"]) for x in trace if "interrupt" in x]
    rows = query(path, "sql", "SELECT pos, vector FROM events WHERE kind = 'interrupt' ORDER BY pos")
    assert [(r["pos"], r["vector"]) for r in rows] == interrupts
    hot = query(path, "sql", "SELECT sum(count) AS n FROM hot")[0]["n"]
    assert hot + len(interrupts) == len(trace)
    at = query(path, "sql", f"SELECT count FROM hot WHERE rip = {increment}")[0]["count"]
    assert at == len(entered)
    # The serial port's data register took what the guest printed, one `out` a byte, after
    # the divisor latch's low byte the UART's setup writes there.
    outs = query(path, "sql", "SELECT value FROM io WHERE port = 1016 AND direction = 'out' ORDER BY pos")
    data = bytes(r["value"] for r in outs)
    assert data[1:].decode() == race["serial"] and data[:1] == b"\x01", data


def test_reverse_continue_to_a_watchpoint_answers_from_the_index_as_the_scan_does(race):
    from rrstub.index.query import Index
    from rrstub.replay.timeline import Timeline
    counter, _ = symbol("counter", race["elf"])
    path = str(race["path"])
    info = race["info"]
    starts = [info["end"]["position"], info["markers"][2]["position"] + 5000]

    def stops(indexed: bool):
        with Timeline(path) as t:
            if indexed:
                t.index = Index(path)
            t.add_watch("write", counter, 4)
            seen = []
            for start in starts:
                t.goto(start)
                for _ in range(3):
                    s = t.reverse_cont()
                    seen.append((s.kind, s.position, s.address, bytes(t.read_memory(counter, 4))))
            return seen, t.index_answers
    by_index, answers = stops(True)
    by_scan, none = stops(False)
    assert answers == 6 and none == 0
    assert by_index == by_scan
    assert all(kind == "watch" for kind, *_ in by_index)


def test_a_scheduler_and_a_worker_started_as_processes(race, tmp_path):
    out = tmp_path / "remote.index"
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() or not sched_file.read_text().strip():
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        # The worker runs in its own folder: it gets the recording's bytes from the scheduler.
        work = tmp_path / "worker"
        work.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "dask", "worker", address, "--nthreads", "1",
                                       "--nworkers", "1", "--no-dashboard", "--local-directory", str(work)],
                                      cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while True:
            r = rrstub("index", str(race["path"]), "-o", str(out), "--scheduler", address, timeout=180)
            if r.returncode == 0 or "has no workers" not in r.stderr or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert r.returncode == 0, r.stderr
        assert f"1 workers at {address}" in r.stderr
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
    local = race["path"].with_name("race.rrr.index")
    for name in ("writes", "events", "io", "calls", "hot"):
        a, b = pq.read_table(local / f"{name}.parquet"), pq.read_table(out / f"{name}.parquet")
        assert a.equals(b), name
    r = rrstub("query", str(race["path"]), "--index", str(out), "who-wrote", "counter")
    assert r.returncode == 0 and "was last written at position" in r.stdout, r.stderr


def test_a_missing_or_stale_index_is_refused_and_rebuilt_on_request(race, kernels, tmp_path):
    path = tmp_path / "race.rrr"
    shutil.copy(race["path"], path)
    r = rrstub("query", str(path), "who-wrote", "counter")
    assert r.returncode == 2 and f"build it with `rrstub index {path}`" in r.stderr, r.stderr
    shutil.copytree(race["path"].with_name("race.rrr.index"), tmp_path / "race.rrr.index")
    assert rrstub("query", str(path), "who-wrote", "counter").returncode == 0
    # Another recording in its place: the index is refused, and rebuilt with --rebuild only.
    other = tmp_path / "other.rrr"
    rec = rrstub("record", str(kernels / "hello.elf"), "-o", str(other), "--mode", "exact", "--mem", "4M", "-q")
    assert other.exists(), rec.stderr
    os.replace(other, path)
    r = rrstub("query", str(path), "who-wrote", "counter")
    assert r.returncode == 2 and "belongs to another recording" in r.stderr and "--rebuild" in r.stderr, r.stderr
    r = rrstub("index", str(path), "--workers", "1", timeout=180)
    assert r.returncode == 1 and "give --rebuild" in r.stderr, r.stderr
    r = rrstub("index", str(path), "--workers", "1", "--rebuild", timeout=180)
    assert r.returncode == 0, r.stderr
    r = rrstub("query", str(path), "who-wrote", "counter")
    assert r.returncode == 2 and "neither an address" in r.stderr     # hello has no counter
    r = rrstub("query", str(path), "--json", "sql", "SELECT count(*) AS n FROM writes")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["n"] > 0, r.stderr


def test_a_diverging_segment_names_its_markers_and_leaves_no_index(race, tmp_path, monkeypatch):
    from rrstub.index import builder
    from rrstub.index.segment import Segment
    path = tmp_path / "race.rrr"
    shutil.copy(race["path"], path)
    markers = race["info"]["markers"]
    real = builder.segments

    def one_wrong(rec):
        segs = real(rec)
        s = segs[1]
        # Claims the segment starts at marker 0's position: the state there is not m1's,
        # and the replay reaches m2's point in a state that differs from it.
        segs[1] = Segment(s.number, s.marker, markers[0]["position"], s.end, s.next_marker)
        return segs
    monkeypatch.setattr(builder, "segments", one_wrong)
    with pytest.raises(builder.IndexBuildError, match=r"segment m1\.\.m2"):
        builder.build_index(str(path), workers=1, say=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race.rrr"]


FAST_INCREMENTS = 300


def test_a_fast_recording_is_indexed_too(kernels, tmp_path):
    path = tmp_path / "fast.rrr"
    args = ("--mode", "fast", "--mem", "4M", "--cmdline", f"increments={FAST_INCREMENTS}", "--timeout", "60")
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(path), *args)
    assert r.returncode == 1, r.stderr
    final = int(RACE_LINE.search(r.stdout).group(1))
    built = rrstub("index", str(path), "--workers", "1", "--json", timeout=180)
    assert built.returncode == 0, built.stderr
    history = query(path, "history", "counter")["writes"]
    assert len(history) == WORKERS * FAST_INCREMENTS
    assert int.from_bytes(bytes.fromhex(query(path, "who-wrote", "counter")["write"]["new"]), "little") == final
    assert len(query(path, "calls", "increment")["positions"]) == WORKERS * FAST_INCREMENTS
