"""The replay timeline on real recordings: any path to a position gives the same machine there."""
from __future__ import annotations

import hashlib
import io
import random

import pytest

from conftest import marker_every, rrstub
from rrstub.replay.timeline import CHECKPOINT_EVERY, Timeline, TimelineError

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]

RACE = ("--mode", "exact", "--mem", "4M", "--cmdline", "increments=2000", "--timeout", "60")


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


def test_fast_recordings_are_refused_with_the_way_out(kernels, tmp_path):
    path = tmp_path / "hello.rrr"
    r = rrstub("record", str(kernels / "hello.elf"), "-o", str(path), "--mode", "fast", "--mem", "4M")
    assert r.returncode == 0, r.stderr
    with pytest.raises(TimelineError, match="--mode exact"):
        Timeline(str(path))
    r = rrstub("serve", str(path), "--port", "0")
    assert r.returncode == 2
    assert b"record --mode exact" in r.stderr


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
