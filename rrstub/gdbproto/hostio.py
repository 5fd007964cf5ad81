"""Host I/O for gdb: the recorded kernel served as the target's one file.

gdb asks the target which file it runs (``qXfer:exec-file:read``) when it
has none of its own, and opens the answer through the ``vFile:`` packets
(its sysroot is ``target:`` by default).  ``HostFiles`` answers those
packets from bytes in memory: the kernel image embedded in the recording,
under a path that names it (``/rrstub/<recording>/<kernel>``), so gdb's
"Reading ... from remote target" line says where its symbols come from.

Invariants: no file of the machine running the server is ever opened (any
other path is ENOENT), nothing is writable (EROFS), descriptors are small
integers from 3 up, at most ``MAX_OPEN`` at once, and a ``pread`` never
returns more than ``max_read`` bytes, so the escaped reply fits gdb's packet.
"""
from __future__ import annotations

import os
from rrstub.gdbproto import codec as C

MAX_OPEN = 16


def exec_path(recording_path: str, kernel_name: str) -> str:
    """The path gdb is told the target runs: absolute (gdb opens only those through
    ``target:``) and naming both the recording and the kernel inside it."""
    return f"/rrstub/{os.path.basename(recording_path)}/{os.path.basename(kernel_name)}"


class HostFiles:
    """One client's open files: answers host I/O requests for the single file ``path``."""

    def __init__(self, path: str, data: bytes, max_read: int):
        self.path = path
        self.data = data
        self.max_read = max_read
        self.fds: set[int] = set()

    def handle(self, req) -> C.HostResult:
        if isinstance(req, C.HostSetFs):
            return C.HostResult(0)
        if isinstance(req, C.HostOpen):
            return self._open(req)
        if isinstance(req, (C.HostPread, C.HostClose, C.HostFstat)) and req.fd not in self.fds:
            return C.HostResult(-1, C.FILEIO_EBADF)
        if isinstance(req, C.HostPread):
            chunk = self.data[req.offset:req.offset + min(req.count, self.max_read)]
            return C.HostResult(len(chunk), attachment=chunk)
        if isinstance(req, C.HostFstat):
            stat = C.fileio_stat(len(self.data))
            return C.HostResult(len(stat), attachment=stat)
        if isinstance(req, C.HostClose):
            self.fds.discard(req.fd)
            return C.HostResult(0)
        return C.HostResult(-1, C.FILEIO_EROFS)   # pwrite, unlink, ...: the recording is read-only

    def _open(self, req: C.HostOpen) -> C.HostResult:
        if req.path != self.path:
            return C.HostResult(-1, C.FILEIO_ENOENT)
        if req.flags & 3:     # O_WRONLY or O_RDWR (the protocol's values are the POSIX ones)
            return C.HostResult(-1, C.FILEIO_EROFS)
        if len(self.fds) >= MAX_OPEN:
            return C.HostResult(-1, C.FILEIO_EMFILE)
        fd = next(n for n in range(3, 3 + MAX_OPEN + 1) if n not in self.fds)
        self.fds.add(fd)
        return C.HostResult(fd)

    def exec_file(self, offset: int, length: int, max_chunk: int) -> C.XferChunk:
        """A ``qXfer:exec-file:read`` chunk of the path."""
        name = self.path.encode()
        chunk = name[offset:offset + min(length, max_chunk)]
        return C.XferChunk(chunk, offset + len(chunk) < len(name))
