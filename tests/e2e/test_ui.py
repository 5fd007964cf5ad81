"""``rrstub ui`` in a real browser: Debian's chromium, headless, driven by Playwright.

The server runs as a user starts it (``rrstub ui REC... --port 0``, the
address read from its first line).  What the page shows is checked against
the CLI: the console at a position against ``rrstub replay --until``, a
marker against ``rrstub info``, a go-live branch against its ``info``, a
damaged recording's message against ``rrstub serve``'s.  Positions come from
the recordings (``info --json``) and from the page, never from a rate.

Without chromium or Playwright these tests fail under CI=true and skip
otherwise (``make setup`` installs both).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, recording_info, rrstub

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(240)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LINES = [f"{word} line\n".encode() for word in ("first", "second", "third", "fourth", "fifth", "sixth",
                                                 "seventh", "eighth", "ninth", "tenth")]


def _need(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser test cannot run in CI: {what}", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("Playwright is not installed (make setup installs it)")
    if not os.path.exists(CHROMIUM):
        _need("chromium is not installed (make setup installs Debian's package as root)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


class Ui:
    """``rrstub ui`` as a subprocess; ``url`` from its first line on stdout."""

    def __init__(self, *recordings: Path, options: tuple = ()):
        self.proc = subprocess.Popen([sys.executable, "-m", "rrstub", "ui", *map(str, recordings), "--port", "0",
                                      *options],
                                     cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(x.decode(errors="replace") for x in self.proc.stderr),
                         daemon=True).start()
        line = self.proc.stdout.readline().decode()
        m = re.search(r"at (http://\S+/)", line)
        assert m, f"rrstub ui printed {line!r}; stderr: {''.join(self.err)}"
        self.url = m.group(1)

    def api(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path.lstrip("/"), data=data,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def read_all(self, rid: str = "r0", limit: float = 120) -> dict:
        """Wait until the server has read the whole recording (its console is known everywhere)."""
        end = time.monotonic() + limit
        while time.monotonic() < end:
            info = self.api(f"/api/rec/{rid}")
            if info["prefetch"]["done"]:
                return info
            time.sleep(0.2)
        pytest.fail(f"the server did not finish reading {rid} in {limit} s")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.kill()


@pytest.fixture(scope="module")
def echo(kernels, tmp_path_factory) -> Path:
    """An exact recording of echo with lines typed one by one (as a user types, the guest waiting
    in between with nothing buffered), then quit: console output over most of the recording."""
    path = tmp_path_factory.mktemp("ui") / "echo.rrr"
    proc = subprocess.Popen([sys.executable, "-m", "rrstub", "record", str(kernels / "echo.elf"), "-o", str(path),
                             "--mode", "exact", "--serial-in", "-", "--marker-every", "0.0002"],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in LINES:
        time.sleep(0.15)
        proc.stdin.write(line)
        proc.stdin.flush()
    time.sleep(0.15)
    out, err = proc.communicate(b"quit\n", timeout=60)
    assert proc.returncode == 0, err
    assert out == b"".join(line.upper() for line in LINES) + b"bye\n"
    return path


@pytest.fixture
def ui_echo(echo, tmp_path):
    copy = tmp_path / "echo.rrr"            # each test gets its own file to write labels and branches beside
    shutil.copy(echo, copy)
    ui = Ui(copy)
    yield ui, copy
    ui.stop()


def open_page(browser, ui: Ui, query: str = ""):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(ui.url + query)
    page.wait_for_selector("body[data-ready='1']", timeout=30000)
    page.errors = errors
    return page


def wait_exact(page, position: int | None = None, timeout: float = 60000) -> int:
    sel = "body[data-exact='1'][data-busy='0']" + (f"[data-position='{position}']" if position is not None else "")
    page.wait_for_selector(sel, timeout=timeout)
    return int(page.evaluate("document.body.dataset.position"))


def replay_until(path: Path, position: int) -> str:
    r = rrstub("replay", str(path), "--until", str(position), "-q")
    assert r.returncode == 0, r.stderr
    return r.stdout.decode()


def test_dragging_to_the_middle_shows_the_console_replay_prints_there(browser, ui_echo, tmp_path):
    ui, path = ui_echo
    info = ui.read_all()
    first, last = info["first"], info["last"]
    assert last == recording_info(path)["last_position"]
    page = open_page(browser, ui)
    box = page.locator("#timeline").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + 2, y)
    page.mouse.down()
    previews = set()
    for i in range(1, 21):                  # a drag: the panels follow the pointer
        page.mouse.move(box["x"] + 2 + (box["width"] / 2 - 2) * i / 20, y)
        page.wait_for_timeout(30)
        previews.add(page.evaluate("document.body.dataset.position"))
    page.mouse.up()
    pos = wait_exact(page)
    assert abs(pos - (first + last) // 2) <= (last - first) // 50 + 1, (pos, first, last)
    assert len(previews) > 3, f"the panels did not follow the drag: {previews}"
    expected = replay_until(path, pos)
    assert expected.count("\n") >= 1 and "\x1b" not in expected     # plain text: the panel shows it as is
    assert page.inner_text("#console") == expected.replace("\r\n", "\n")
    state = ui.api(f"/api/rec/r0/state?pos={pos}")
    assert page.inner_text("#position").split()[1] == str(pos)
    rip = dict(state["registers"])["rip"]
    assert rip in page.inner_text("#registers")
    assert page.locator("#disasm .current").count() == 1
    assert state["symbol"] and state["symbol"].split("+")[0] in page.inner_text("#symbol")
    page.screenshot(path=str(tmp_path / f"ui-echo-{pos}.png"))
    assert (tmp_path / f"ui-echo-{pos}.png").stat().st_size > 10000
    assert not page.errors


def test_stepping_and_markers_are_positions_of_the_recording(browser, ui_echo):
    ui, path = ui_echo
    ui.read_all()
    info = recording_info(path)
    m1 = info["markers"][1]["position"]
    page = open_page(browser, ui, f"?pos={m1}")
    wait_exact(page, m1)
    page.click("#step-fwd")
    wait_exact(page, m1 + 1)
    page.keyboard.press("ArrowLeft")
    wait_exact(page, m1)
    page.click("#step-back")
    wait_exact(page, m1 - 1)
    page.click("#next-marker")
    wait_exact(page, m1)
    page.click("#next-marker")
    wait_exact(page, info["markers"][2]["position"])
    assert page.locator(".tick").count() >= len(info["markers"])


def test_a_marker_added_in_the_page_is_in_rrstub_info(browser, ui_echo):
    ui, path = ui_echo
    last = ui.read_all()["last"]
    target = last * 2 // 3
    page = open_page(browser, ui, f"?pos={target}")
    wait_exact(page, target)
    page.fill("#marker-name", "from-the-page")
    page.click("#add-marker")
    page.wait_for_function("document.querySelector('#marker-status').textContent.includes('saved')")
    labels = recording_info(path)["labels"]
    assert {"name": "from-the-page", "position": target} in labels
    page.wait_for_selector(".tick[data-position='%d']" % target)
    page.fill("#marker-name", "m3")         # a marker's name: refused, with the rule
    page.click("#add-marker")
    page.wait_for_function("document.querySelector('#marker-status').textContent.includes('cannot name')"
                           " || document.querySelector('#error').textContent.includes('cannot name')")
    assert [x["name"] for x in recording_info(path)["labels"]] == ["from-the-page"]


def test_going_live_runs_the_console_in_the_page_and_records_a_branch(browser, ui_echo, tmp_path):
    ui, path = ui_echo
    ui.read_all()
    # Live from where the guest has echoed the first line and waits for more.
    last = ui.api("/api/rec/r0")["last"]
    pos = next(p for p in range(0, last, 16)
               if ui.api(f"/api/rec/r0/state?pos={p}")["console"]["text"] == "FIRST LINE\n")
    page = open_page(browser, ui, f"?pos={pos}")
    wait_exact(page, pos)
    page.click("#go-live")
    page.wait_for_selector("#live-panel:not([hidden])", timeout=30000)
    page.wait_for_function("document.querySelector('#live-console').textContent.includes('FIRST LINE')",
                           timeout=60000)
    # The guest waits for input at the branch point itself: what is typed reaches the branch's
    # very first point (tests/kvm/test_workflow.py checks that case with the CLI).
    page.wait_for_function("document.querySelector('#live-status').textContent.includes('live from')",
                           timeout=60000)
    page.click("#live-input")
    page.keyboard.type("typed here\n")
    page.wait_for_function("document.querySelector('#live-console').textContent.includes('TYPED HERE')",
                           timeout=60000)
    page.keyboard.type("quit\n")
    page.wait_for_function("document.querySelector('#live-status').textContent.includes('ended')", timeout=60000)
    branches = sorted(tmp_path.glob("echo-live-*.rrr"))
    assert len(branches) == 1
    branch = recording_info(branches[0])
    assert branch["parent"]["id"] == recording_info(path)["id"] and branch["parent"]["position"] == pos
    assert branch["end"]["reason"] == "exit" and branch["end"]["status"] == 0
    # What was typed is in the branch: its replay prints it again.
    assert "TYPED HERE\nbye\n" in rrstub("replay", str(branches[0]), "-q").stdout.decode()
    # The branch tree shows it; a click opens it.
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    node = page.locator(f".tree-node[data-path='{branches[0]}']")
    node.wait_for(timeout=30000)
    node.click()
    page.wait_for_function("document.querySelector('#recordings').selectedOptions[0].textContent"
                           ".includes('echo-live-1')", timeout=30000)
    page.wait_for_selector("body[data-ready='1']")
    assert not page.errors


def test_a_crop_between_two_markers_from_the_page(browser, ui_echo, tmp_path):
    ui, path = ui_echo
    page = open_page(browser, ui)
    page.select_option("#crop-from", "m1")
    page.select_option("#crop-to", "m3")
    out = tmp_path / "cropped.rrr"
    page.fill("#crop-output", str(out))
    page.click("#crop")
    page.wait_for_function("document.querySelector('#crop-status').textContent.includes('verified')",
                           timeout=120000)
    info = recording_info(out)
    markers = recording_info(path)["markers"]
    assert (info["first_position"], info["last_position"]) == (markers[1]["position"], markers[3]["position"])


def test_two_tabs_on_one_recording_keep_their_own_positions(browser, ui_echo):
    ui, path = ui_echo
    last = ui.read_all()["last"]
    a, b = last // 4, last * 3 // 4
    one = open_page(browser, ui, f"?pos={a}")
    two = open_page(browser, ui, f"?pos={b}")
    for _ in range(3):
        one.click("#step-fwd")
        two.click("#step-back")
    wait_exact(one, a + 3)
    wait_exact(two, b - 3)
    for page, pos in ((one, a + 3), (two, b - 3)):
        state = ui.api(f"/api/rec/r0/state?pos={pos}")
        assert dict(state["registers"])["rip"] in page.inner_text("#registers")
        assert page.inner_text("#console") == replay_until(path, pos)


def test_a_damaged_recording_shows_the_message_the_cli_prints(browser, echo, tmp_path):
    bad = tmp_path / "damaged.rrr"
    data = bytearray(echo.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)        # inside the kernel or marker chunk
    bad.write_bytes(data)
    r = rrstub("serve", str(bad), "--port", "0")
    assert r.returncode == 2
    cli = r.stderr.decode().strip().splitlines()[-1]
    assert cli.startswith("rrstub: ") and "damaged.rrr" in cli
    ui = Ui(bad, echo)
    try:
        page = open_page(browser, ui, "?rec=r0")
        page.wait_for_function("document.querySelector('#error').textContent.length > 0")
        assert page.inner_text("#error").strip() == cli
        page.select_option("#recordings", "r1")     # the good one still opens
        wait_exact(page)
    finally:
        ui.stop()


def test_a_fast_recording_in_the_page(browser, kernels, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"".join(LINES) + b"quit\n")
    path = tmp_path / "echo-fast.rrr"
    r = rrstub("record", str(kernels / "echo.elf"), "-o", str(path), "--mode", "fast", "--serial-in", str(lines))
    assert r.returncode == 0, r.stderr
    ui = Ui(path)
    try:
        info = ui.read_all()
        assert info["mode"] == "fast" and info["last"] is not None     # counted by the server's read
        page = open_page(browser, ui, f"?pos={info['last'] // 2}")
        pos = wait_exact(page, info["last"] // 2)
        assert page.inner_text("#console") == replay_until(path, pos)
        page.click("#step-fwd")
        wait_exact(page, pos + 1)
    finally:
        ui.stop()
