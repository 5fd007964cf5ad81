"""The real gdb 13 against `rrstub serve`, end to end: MI through pygdbmi, as IDEs drive it.

Two recordings of race (``increments=2000``) are made per module, one
exact (about 220k instructions) and one fast (the guest ran freely; served
instruction by instruction, so its positions are instruction counts too).
Each is served by a fresh ``rrstub serve --port 0`` subprocess for each
test; gdb loads ``race.elf`` for symbols and connects with
``-target-select remote``.  The debugging tests (break/step/next/finish,
stepi retraced by reverse-stepi, the reverse watchpoint, reverse-next and
reverse-finish, thread entries, Ctrl-C, a client that leaves while
running, ``monitor goto``) run on both recordings (``race``, ids
``exact`` and ``fast``); protocol robustness and the server as a service
run on the exact one only (``race_exact``), since they test the stub, not
the engine behind it.

A live run of race differs each time (host timing), so each recording is
its own truth: the final count comes from what the recorded run printed,
positions from ``monitor when``, never from an assumed instruction count.
A fast recording's end is counted in instructions only once the replay
has got there: until then ``monitor when`` says ``instruction N of ?``
(with the end's exit number), after that ``instruction N of LAST``.

Protocol robustness is tested with raw sockets against the same server,
and every raw test ends by checking that a real gdb can still connect and
ask ``monitor when``.  The last section treats the server as a service: a
second gdb, gdb without a file (the recorded kernel comes over host I/O),
the hooks in examples/gdb, labels, and the addresses it listens on.

MI notes (see DESIGN.md, "GDB 13, seen from the stub"): every command is
sent with a numeric token and its ``^result`` is matched by that token; a
run command answers ``^running`` and its ``*stopped`` comes later, often
in another read, so ``Gdb.run`` polls until it arrives (with a deadline).
At either end of the history GDB 13 emits ``*stopped`` without a reason
and prints "No more reverse-execution history." on the console.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
from pygdbmi.gdbcontroller import GdbController

from conftest import ROOT, recording_info, rrstub

pytestmark = [pytest.mark.kvm]

INCREMENTS = 2000
RACE_LINE = re.compile(rb"^race: counter=(\d+) expected=(\d+) lost=(\d+)\n\Z")
READY = re.compile(r"waiting for gdb on 127\.0\.0\.1:(\d+) \(in gdb: target remote 127\.0\.0\.1:(\d+)\)")
# `monitor when`: "instruction N of LAST, guest time T s", and for a fast recording
# "... (exit #E)" after it, or "of ?" with the end's exit number until replay has got there.
WHEN = re.compile(r"instruction (\d+) of (\d+|\?)")
WHEN_FAST_END_UNKNOWN = re.compile(
    r"^instruction (\d+) of \? \(a fast recording's end, exit #(\d+), is counted in instructions when replay "
    r"gets there\), guest time (\d+\.\d+) s \(exit #(\d+)\)$")
WHEN_FAST_END_KNOWN = re.compile(r"^instruction (\d+) of (\d+), guest time (\d+\.\d+) s \(exit #(\d+)\)$")
MODES = ["exact", "fast"]
NO_HISTORY = "No more reverse-execution history."
RACE_C = (ROOT / "examples" / "race.c").read_text().splitlines()


def source_line(text: str) -> int:
    """The 1-based line of race.c that contains ``text`` (exactly one)."""
    found = [i + 1 for i, line in enumerate(RACE_C) if text in line]
    assert len(found) == 1, f"{text!r} in race.c: lines {found}"
    return found[0]


LINE_SEEN = source_line("int seen = counter;")          # increment's first line
LINE_STORE = source_line("counter = seen + 1;")
LINE_CALL = source_line("        increment();")          # the call in worker's loop
LINE_LOOP = source_line("for (unsigned i = 0; i < increments; i++)")
LINE_LOST = source_line("int lost = expected - counter;")    # kmain, after the workers


# ---------------------------------------------------------------------------
# The recording


@dataclass(frozen=True)
class Recorded:
    path: Path
    elf: Path
    mode: str         # "exact" or "fast"
    counter: int      # the final value of `counter` the recorded run printed
    status: int       # the recorded run's exit status
    end: int          # where `rrstub info` says it ends: an instruction (exact) or an exit number (fast)
    guest_s: float    # the guest time at its end

    @property
    def fast(self) -> bool:
        return self.mode == "fast"


def _record(kernels: Path, folder: Path, mode: str) -> Recorded:
    """race.elf recorded in ``mode``; the run must have printed its count and ended with a matching status."""
    rec = folder / "race.rrr"
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(rec), "--mode", mode,
               "--cmdline", f"increments={INCREMENTS}", timeout=60)
    m = RACE_LINE.match(r.stdout)
    assert m, r.stdout + r.stderr
    counter, expected, lost = map(int, m.groups())
    assert expected == 3 * INCREMENTS and counter + lost == expected
    assert r.returncode == (1 if lost else 0), r.stderr
    info = recording_info(rec)
    assert info["mode"] == mode and info["complete"], info
    assert info["end"]["reason"] == "exit" and info["end"]["status"] == r.returncode, info["end"]
    assert info["last_position"] == info["end"]["position"], info
    return Recorded(rec, kernels / "race.elf", mode, counter, r.returncode, info["end"]["position"],
                    info["end"]["guest_s"])


@pytest.fixture(scope="module")
def recordings(kernels, tmp_path_factory):
    """``recordings(mode)``: this module's recording in ``mode``, made the first time it is asked for."""
    made: dict[str, Recorded] = {}

    def get(mode: str) -> Recorded:
        if mode not in made:
            made[mode] = _record(kernels, tmp_path_factory.mktemp(f"gdb-{mode}"), mode)
        return made[mode]
    return get


@pytest.fixture(scope="module", params=MODES)
def race(request, recordings) -> Recorded:
    """The debugging tests run on an exact and a fast recording of the same workload."""
    return recordings(request.param)


@pytest.fixture(scope="module")
def race_exact(recordings) -> Recorded:
    """Protocol and service tests: the stub does not depend on the engine, one recording is enough."""
    return recordings("exact")


@pytest.fixture(scope="module")
def race_fast(recordings) -> Recorded:
    return recordings("fast")


# ---------------------------------------------------------------------------
# rrstub serve, raw sockets, and gdb through MI


class Server:
    """``rrstub serve REC --port 0 --clients N`` as a subprocess; ``port`` parsed from its stderr."""

    def __init__(self, rec: Path, clients: int, folder: Path, options: tuple = (), ready=READY):
        self.serial = folder / "serial.out"
        self.lines: list[str] = []
        self._port_seen = threading.Event()
        with open(self.serial, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rrstub", "serve", str(rec), "--port", "0", "--clients", str(clients),
                 *options],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE)
        self.ready = ready
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        if not self._port_seen.wait(30):
            self.stop()
            pytest.fail(f"rrstub serve did not start listening:\n{self.log}")
        m = ready.search(self.log)
        assert m.group(1) == m.group(2)
        self.port = int(m.group(1))

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace"))
            if self.ready.search(self.lines[-1]):
                self._port_seen.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def said(self, text: str, timeout: float = 5) -> bool:
        """Whether ``text`` is (or comes within ``timeout``) in its stderr, which a thread reads."""
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)


def packet(payload: bytes) -> bytes:
    return b"$" + payload + b"#%02x" % (sum(payload) & 0xFF)


class RawClient:
    """A hand-driven RSP connection in ack mode (the server acks every packet)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no data from the server; have {self.buf[:200]!r}")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError(f"no data from the server; have {self.buf[:200]!r}") from None
        if not data:
            raise ConnectionError(f"the server closed the connection; have {self.buf[:200]!r}")
        self.buf += data

    def ack(self, timeout: float = 10) -> bytes:
        """The next ``+`` or ``-``."""
        deadline = time.monotonic() + timeout
        while not self.buf:
            self._fill(deadline)
        first, self.buf = self.buf[:1], self.buf[1:]
        assert first in (b"+", b"-"), f"expected an ack, got {first + self.buf[:200]!r}"
        return first

    def ack_within(self, seconds: float) -> Optional[bytes]:
        """The next ack if it comes within ``seconds``, else None."""
        try:
            return self.ack(seconds)
        except TimeoutError:
            return None

    def frame(self, timeout: float = 10, ack: bool = True) -> bytes:
        """The next ``$...#xx`` frame, whole, acknowledged with ``+`` unless ``ack`` is False
        (acks before it are an error: read them with ``ack``)."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.match(rb"\$([^#]*)#([0-9a-f]{2})", self.buf)
            if m:
                self.buf = self.buf[m.end():]
                assert int(m.group(2), 16) == sum(m.group(1)) & 0xFF, f"bad checksum from the server: {m.group()!r}"
                if ack:
                    self.send(b"+")
                return m.group()
            assert not self.buf or self.buf[:1] == b"$", f"expected a packet, got {self.buf[:200]!r}"
            self._fill(deadline)

    def request(self, payload: bytes, timeout: float = 10) -> bytes:
        """Send one packet; return the reply's payload (after checking the ``+``)."""
        self.send(packet(payload))
        assert self.ack(timeout) == b"+"
        return self.frame(timeout)[1:-3]

    def monitor(self, command: str) -> str:
        """``qRcmd``: the console text of its ``O`` packets, up to its ``OK``."""
        self.send(packet(b"qRcmd," + command.encode().hex().encode()))
        assert self.ack() == b"+"
        text = ""
        while True:
            payload = self.frame()[1:-3]
            if payload == b"OK":
                return text
            assert payload[:1] == b"O", payload
            text += bytes.fromhex(payload[1:].decode()).decode()

    def close(self) -> None:
        self.sock.close()


class GdbError(Exception):
    """gdb answered ``^error``."""


@dataclass
class Stopped:
    """A ``*stopped`` notify and the console text printed while the target ran."""
    payload: dict
    console: str

    @property
    def reason(self) -> Optional[str]:
        return self.payload.get("reason")

    @property
    def frame(self) -> dict:
        return self.payload.get("frame", {})


@dataclass
class Gdb:
    """gdb 13 in MI mode (pygdbmi), connected to a server; commands are matched by token.
    ``elf`` None: no file, gdb takes the one the server offers.  ``fast``: the server replays a fast
    recording (its end may be unknown: ``monitor when`` says ``of ?`` until the replay got there)."""
    elf: Optional[Path]
    port: int
    fast: bool = False
    async_mode: bool = False
    settings: tuple = ()                            # more `-gdb-set`s before connecting
    host: str = "127.0.0.1"
    sources: tuple = ()                             # gdb command files sourced before connecting
    connect_text: str = ""                          # what gdb printed while connecting
    records: list = field(default_factory=list)     # read from gdb, not consumed yet
    transcript: list = field(default_factory=list)  # everything read, for failure messages

    def __post_init__(self):
        self.token = 100
        self.ctl = GdbController(["gdb", "--nx", "--quiet", "--interpreter=mi3",
                                  *([str(self.elf)] if self.elf else [])],
                                 time_to_check_for_additional_output_sec=0.01)
        try:
            for setting in ("confirm off", "pagination off", "width 0", "remotetimeout 30", *self.settings):
                self.cmd(f"-gdb-set {setting}")
            if self.async_mode:
                self.cmd("-gdb-set mi-async on")
            for path in self.sources:
                self.console(f"source {path}")
            r, before = self.result(self.send(f"-target-select remote {self.host}:{self.port}"), timeout=30)
            if r["message"] == "error":
                raise GdbError(r["payload"]["msg"])
            self.connect_text = _console(before)
        except BaseException:
            self.close()
            raise

    # -- I/O ------------------------------------------------------------------------
    def send(self, command: str) -> int:
        self.token += 1
        self.ctl.write(f"{self.token}{command}", read_response=False)
        return self.token

    def send_many(self, commands: list[str]) -> list[int]:
        """Write several commands at once (gdb queues them and runs them in order)."""
        tokens = list(range(self.token + 1, self.token + 1 + len(commands)))
        self.token += len(commands)
        self.ctl.write([f"{t}{c}" for t, c in zip(tokens, commands)], read_response=False)
        return tokens

    def _take(self, match, timeout: float, what: str) -> tuple[dict, list]:
        """The first unconsumed record that ``match`` accepts, and the records before it."""
        deadline = time.monotonic() + timeout
        while True:
            for i, r in enumerate(self.records):
                if match(r):
                    before, self.records = self.records[:i], self.records[i + 1:]
                    return r, before
            left = deadline - time.monotonic()
            if left <= 0:
                tail = "\n".join(map(repr, self.transcript[-30:]))
                raise TimeoutError(f"gdb: no {what} within {timeout} s; last records:\n{tail}")
            if self.ctl.gdb_process.poll() is not None:
                raise ConnectionError(f"gdb exited with status {self.ctl.gdb_process.returncode}")
            got = self.ctl.get_gdb_response(timeout_sec=min(left, 0.5), raise_error_on_timeout=False)
            self.records += got
            self.transcript += got

    def result(self, token: int, timeout: float = 15) -> tuple[dict, list]:
        return self._take(lambda r: r["type"] == "result" and r["token"] == token, timeout,
                          f"result for token {token}")

    def stopped(self, timeout: float = 30) -> Stopped:
        r, before = self._take(lambda r: r["type"] == "notify" and r["message"] == "stopped", timeout,
                               "*stopped")
        return Stopped(r["payload"] or {}, _console(before))

    # -- commands -------------------------------------------------------------------
    def cmd(self, command: str, timeout: float = 15) -> dict:
        """An MI command that answers ``^done`` (or ``^connected``): its payload; GdbError on ``^error``."""
        r, _ = self.result(self.send(command), timeout)
        if r["message"] == "error":
            raise GdbError(r["payload"]["msg"])
        assert r["message"] in ("done", "connected"), r
        return r["payload"] or {}

    def console(self, command: str, timeout: float = 15) -> str:
        """A CLI command through ``-interpreter-exec console``: its console text; GdbError on ``^error``."""
        quoted = command.replace("\\", "\\\\").replace('"', '\\"')
        r, before = self.result(self.send(f'-interpreter-exec console "{quoted}"'), timeout)
        if r["message"] == "error":
            raise GdbError(r["payload"]["msg"])
        return _console(before)

    def run(self, command: str, timeout: float = 30) -> Stopped:
        """A run command (``^running``, then ``*stopped``)."""
        r, _ = self.result(self.send(command), timeout)
        if r["message"] == "error":
            raise GdbError(r["payload"]["msg"])
        assert r["message"] == "running", r
        return self.stopped(timeout)

    # -- the target -----------------------------------------------------------------
    def when(self) -> tuple[int, Optional[int]]:
        """(the current instruction, the last one); the last is None while a fast recording's end is unknown."""
        return parse_when(self.console("monitor when"), self.fast)

    def goto(self, position: int) -> None:
        text = self.console(f"monitor goto {position}", timeout=30)
        assert f"at instruction {position};" in text, text
        self.console("maint flush register-cache")
        assert self.when()[0] == position

    def value(self, expression: str) -> str:
        return self.cmd(f'-data-evaluate-expression "{expression}"')["value"]

    def integer(self, expression: str) -> int:
        return int(self.value(expression).split()[0], 0)

    def frame(self) -> dict:
        return self.cmd("-stack-info-frame")["frame"]

    def break_insert(self, location: str) -> dict:
        return self.cmd(f"-break-insert {location}")["bkpt"]

    def close(self) -> None:
        p = self.ctl.gdb_process
        if p is not None and p.poll() is None:
            p.kill()
        if p is not None:
            p.wait(10)
            p.communicate()
        self.ctl.gdb_process = None


def parse_when(text: str, fast: bool) -> tuple[int, Optional[int]]:
    """``monitor when``'s (instruction, last instruction); the last is None while a fast recording's end is unknown."""
    m = WHEN.search(text)
    assert m, text
    if m.group(2) == "?":
        assert fast, f"an exact recording's end is always known: {text!r}"
        return int(m.group(1)), None
    return int(m.group(1)), int(m.group(2))


def _console(records: list) -> str:
    return "".join(r["payload"] or "" for r in records if r["type"] in ("console", "target"))


def registers(payload: dict) -> tuple:
    return tuple((r["number"], r["value"]) for r in payload["register-values"])


def _debugger(rec: Recorded, tmp_path: Path):
    """``debug(clients=1, async_mode=False)``: a server of ``rec`` for this test, and its first gdb (or None);
    ``debug.connect(server)`` connects another; ``debug.rec`` is the recording served."""
    made: list = []

    def start(clients: int = 1, connect: bool = True, async_mode: bool = False):
        server = Server(rec.path, clients, tmp_path)
        made.append(server)
        gdb = None
        if connect:
            gdb = Gdb(rec.elf, server.port, fast=rec.fast, async_mode=async_mode)
            made.append(gdb)
        return server, gdb

    def connect(server: Server, async_mode: bool = False, settings: tuple = (), elf=rec.elf) -> Gdb:
        gdb = Gdb(elf, server.port, fast=rec.fast, async_mode=async_mode, settings=settings)
        made.append(gdb)
        return gdb

    start.connect = connect
    start.rec = rec
    yield start
    for thing in reversed(made):   # gdbs first, then the servers
        try:
            thing.close() if isinstance(thing, Gdb) else thing.stop()
        except Exception:
            pass


@pytest.fixture
def debug(race, tmp_path):
    """Servers of ``race``: each test that uses it runs on the exact and on the fast recording."""
    yield from _debugger(race, tmp_path)


@pytest.fixture
def debug_exact(race_exact, tmp_path):
    yield from _debugger(race_exact, tmp_path)


@pytest.fixture
def debug_fast(race_fast, tmp_path):
    yield from _debugger(race_fast, tmp_path)


def before_the_end(position: int, last: Optional[int]) -> bool:
    """``position`` is before the end of the history (``last`` None: a fast recording's replay has
    not got to its end yet, so wherever it is, it is before it)."""
    return last is None or position < last


# ---------------------------------------------------------------------------
# 1. break, print, step, next, finish


@pytest.mark.timeout(60)
def test_break_step_next_finish(debug):
    server, gdb = debug()
    assert gdb.when()[0] == 0
    bkpt = gdb.break_insert("increment")
    assert bkpt["func"] == "increment" and int(bkpt["line"]) == LINE_SEEN

    stop = gdb.run("-exec-continue")
    assert stop.reason == "breakpoint-hit", stop
    assert stop.frame["func"] == "increment" and int(stop.frame["line"]) == LINE_SEEN
    assert int(stop.frame["addr"], 16) == int(bkpt["addr"], 16)
    at_break = gdb.when()[0]
    assert at_break > 0
    assert 0 <= gdb.integer("counter") <= 3 * INCREMENTS
    frames = gdb.cmd("-stack-list-frames")["stack"]
    assert [f["func"] for f in frames[:2]] == ["increment", "worker"]
    assert int(frames[1]["line"]) == LINE_CALL
    return_address = int(frames[1]["addr"], 16)

    line = LINE_SEEN
    for command in ("-exec-step", "-exec-next"):
        stop = gdb.run(command)
        assert stop.reason == "end-stepping-range", stop
        assert stop.frame["func"] == "increment"
        assert int(stop.frame["line"]) > line, (command, stop.frame)
        line = int(stop.frame["line"])
    assert gdb.when()[0] > at_break

    gdb.cmd("-break-delete")
    stop = gdb.run("-exec-finish")
    assert stop.reason == "function-finished", stop
    assert stop.frame["func"] == "worker"
    assert int(stop.frame["addr"], 16) == return_address
    assert int(stop.frame["line"]) in (LINE_CALL, LINE_LOOP)
    assert gdb.frame()["func"] == "worker"
    assert server.alive()


# ---------------------------------------------------------------------------
# 2. stepi and reverse-stepi retrace the same states


STEPS = 200
START = 120_000


def _step_states(gdb: Gdb, command: str) -> list[tuple]:
    """``STEPS`` times ``command`` then the registers, written in one batch; the states after each."""
    tokens = gdb.send_many([c for _ in range(STEPS) for c in (command, "-data-list-register-values x")])
    states = []
    for step, regs in zip(tokens[::2], tokens[1::2]):
        r, _ = gdb.result(step, timeout=30)
        assert r["message"] == "running", r
        stop = gdb.stopped(timeout=30)
        assert stop.reason == "end-stepping-range", (len(states), stop)
        r, _ = gdb.result(regs, timeout=30)
        assert r["message"] == "done", r
        states.append(registers(r["payload"]))
    return states


@pytest.mark.timeout(60)
def test_reverse_stepi_retraces_forward_stepi(debug):
    server, gdb = debug()
    gdb.goto(START)
    when, last = gdb.when()
    assert when == START and before_the_end(START + STEPS, last)     # (fast: every step below must not end)
    names = gdb.cmd("-data-list-register-names")["register-names"]
    pc = str(names.index("rip"))

    start = registers(gdb.cmd("-data-list-register-values x"))
    forward = [start] + _step_states(gdb, "-exec-step-instruction")
    assert gdb.when()[0] == START + STEPS
    pcs = [dict(s)[pc] for s in forward]
    assert len(set(pcs)) > 5, "200 instructions of race should visit many addresses"
    assert all(a != b for a, b in zip(forward, forward[1:])), "a stepi that changed no register"

    backward = _step_states(gdb, "-exec-step-instruction --reverse")
    assert gdb.when()[0] == START
    for i, state in enumerate(backward):
        expected = forward[STEPS - 1 - i]
        assert state == expected, f"reverse-stepi #{i + 1} (to instruction {START + STEPS - 1 - i}): " \
                                  f"{[(n, v, dict(expected)[n]) for n, v in state if dict(expected)[n] != v]}"

    again = _step_states(gdb, "-exec-step-instruction")
    assert gdb.when()[0] == START + STEPS
    assert again == forward[1:]
    assert server.alive()


# ---------------------------------------------------------------------------
# 3. watchpoints in reverse, and the ends of history


@pytest.mark.timeout(60)
def test_reverse_watchpoint_finds_the_last_write(debug, race):
    server, gdb = debug()
    stop = gdb.run("-exec-continue", timeout=40)
    assert stop.reason is None, (stop, server.log)
    assert NO_HISTORY in stop.console, (stop, server.log)
    position, last = gdb.when()
    # The end, counted in instructions now (a fast recording's too: the replay got there).
    assert last is not None and position == last, (position, last)
    assert server.said(f"end of the recording at instruction {position}: the guest exited with status "
                       f"{race.status}"), server.log
    if not race.fast:
        assert last == race.end
    assert gdb.integer("counter") == race.counter

    wpt = gdb.cmd("-break-watch counter")
    number = wpt["wpt"]["number"]
    stop = gdb.run("-exec-continue --reverse", timeout=40)
    assert stop.reason == "watchpoint-trigger", stop
    # In reverse gdb's "old" is the value after the write, "new" the value before it.
    old, new = int(stop.payload["value"]["old"]), int(stop.payload["value"]["new"])
    assert old == race.counter
    assert old != new
    assert gdb.integer("counter") == new
    assert stop.frame["func"] == "increment" and int(stop.frame["line"]) == LINE_STORE
    at_write, _ = gdb.when()
    assert 0 < at_write < last
    insn = gdb.cmd("-data-disassemble -s $pc -e $pc+1 -- 0")["asm_insns"][0]
    assert insn["inst"].startswith("mov") and "<counter>" in insn["inst"], insn

    gdb.cmd(f"-break-delete {number}")
    stop = gdb.run("-exec-step-instruction")
    assert stop.reason == "end-stepping-range", stop
    assert gdb.when()[0] == at_write + 1
    assert gdb.integer("counter") == old

    gdb.goto(0)
    gdb.cmd("-break-watch counter")
    stop = gdb.run("-exec-continue --reverse")
    assert stop.reason is None, stop
    assert NO_HISTORY in stop.console, stop
    assert gdb.when()[0] == 0
    assert server.alive()


# ---------------------------------------------------------------------------
# 4. reverse-next over a call, reverse-finish


@pytest.mark.timeout(60)
def test_reverse_next_steps_back_over_the_call(debug):
    server, gdb = debug()
    gdb.break_insert("increment")
    stop = gdb.run("-exec-continue")
    assert stop.frame["func"] == "increment"
    entered = gdb.when()[0]        # the call has executed
    return_address = int(gdb.cmd("-stack-list-frames")["stack"][1]["addr"], 16)
    gdb.cmd("-break-delete")

    stop = gdb.run("-exec-finish")
    assert stop.frame["func"] == "worker" and int(stop.frame["addr"], 16) == return_address
    returned = gdb.when()[0]
    assert returned > entered

    # Back over the whole call: to the call instruction, un-executed, not into increment.
    stop = gdb.run("-exec-next --reverse")
    assert stop.reason == "end-stepping-range", stop
    assert stop.frame["func"] == "worker" and int(stop.frame["line"]) == LINE_CALL, stop
    call_address = int(stop.frame["addr"], 16)
    assert call_address < return_address
    assert gdb.when()[0] == entered - 1
    insn = gdb.cmd("-data-disassemble -s $pc -e $pc+1 -- 0")["asm_insns"][0]
    assert insn["inst"].startswith("call") and "increment" in insn["inst"], insn

    # Forward over it with next, and back again.
    stop = gdb.run("-exec-next")
    assert stop.frame["func"] == "worker" and int(stop.frame["addr"], 16) == return_address, stop
    assert gdb.when()[0] == returned
    stop = gdb.run("-exec-next --reverse")
    assert stop.frame["func"] == "worker" and int(stop.frame["line"]) == LINE_CALL, stop
    assert int(stop.frame["addr"], 16) == call_address
    assert gdb.when()[0] == entered - 1
    assert server.alive()


@pytest.mark.timeout(60)
def test_reverse_finish_returns_to_the_call_site(debug):
    server, gdb = debug()
    gdb.goto(50_000)
    gdb.break_insert("increment")
    # An entry that the call reached directly: a timer interrupt taken right at increment's
    # first instruction makes the iretq the instruction before it (reverse-finish then stops
    # there, in the handler's frame, as it should); take the next entry instead.
    for _ in range(20):
        stop = gdb.run("-exec-continue")
        assert stop.frame["func"] == "increment"
        entered = gdb.when()[0]
        gdb.goto(entered - 1)
        before = gdb.cmd("-data-disassemble -s $pc -e $pc+1 -- 0")["asm_insns"][0]["inst"]
        gdb.goto(entered)
        if before.startswith("call"):
            break
    else:
        pytest.fail("20 entries of increment in a row came by an interrupt's return")
    return_address = int(gdb.cmd("-stack-list-frames")["stack"][1]["addr"], 16)
    # With the breakpoint at increment's entry still in, gdb stops there (a user breakpoint
    # outranks reverse-finish's own): delete it first.
    gdb.cmd("-break-delete")
    line = LINE_SEEN
    for _ in range(2):
        stop = gdb.run("-exec-next")
        assert stop.frame["func"] == "increment" and int(stop.frame["line"]) > line, stop
        line = int(stop.frame["line"])

    stop = gdb.run("-exec-finish --reverse")
    assert stop.reason == "end-stepping-range", stop
    assert stop.frame["func"] == "worker" and int(stop.frame["line"]) == LINE_CALL, stop
    assert int(stop.frame["addr"], 16) < return_address
    assert gdb.when()[0] == entered - 1
    insn = gdb.cmd("-data-disassemble -s $pc -e $pc+1 -- 0")["asm_insns"][0]
    assert insn["inst"].startswith("call") and "increment" in insn["inst"], insn
    assert server.alive()


@pytest.mark.timeout(120)
def test_thread_entry_breakpoints_are_hit_once_per_thread_both_ways(debug):
    """Each worker starts where an iretq of the timer handler returns: never a skipped stop."""
    server, gdb = debug()
    gdb.break_insert("worker")
    forward = []
    while (stop := gdb.run("-exec-continue", timeout=60)).reason == "breakpoint-hit":
        assert stop.frame["func"] == "worker", stop
        forward.append(gdb.when()[0])
    assert NO_HISTORY in stop.console, (stop, server.log)
    end, last = gdb.when()
    assert end == last, (end, last)                              # (a fast recording's end is known now)
    assert len(forward) == 3 and len(set(forward)) == 3          # race.c: WORKERS
    assert all(0 < f < end for f in forward), (forward, end)

    gdb.cmd("-break-delete")
    gdb.cmd("-break-insert -h worker")
    backward = []
    while (stop := gdb.run("-exec-continue --reverse", timeout=60)).reason == "breakpoint-hit":
        backward.append(gdb.when()[0])
    assert NO_HISTORY in stop.console and gdb.when()[0] == 0, stop
    assert backward == forward[::-1]

    # reverse-finish from inside a worker: back over its entry, to the iretq that started it.
    gdb.goto(forward[1] + 5)
    gdb.cmd("-break-delete")
    stop = gdb.run("-exec-finish --reverse", timeout=60)
    assert gdb.when()[0] == forward[1] - 1, stop
    insn = gdb.cmd("-data-disassemble -s $pc -e $pc+1 -- 0")["asm_insns"][0]
    assert insn["inst"].startswith("iretq"), insn
    assert server.alive()


# ---------------------------------------------------------------------------
# A fast recording: its end is counted in instructions when the replay gets there


@pytest.mark.timeout(120)
def test_a_fast_recordings_end_is_counted_when_the_replay_gets_there(debug_fast, race_fast):
    server, gdb = debug_fast(clients=2)
    unknown = f"? (a fast recording's end, exit #{race_fast.end}, is counted in instructions when replay gets there)"
    assert f"instructions 0..{unknown};" in server.log, server.log
    text = gdb.console("monitor when").strip()
    m = WHEN_FAST_END_UNKNOWN.match(text)
    assert m, text
    assert (int(m[1]), int(m[2]), float(m[3]), int(m[4])) == (0, race_fast.end, 0.0, 0), text
    info = gdb.console("monitor info")
    assert "mode fast" in info, info
    assert f"ends at instruction {unknown} (exit, status {race_fast.status})" in info, info

    # To the end with no breakpoint: gdb is told the history ends there, and the end has an instruction.
    stop = gdb.run("-exec-continue", timeout=90)
    assert stop.reason is None, (stop, server.log)
    assert NO_HISTORY in stop.console, (stop, server.log)
    text = gdb.console("monitor when").strip()
    m = WHEN_FAST_END_KNOWN.match(text)
    assert m, text
    end, last, guest_s, exit_number = int(m[1]), int(m[2]), float(m[3]), int(m[4])
    assert end == last and exit_number == race_fast.end, text
    assert abs(guest_s - race_fast.guest_s) <= 1e-6, (text, race_fast.guest_s)
    assert server.said(f"end of the recording at instruction {end}: the guest exited with status "
                       f"{race_fast.status}"), server.log
    assert gdb.integer("counter") == race_fast.counter
    info = gdb.console("monitor info")
    assert f"ends at instruction {end} (exit, status {race_fast.status})" in info, info
    assert f"now at instruction {end} (exit #{race_fast.end})" in info, info

    # Known from now on: back one instruction, past the end, and in the next gdb session.
    stop = gdb.run("-exec-step-instruction --reverse")
    assert stop.reason == "end-stepping-range", stop
    assert gdb.when() == (end - 1, end)
    text = gdb.console(f"monitor goto {end + 1}")
    assert "outside the recording" in text and f"0..{end}" in text, text
    assert gdb.when() == (end - 1, end)
    gdb.close()
    again = debug_fast.connect(server)
    assert again.when() == (end - 1, end)
    assert server.alive()


# ---------------------------------------------------------------------------
# 5.-7. raw clients: bad packets, a client that leaves while running, Ctrl-C


@pytest.mark.timeout(60)
def test_bad_packets_get_answers_and_the_server_keeps_serving(debug_exact):
    server, _ = debug_exact(clients=2, connect=False)
    raw = RawClient(server.port)
    try:
        # Frames correctly, cannot be understood: an error.
        assert raw.request(b"m12,zz")[:1] == b"E"
        # 100 KB: more than PacketSize; answered, and the connection goes on.
        assert raw.request(b"qRrstubOversized:" + b"A" * 100_000)[:1] == b"E"
        reply = raw.request(b"?")
        assert reply.startswith(b"T05"), reply
        # Not supported: the empty reply, exactly.
        raw.send(packet(b"vFooBar"))
        assert raw.ack() == b"+"
        assert raw.frame() == b"$#00"
        # Unmapped memory (a kernel address nothing maps in race): an error.
        assert raw.request(b"mffff800000000000,4")[:1] == b"E"
        # Still a working connection.
        assert len(raw.request(b"m100000,4")) == 8
        assert WHEN.search(raw.monitor("when"))
    finally:
        raw.close()

    assert server.alive()
    gdb = debug_exact.connect(server)
    position, last = gdb.when()
    assert position == 0 and last == debug_exact.rec.end
    assert gdb.integer("counter") == 0
    assert server.alive()


def _handshake(raw: RawClient) -> None:
    supported = raw.request(b"qSupported:multiprocess+;swbreak+;hwbreak+;vContSupported+")
    assert b"ReverseContinue+" in supported and b"ReverseStep+" in supported, supported
    assert raw.request(b"?").startswith(b"T05")


@pytest.mark.timeout(60)
def test_client_that_disconnects_while_running(debug):
    server, _ = debug(clients=2, connect=False)
    raw = RawClient(server.port)
    _handshake(raw)
    raw.send(packet(b"c"))
    raw.close()

    assert server.alive()
    gdb = debug.connect(server)
    position, last = gdb.when()
    assert before_the_end(position, last), "the continue should have ended when its client went away"
    rip = gdb.console("info registers rip")
    m = re.match(r"rip\s+(0x[0-9a-f]+)", rip)
    assert m, rip
    assert int(m.group(1), 16) == gdb.integer("$pc")
    assert server.alive()


@pytest.mark.timeout(60)
def test_interrupt_a_continue_from_gdb(debug):
    server, gdb = debug(async_mode=True)
    start, last = gdb.when()
    assert start == 0
    r, _ = gdb.result(gdb.send("-exec-continue"))
    assert r["message"] == "running", r
    gdb.cmd("-exec-interrupt")   # at once: the server looks for it every 4096 instructions
    stop = gdb.stopped(timeout=20)
    assert stop.reason == "signal-received", stop
    assert stop.payload["signal-name"] == "SIGINT"
    position, last = gdb.when()
    assert start < position and before_the_end(position, last), (start, position, last)
    assert server.alive()


@pytest.mark.timeout(60)
def test_interrupt_a_continue_raw(debug):
    server, _ = debug(clients=2, connect=False)
    raw = RawClient(server.port)
    try:
        _handshake(raw)
        raw.send(packet(b"c"))
        raw.send(b"\x03")      # at once: the server looks for it every 4096 instructions
        assert raw.ack(20) == b"+"      # (the ack of the c: see test_a_continue_is_acked_at_once)
        reply = raw.frame(timeout=20)[1:-3]
        assert reply.startswith(b"T02"), reply
        position, last = parse_when(raw.monitor("when"), debug.rec.fast)
        assert 0 < position and before_the_end(position, last), (position, last)
    finally:
        raw.close()
    assert server.alive()
    gdb = debug.connect(server)
    assert gdb.when()[0] == position


# ---------------------------------------------------------------------------
# 8. writes are refused


@pytest.mark.timeout(60)
def test_writes_are_refused(debug_exact):
    server, gdb = debug_exact()
    gdb.break_insert("increment")
    gdb.run("-exec-continue")
    gdb.cmd("-break-delete")
    gdb.run("-exec-finish")
    before = gdb.integer("counter")
    assert before >= 1

    with pytest.raises(GdbError) as refused:
        gdb.console(f"set var counter = {before + 5}")
    assert "Cannot access memory" in str(refused.value)
    assert gdb.integer("counter") == before

    rax = gdb.integer("$rax")
    with pytest.raises(GdbError) as refused:
        gdb.console(f"set $rax = {rax ^ 0x5a5a}")
    assert "refused" in str(refused.value)
    gdb.console("maint flush register-cache")
    assert gdb.integer("$rax") == rax
    assert "refused a WriteRegister" in server.log
    assert server.alive()


# ---------------------------------------------------------------------------
# Ack mode (a client that does not send QStartNoAckMode): acks and retransmissions come at once.
# gdb waits remote_timeout (2 s) for an ack and then sends the packet again.


@pytest.mark.timeout(30)
def test_bad_checksum_gets_a_nak_at_once(debug_exact):
    server, _ = debug_exact(clients=1, connect=False)
    raw = RawClient(server.port)
    try:
        _handshake(raw)
        raw.send(b"$m100000,4#00")      # the checksum is 0x3e
        nak = raw.ack_within(2)
        assert nak == b"-", f"no '-' within 2 s of a packet with a bad checksum (got {nak!r})"
        assert raw.request(b"?").startswith(b"T05")
    finally:
        raw.close()
    assert server.alive()


@pytest.mark.timeout(30)
def test_nak_from_the_client_gets_the_reply_again(debug_exact):
    server, _ = debug_exact(clients=1, connect=False)
    raw = RawClient(server.port)
    try:
        _handshake(raw)
        raw.send(packet(b"m100000,4"))
        assert raw.ack() == b"+"
        reply = raw.frame(ack=False)
        raw.buf = b""
        raw.send(b"-")                  # instead of "+": "your reply arrived damaged: send it again"
        try:
            again = raw.frame(timeout=2)
        except TimeoutError:
            again = None
        assert again == reply, f"the reply was not sent again within 2 s of a '-' (got {again!r})"
    finally:
        raw.close()
    assert server.alive()


@pytest.mark.timeout(30)
def test_a_continue_is_acked_at_once(debug_exact):
    server, _ = debug_exact(clients=1, connect=False)
    raw = RawClient(server.port)
    try:
        _handshake(raw)
        started = time.monotonic()
        raw.send(packet(b"c"))          # from instruction 0 to the end: over a second
        ack = raw.ack_within(0.5)
        waited = time.monotonic() - started
        assert ack == b"+", f"no ack of the c within 0.5 s (got {raw.buf[:80]!r} after {waited:.2f} s)"
        assert raw.frame(timeout=20)[1:-3] == b"T05replaylog:end;thread:1;"
    finally:
        raw.close()
    assert server.alive()


@pytest.mark.timeout(40)
def test_gdb_in_ack_mode_continues_to_a_breakpoint_a_second_away(debug_exact):
    """gdb without QStartNoAckMode resends a packet that is not acked within remotetimeout
    (2 s by default, 1 s here so that race's 1.6 s replay is long enough)."""
    server, _ = debug_exact(clients=1, connect=False)
    gdb = debug_exact.connect(server, settings=("remote noack-packet off", "remotetimeout 1"))
    bkpt = gdb.break_insert(f"race.c:{LINE_LOST}")
    stop = gdb.run("-exec-continue", timeout=20)
    assert stop.reason == "breakpoint-hit", stop
    assert stop.frame["func"] == "kmain" and int(stop.frame["line"]) == LINE_LOST
    position, last = gdb.when()
    assert position < last
    assert gdb.integer("$pc") == int(bkpt["addr"], 16)
    assert server.alive()


# ---------------------------------------------------------------------------
# The server as a service: one gdb at a time, the recorded kernel, monitor goto, labels, addresses


@pytest.mark.timeout(60)
def test_gdb_without_a_file_debugs_with_the_recorded_kernel(debug_exact, race_exact):
    server, _ = debug_exact(connect=False)
    gdb = debug_exact.connect(server, elf=None)
    assert gdb.frame()["func"] == "_start"
    gdb.break_insert("increment")
    stop = gdb.run("-exec-continue")
    assert stop.frame["func"] == "increment" and int(stop.frame["line"]) == LINE_SEEN, stop
    files = gdb.console("info files")
    assert "target:/rrstub/race.rrr/race.elf" in files, files
    assert server.alive()


@pytest.mark.timeout(60)
def test_info_kernel_out_writes_the_recorded_kernel(race_exact, tmp_path):
    out = tmp_path / "kernel.elf"
    r = rrstub("info", str(race_exact.path), "--kernel-out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == race_exact.elf.read_bytes()
    assert f"to {out}" in r.stderr.decode()
    r = rrstub("info", str(race_exact.path), "--kernel-out", str(tmp_path / "no" / "such" / "dir"))
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1, r.stderr


@pytest.mark.timeout(60)
def test_a_second_gdb_is_told_why_and_the_first_keeps_its_session(debug_exact):
    server, first = debug_exact(clients=2)
    first.goto(1000)
    with pytest.raises(GdbError) as refused:
        debug_exact.connect(server)
    assert "one gdb at a time" in str(refused.value), refused.value
    assert first.when()[0] == 1000
    assert "refusing gdb" in server.log
    assert server.alive()


HOOKS = ROOT / "examples" / "gdb" / "rrstub-hooks.gdb"


@pytest.mark.timeout(60)
def test_monitor_goto_makes_gdb_and_mi_show_the_new_place(debug):
    server, gdb = debug()
    gdb.console(f"source {HOOKS}")
    gdb.break_insert("increment")
    gdb.run("-exec-continue")
    assert gdb.frame()["func"] == "increment"
    entry = gdb.integer("$pc")
    start = gdb.when()[0]

    r, before = gdb.result(gdb.send('-interpreter-exec console "monitor goto 0"'), timeout=30)
    assert r["message"] == "done", r
    # An IDE refreshes its views on *stopped (gdb sends it before the command's ^done).
    stops = [x["payload"] for x in before if x["type"] == "notify" and x["message"] == "stopped"]
    assert [s["frame"]["func"] for s in stops] == ["_start"], before
    assert gdb.when()[0] == 0
    assert gdb.frame()["func"] == "_start"
    assert gdb.integer("$pc") != entry      # no `maint flush register-cache` needed
    assert gdb.integer("counter") == 0

    gdb.console(f"monitor goto {start}")
    assert gdb.integer("$pc") == entry and gdb.frame()["func"] == "increment"
    assert server.alive()


@pytest.mark.timeout(60)
def test_marker_add_writes_a_label_and_never_into_a_replaced_file(race_exact, kernels, tmp_path, debug_exact):
    served = tmp_path / "served.rrr"
    served.write_bytes(race_exact.path.read_bytes())
    server = Server(served, 1, tmp_path)
    try:
        gdb = Gdb(race_exact.elf, server.port)
        try:
            gdb.goto(1000)
            for bad in ("m0", "start", "two words"):
                text = gdb.console(f"monitor marker add {bad}")
                assert "error:" in text and "a label name starts with a letter" in text, text
            text = gdb.console("monitor marker add here")
            assert "saved in" in text, text
            r = rrstub("info", str(served), "--json")
            assert [{"name": "here", "position": 1000}] == __import__("json").loads(r.stdout)["labels"]

            other = tmp_path / "other.rrr"
            r = rrstub("record", str(kernels / "hello.elf"), "-o", str(other), "--mode", "exact")
            assert r.returncode == 0, r.stderr
            other.replace(served)
            before = served.read_bytes()
            text = gdb.console("monitor marker add there")
            assert "kept for this session only" in text and "no longer the recording" in text, text
            assert served.read_bytes() == before
        finally:
            gdb.close()
    finally:
        server.stop()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args, message", [
    (("--port", "-1"), "0..65535"), (("--port", "65536"), "0..65535"),
    (("--host", ""), "every interface")])
def test_serve_refuses_bad_addresses_in_one_line(race_exact, args, message):
    r = rrstub("serve", str(race_exact.path), *args)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.timeout(60)
def test_serve_on_every_interface_warns_and_ipv6_loopback_works(race_exact, tmp_path):
    ready_any = re.compile(r"waiting for gdb on 0\.0\.0\.0:(\d+) \(in gdb: target remote 127\.0\.0\.1:(\d+) here")
    server = Server(race_exact.path, 1, tmp_path, ("--host", "0.0.0.0", "--clients", "1"), ready=ready_any)
    try:
        assert "anyone who can reach this machine" in server.log and "target remote 0.0.0.0" not in server.log
    finally:
        server.stop()
    ready_v6 = re.compile(r"waiting for gdb on ::1:(\d+) \(in gdb: target remote \[::1\]:(\d+)\)")
    server = Server(race_exact.path, 1, tmp_path, ("--host", "::1"), ready=ready_v6)
    try:
        assert "warning" not in server.log
        gdb = Gdb(race_exact.elf, server.port, host="[::1]")
        try:
            assert gdb.when()[0] == 0
        finally:
            gdb.close()
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_the_hooks_warn_when_gdb_reads_another_kernel(debug_exact, race_exact, kernels):
    server, _ = debug_exact(clients=2, connect=False)
    gdb = Gdb(race_exact.elf, server.port, sources=(HOOKS,))
    try:
        assert "Section .text" in gdb.connect_text and "MIS-MATCHED" not in gdb.connect_text, gdb.connect_text
    finally:
        gdb.close()
    gdb = Gdb(kernels / "hello.elf", server.port, sources=(HOOKS,))
    try:
        assert "MIS-MATCHED" in gdb.connect_text, gdb.connect_text     # (and a warning on gdb's log stream)
    finally:
        gdb.close()
    assert server.alive()


@pytest.mark.timeout(240)
def test_an_indexed_recording_answers_who_wrote_and_reverse_continues_to_the_same_stop(race_exact, tmp_path):
    """`monitor who-wrote` and `monitor history` from the index; reverse-continue to `watch counter`
    answered from the index stops where the scan of the same recording without an index stops."""
    import shutil
    rec = tmp_path / "race.rrr"
    shutil.copy(race_exact.path, rec)
    r = rrstub("index", str(rec), "--workers", "2", timeout=180)
    assert r.returncode == 0, r.stderr

    def last_writes(path: Path, folder: Path, ask: bool) -> tuple[list, Server]:
        server = Server(path, 1, folder)
        gdb = Gdb(race_exact.elf, server.port)
        try:
            gdb.run("-exec-continue", timeout=40)
            end, _ = gdb.when()
            answer = gdb.console("monitor who-wrote counter 4") if ask else ""
            gdb.cmd("-break-watch counter")
            stops = []
            for _ in range(3):
                stop = gdb.run("-exec-continue --reverse", timeout=60)
                assert stop.reason == "watchpoint-trigger", stop
                stops.append((gdb.when()[0], int(stop.payload["value"]["old"]),
                              int(stop.payload["value"]["new"]), stop.frame["func"]))
            history = gdb.console("monitor history counter", timeout=30) if ask else ""
            return [end, answer, stops, history], server
        finally:
            gdb.close()
            server.stop()

    (end, answer, indexed, history), server = last_writes(rec, tmp_path, True)
    assert server.said("using the index"), server.log
    m = re.search(r"was last written before instruction (\d+) at (\d+) by (increment\+0x[0-9a-f]+): "
                  r"0x[0-9a-f]+ \((\d+)\) -> 0x[0-9a-f]+ \((\d+)\)", answer)
    assert m, answer
    assert int(m.group(1)) == end
    at, old, new = int(m.group(2)), int(m.group(4)), int(m.group(5))
    # gdb in reverse: "old" is the value after the write, "new" the one before it.
    assert indexed[0] == (at, new, old, "increment")
    assert new == race_exact.counter
    assert f"counter (" in history and f": {3 * INCREMENTS} writes" in history, history[:300]
    plain = tmp_path / "plain"
    plain.mkdir()
    (_, _, scanned, _), server = last_writes(race_exact.path, plain, False)
    assert not server.said("using the index", timeout=0)
    assert scanned == indexed
