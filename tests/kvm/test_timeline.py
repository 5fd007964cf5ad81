"""The replay timeline on real recordings: any path to a position gives the same machine there."""
from __future__ import annotations

import hashlib
import io
import random
import re
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, marker_every, rrstub
from rrstub.markers import decode_marker
from rrstub.recording import Recording
from rrstub.replay.timeline import CHECKPOINT_EVERY, Timeline, TimelineError
from vmm.kvm import REG_NAMES

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]

RACE = ("--mode", "exact", "--mem", "4M", "--cmdline", "increments=2000", "--timeout", "60")
FAST_RACE = ("--mode", "fast", "--mem", "4M", "--cmdline", "increments=300", "--timeout", "60")
GENERAL = [n for n in REG_NAMES if n != "rflags"]     # Timeline.registers() has eflags instead


@pytest.fixture(scope="module")
def exact_recording(kernels, tmp_path_factory):
    """race, exact, with about a dozen recorded markers."""
    path = tmp_path_factory.mktemp("timeline") / "race.rrr"
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(path), *RACE, "--marker-every",
               marker_every(12, kernels / "race.elf", *RACE), timeout=120)
    assert r.returncode == 1, r.stderr      # race exits 1: it lost updates
    return path, r.stdout


def state(t: Timeline) -> tuple:
    regs = t.registers()
    return t.position, tuple(sorted(regs.items())), hashlib.sha256(t.machine.mem.view).hexdigest()


def test_every_path_to_a_position_gives_the_same_machine(exact_recording):
    path, _ = exact_recording
    with Timeline(str(path)) as forward:
        assert len([c for c in forward.checkpoints.values() if c.recorded]) >= 5
        positions = sorted(random.Random(4).sample(range(1, forward.last), 8)) + [forward.last - 1]
        expected = {}
        for p in positions:            # one pass forward, from the start
            forward.goto(p)
            expected[p] = state(forward)
    with Timeline(str(path)) as jumping:      # recorded markers only: far jumps restore them
        order = positions[::-1] + positions[::2]
        for p in order:
            jumping.goto(p)
            assert state(jumping) == expected[p], f"instruction {p} reached another way differs"
        assert len(jumping.checkpoints) > 20   # checkpoints were made on the way


def test_reverse_step_restores_memory_written_since_the_checkpoint(exact_recording):
    path, _ = exact_recording
    with Timeline(str(path)) as t:
        start = 5 * CHECKPOINT_EVERY + 1000
        t.goto(start)
        states = [state(t)]
        for _ in range(50):
            t.step()
            states.append(state(t))
        for expected in reversed(states[:-1]):
            stop = t.reverse_step()
            assert stop.kind == "step"
            assert state(t) == expected
        assert t.reverse_step().position == start - 1
        t.goto(0)
        assert t.reverse_step().kind == "begin"


def test_serial_output_appears_once_however_often_replay_passes_it(exact_recording):
    path, recorded_output = exact_recording
    out = io.BytesIO()
    with Timeline(str(path), serial_out=out) as t:
        assert t.cont().kind == "end"
        assert out.getvalue() == recorded_output
        assert t.cont().kind == "end"            # at the end already: nothing runs
        t.goto(0)
        assert t.cont().kind == "end"
        assert out.getvalue().count(b"race: counter=") == 1


@pytest.fixture(scope="module")
def fast_recording(kernels, tmp_path_factory):
    """race, fast, about six recorded markers (at exit numbers): (path, serial output)."""
    path = tmp_path_factory.mktemp("timeline-fast") / "race.rrr"
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(path), *FAST_RACE, "--marker-every",
               marker_every(6, kernels / "race.elf", *FAST_RACE), timeout=120)
    assert r.returncode == 1, r.stderr
    with Recording.open(path) as rec:
        assert len(rec.markers) >= 2, "no m1: the recording is far shorter than measured"
    return path, r.stdout


def stored(path) -> tuple[int, list]:
    """A recording's end as it stores it (an exit number in a fast one) and its decoded markers."""
    with Recording.open(path) as rec:
        return rec.summary["end_position"], [decode_marker(rec.payload(m)) for m in rec.markers]


def test_a_fast_recording_is_a_timeline_in_instructions(fast_recording):
    """A fast recording opens; its end and markers get instruction counts as replay passes them,
    and there the machine is the one the recording stores."""
    path, recorded_output = fast_recording
    logged_end, blobs = stored(path)
    out = io.BytesIO()
    with Timeline(str(path), serial_out=out) as t:
        assert (t.mode, t.first, t.last, t.recorded_at) == ("fast", 0, None, {0: 0})
        assert t.engine.unit == "instruction"
        stop = t.cont()
        assert stop.kind == "end", stop
        assert out.getvalue() == recorded_output
        end = t.position
        assert t.last == end and stop.position == end
        assert t.engine.exits == logged_end < end          # the log's end, reached exit for exit
        assert sorted(t.recorded_at) == list(range(len(blobs))), "replay did not meet every marker"
        at = [t.recorded_at[i] for i in range(len(blobs))]
        # Strictly in order: the marker clock starts at the guest's first exit, so no marker is
        # taken before the first instruction, at marker 0's state, even on a loaded host.
        assert at == sorted(set(at)) and at[-1] < end
        for i in reversed(range(len(blobs))):              # backwards: each a restore, not a replay on
            t.goto(at[i])
            regs = t.registers()
            want = blobs[i].vcpu.regs
            assert {n: regs[n] for n in GENERAL} == {n: getattr(want, n) for n in GENERAL}, f"m{i}"
            assert regs["eflags"] == want.rflags & 0xFFFFFFFF, f"m{i}"
        middle = end // 2
        assert t.goto(middle).position == middle
        assert t.reverse_step().position == middle - 1
        with pytest.raises(TimelineError, match=f"outside the recording \\(0..{end}\\)"):
            t.goto(end + 1)
    with Timeline(str(path)) as fresh:            # the end is unknown until replay gets there
        with pytest.raises(TimelineError, match=f"the replay ended \\(exit\\) at instruction {end}, "
                                                f"before instruction {end + 1000}"):
            fresh.goto(end + 1000)
        assert fresh.last == end
        assert fresh.goto(end - 1).position == end - 1


READY = re.compile(r"instructions 0\.\.(.*); waiting for gdb on 127\.0\.0\.1:(\d+)")


class Gdb:
    """Just enough of the remote protocol: requests and `monitor` commands."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buf = b""

    def _reply(self) -> bytes:
        while True:
            self.buf = self.buf.lstrip(b"+")
            m = re.match(rb"\$([^#]*)#([0-9a-f]{2})", self.buf)
            if m:
                self.buf = self.buf[m.end():]
                assert int(m[2], 16) == sum(m[1]) & 0xFF
                self.sock.sendall(b"+")
                return m[1]
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"the server closed the connection; have {self.buf!r}")
            self.buf += data

    def request(self, payload: bytes) -> bytes:
        self.sock.sendall(b"$%s#%02x" % (payload, sum(payload) & 0xFF))
        return self._reply()

    def monitor(self, command: str) -> str:
        """The console text (``O`` packets up to ``OK``); an error reply fails the test."""
        reply = self.request(b"qRcmd," + command.encode().hex().encode())
        text = ""
        while reply != b"OK":
            assert reply[:1] == b"O" and reply != b"OK", f"monitor {command}: {text}{reply!r}"
            text += bytes.fromhex(reply[1:].decode()).decode()
            reply = self._reply()
        return text


def test_serve_debugs_a_fast_recording(fast_recording):
    path, _ = fast_recording
    logged_end, _ = stored(path)
    with Timeline(str(path)) as t:
        t.cont()
        end, m1 = t.last, t.recorded_at[1]
    proc = subprocess.Popen([sys.executable, "-m", "rrstub", "serve", str(path), "--port", "0", "--clients", "1"],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        log = ""
        while (m := READY.search(log)) is None:
            line = proc.stderr.readline().decode()
            assert line, f"rrstub serve did not start listening:\n{log}"
            log += line
        # The end is an exit number until replay gets there.
        assert m[1].startswith(f"? (a fast recording's end, exit #{logged_end},"), log
        gdb = Gdb(int(m[2]))
        assert gdb.request(b"?").startswith(b"T05")
        assert gdb.monitor("when").startswith("instruction 0 of ? ")
        assert gdb.monitor("goto m1").startswith(f"at instruction {m1};")     # replay finds it
        assert gdb.monitor("when").startswith(f"instruction {m1} of ? ")
        middle = end // 2
        answer = "".join(line for line in gdb.monitor(f"goto {middle}").splitlines(keepends=True)
                         if not line.startswith("rrstub: still working"))    # keepalive on a slow host
        assert answer.startswith(f"at instruction {middle};")
        assert gdb.monitor("when").startswith(f"instruction {middle} of ? ")
        assert gdb.request(b"c").startswith(b"T05replaylog:end;")
        when = gdb.monitor("when")
        assert when.startswith(f"instruction {end} of {end}, ") and when.endswith(f"(exit #{logged_end})\n"), when
        assert gdb.monitor("goto m1").startswith(f"at instruction {m1};")     # back, from a checkpoint
        assert gdb.request(b"D") == b"OK"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_refuses_a_port_in_use(exact_recording):
    import socket
    path, _ = exact_recording
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = rrstub("serve", str(path), "--port", str(port), timeout=60)
    assert r.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}".encode() in r.stderr
