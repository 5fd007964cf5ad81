"""Long work of the page in child processes: crops and live runs.

Each runs the same ``rrstub`` command a user would type (``crop``,
``replay --go-live``), so the page does what the CLI does, with its
checks and messages, and a guest that goes wrong cannot take the server
with it.  Their lines on stderr are the progress the page shows; a live
run's stdout is the guest's console and its stdin the guest's UART input
(recorded into the branch).
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
from typing import Callable, Optional

MAX_LINES = 200
MAX_OUTPUT = 1 << 20        # bytes of a live console kept for late viewers


def free_path(near: str, tag: str) -> str:
    """A new file name beside ``near``: ``NAME-TAG-N.rrr`` with the first unused N."""
    stem = os.path.splitext(os.path.abspath(near))[0]
    return next(path for path in (f"{stem}-{tag}-{n}.rrr" for n in itertools.count(1))
                if not os.path.exists(path))


def _rrstub(*args: str) -> list[str]:
    return [sys.executable, "-m", "rrstub", *args]


class Task:
    """A child ``rrstub`` command: its stderr lines, its end."""

    def __init__(self, tid: str, argv: list[str], output: str, stdin: bool = False):
        self.id = tid
        self.output = output
        self.lines: list[str] = []
        self.status: Optional[int] = None
        self.listeners: list[Callable[[str, object], None]] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self._readers = [threading.Thread(target=self._read_stderr, daemon=True)]
        self._readers[0].start()

    def _emit(self, kind: str, value) -> None:
        for listen in list(self.listeners):
            listen(kind, value)

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self.lines.append(line)
                del self.lines[:-MAX_LINES]
            self._emit("status", line)
        self.status = self.proc.wait()
        for r in self._readers[1:]:
            r.join()
        self._emit("ended", self.status)

    @property
    def running(self) -> bool:
        return self.status is None

    def message(self) -> str:
        with self._lock:
            return self.lines[-1] if self.lines else ""

    def stop(self) -> None:
        """Ctrl-C for the child: a recorder keeps what it recorded."""
        if self.status is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        if self.status is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.proc.kill()


class CropTask(Task):
    def __init__(self, tid: str, path: str, start: str, stop: str, output: str):
        super().__init__(tid, _rrstub("crop", path, "--from", start, "--to", stop, "-o", output), output)

    def describe(self) -> dict:
        state = "running" if self.running else "done" if self.status == 0 else "failed"
        lines = list(self.lines)
        if state == "failed" and not lines:
            lines = [f"rrstub crop exited with status {self.status}"]
        return {"state": state, "lines": lines, "output": self.output, "status": self.status,
                "message": lines[-1] if lines else ("cropping" if self.running else "")}


class LiveTask(Task):
    """``rrstub replay REC --go-live POS -o BRANCH --serial-in -``: the console in the page."""

    def __init__(self, tid: str, path: str, position: int, output: str):
        super().__init__(tid, _rrstub("replay", path, "--go-live", str(position), "-o", output,
                                      "--serial-in", "-"), output, stdin=True)
        self.console = bytearray()
        reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._readers.append(reader)
        reader.start()

    def _read_stdout(self) -> None:
        while True:
            data = os.read(self.proc.stdout.fileno(), 65536)
            if not data:
                return
            with self._lock:
                self.console += data
                del self.console[:-MAX_OUTPUT]
            self._emit("output", data)

    def send(self, data: bytes) -> None:
        if self.status is not None:
            raise BrokenPipeError("the live run has ended")
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def text(self) -> str:
        with self._lock:
            return self.console.decode("utf-8", "replace")

    def describe(self) -> dict:
        return {"running": self.running, "output": self.text(), "status": self.status, "branch": self.output,
                "text": self.message()}
