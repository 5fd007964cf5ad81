"""Keys on the controlling terminal while recording or replaying (markers, pause).

``KeyReader`` puts a terminal in cbreak mode (keys arrive one by one, no
echo, Ctrl-C still interrupts), hands each key to a callback from a thread,
and restores the terminal on ``close``.  It does nothing unless the stream
is a terminal: piped input is never swallowed.
"""
from __future__ import annotations

import os
import select
import threading
from typing import BinaryIO, Callable, Optional

try:
    import termios
    import tty
except ImportError:         # not a POSIX terminal
    termios = tty = None


class KeyReader:
    def __init__(self, stream: BinaryIO, on_key: Callable[[bytes], None]):
        self.stream = stream
        self.on_key = on_key
        self._fd: Optional[int] = None
        self._saved = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> bool:
        """Start reading keys; False (and nothing done) when the stream is not a terminal."""
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            return False
        if termios is None or not os.isatty(fd):
            return False
        self._fd = fd
        try:
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
        except termios.error:
            self._saved = None
        self._thread = threading.Thread(target=self._read, name="rrstub-keys", daemon=True)
        self._thread.start()
        return True

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._fd], [], [], 0.1)
                if not ready:
                    continue
                key = os.read(self._fd, 1)
            except (OSError, ValueError):
                return
            if not key:
                return
            self.on_key(key)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        if self._saved is not None and termios is not None:
            try:
                termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            except termios.error:
                pass
            self._saved = None
