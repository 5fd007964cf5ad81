"""The JSON API of ``rrstub ui`` as a script uses it: previews that never show a state the guest
did not have, seeks that other clients interleave with, a newer request superseding an older one.

The server runs with ``--no-read-ahead`` so that nothing but these requests moves replay: which
positions have checkpoints near them then follows from the requests alone, not from host speed.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error

import pytest

from conftest import recording_info, rrstub
from test_ui import Ui, echo, replay_until  # noqa: F401 (echo: the fixture)

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def race(kernels, tmp_path_factory):
    """race, exact, with only its initial marker: every far position is far from a checkpoint."""
    path = tmp_path_factory.mktemp("ui-api") / "race.rrr"
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(path), "--mode", "exact", "--no-markers",
               "--cmdline", "increments=1500")
    assert r.returncode in (0, 1), r.stderr          # race exits 1 when increments were lost
    info = recording_info(path)
    assert info["last_position"] > 100_000, info["last_position"]
    return path, info


@pytest.fixture
def ui(race):
    u = Ui(race[0], options=("--no-read-ahead",))
    yield u
    u.stop()


def comparable(state: dict) -> tuple:
    return (state["position"], state["registers"], state["console"]["text"], state["console"]["complete"],
            state["disassembly"], state["backtrace"], state["guest_ns"])


def test_a_quick_preview_far_from_a_checkpoint_is_the_checkpoints_own_state(ui, race):
    path, info = race
    far = info["last_position"] * 3 // 4
    quick = ui.api(f"/api/rec/r0/state?pos={far}&quick=1&client=a")
    assert not quick["exact"] and quick["position"] < far and quick["requested"] == far
    assert quick["position"] == 0                     # the only checkpoint before it: the start
    exact = ui.api(f"/api/rec/r0/state?pos={far}&client=a")
    assert exact["exact"] and exact["position"] == far
    # The preview showed the state at its own position, as a seek there shows it.
    assert comparable(ui.api(f"/api/rec/r0/state?pos={quick['position']}&client=b")) == comparable(quick)
    # Replay has been there now: a preview near it is exact at once.
    near = ui.api(f"/api/rec/r0/state?pos={far + 100}&quick=1&client=a")
    assert near["exact"] and near["position"] == far + 100
    assert near["console"]["complete"] and near["console"]["text"] == replay_until(path, far + 100)


def test_a_far_seek_reports_progress_and_does_not_hold_up_other_clients(ui, race):
    path, info = race
    far = info["last_position"] - 10
    answers = {}

    def seek():
        t0 = time.monotonic()
        answers["far"] = ui.api(f"/api/rec/r0/state?pos={far}&client=slow")
        answers["far_s"] = time.monotonic() - t0
    th = threading.Thread(target=seek)
    th.start()
    progress = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and progress is None:
        p = ui.api("/api/rec/r0/progress?client=slow")
        if p["busy"]:
            progress = p
        time.sleep(0.02)
    assert progress is not None and progress["target"] == far and 0 <= progress["at"] < far
    t0 = time.monotonic()
    other = ui.api("/api/rec/r0/state?pos=50&client=other")        # another tab, meanwhile
    other_s = time.monotonic() - t0
    th.join()
    assert other["exact"] and other["position"] == 50
    assert answers["far"]["exact"] and answers["far"]["position"] == far
    assert other_s < answers["far_s"] / 2, (other_s, answers["far_s"])


def test_a_newer_request_of_the_same_client_supersedes_the_older(ui, race):
    path, info = race
    far = info["last_position"] - 10
    answers = {}

    def seek():
        try:
            ui.api(f"/api/rec/r0/state?pos={far}&client=tab")
            answers["first"] = "answered"
        except urllib.error.HTTPError as e:
            answers["first"] = (e.code, json.loads(e.read()))
    th = threading.Thread(target=seek)
    th.start()
    deadline = time.monotonic() + 30
    while not ui.api("/api/rec/r0/progress?client=tab")["busy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    newer = ui.api("/api/rec/r0/state?pos=1000&client=tab")
    th.join()
    assert answers["first"] == (409, {"error": "superseded"})
    assert newer["exact"] and newer["position"] == 1000


def test_bad_requests_are_answered_with_what_is_wrong(ui, race):
    last = race[1]["last_position"]
    for query, words in ((f"pos={last + 1}", "outside the recording"), ("pos=abc", "not a number"),
                         ("", "pos= is missing")):
        with pytest.raises(urllib.error.HTTPError) as e:
            ui.api(f"/api/rec/r0/state?{query}")
        assert e.value.code == 400 and words in json.loads(e.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as e:
        ui.api("/api/rec/r9")
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        ui.api("/api/rec/r0/markers", {"name": "start", "pos": 10})
    assert e.value.code == 400 and "cannot name" in json.loads(e.value.read())["error"]
    assert ui.api("/api/rec/r0")["labels"] == []


def test_sigterm_to_the_server_keeps_a_live_runs_branch(echo, tmp_path):
    """Stopping `rrstub ui` stops its live runs as Ctrl-C would: the branch is a finished recording."""
    import shutil
    rec = tmp_path / "echo.rrr"
    shutil.copy(echo, rec)
    u = Ui(rec)
    try:
        live = u.api("/api/rec/r0/live", {"pos": 10})
        u.api(f"/api/live/{live['live']}/input", {"data": "before the end\n"})
        deadline = time.monotonic() + 60
        while "BEFORE THE END" not in u.api(f"/api/live/{live['live']}")["output"]:
            assert time.monotonic() < deadline, u.api(f"/api/live/{live['live']}")
            time.sleep(0.1)
    finally:
        assert u.stop() == 0
    branch = recording_info(live["output"])
    assert branch["complete"] and branch["end"]["reason"] == "interrupted"
    assert branch["parent"]["position"] == 10
    assert "BEFORE THE END" in rrstub("replay", live["output"], "-q").stdout.decode()
