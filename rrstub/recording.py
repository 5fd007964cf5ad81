"""The recording file: one self-contained container a user can copy or mail.

Owns the on-disk format, writing it durably, and reading it back, including
what is left of a recording whose recorder was killed; and what a new
recording may replace (``check_output``: a new or empty file, or with
--force an rrstub recording; never another file, a device or a directory).  Payloads (kernel,
snapshots, event streams) are opaque bytes here; only chunk metadata has
meaning, and only as far as the required order of chunks.

Layout, all integers little-endian:

  file header   16 bytes: magic b"RRSTUBRC", format version u16, header
                length u16, CRC32 of the 12 bytes before it
  chunks        each: a 28-byte chunk header, the meta (a UTF-8 JSON
                object), the stored payload (a zstd frame, or the raw bytes
                when compressing would not make them smaller)
  trailer       24 bytes: magic b"RRSTUBIX", byte offset of the INDEX chunk
                u64, number of chunks before it u32, CRC32 of the 20 bytes
                before it

  chunk header  magic b"CK", kind u8, flags u8, meta length u32, stored
                payload length u32, raw payload length u32, CRC32 of the
                meta, CRC32 of the stored payload, CRC32 of the 24 bytes
                before it

Chunks come in this order: CONFIG, KERNEL, at least one MARKER (the initial
snapshot) before any EVENTS, MARKER and EVENTS mixed, and on ``finish`` END,
INDEX and the trailer.  The INDEX payload is a JSON list giving every other
chunk's kind, offset, sizes and meta.

Invariants:
* Every byte of a file is a CRC32 or lies under one, so a damaged byte is
  always found.  The meta has its own CRC, apart from the payload's, so all
  that ``Recording.open`` reports is checked without reading any payload.
* A chunk is handed to ``os.write`` whole as soon as it is built and
  nothing is buffered in this process: a killed recorder leaves every
  complete chunk on disk, followed by at most one incomplete chunk.
* Truncation is told from damage by the chunk header's own CRC: the reader
  drops only a tail too short to hold a chunk header, or whose checked
  lengths run past the end of the file.  A complete chunk whose checksum
  fails raises ``RecordingError`` with its offset; it is never skipped.
* Opening a finished recording reads the file header, the trailer and the
  INDEX only; an unfinished one is scanned, reading each chunk header and
  meta.  Payload checksums are checked when a payload is read, which also
  re-checks that chunk's header and meta (the INDEX was trusted for them).
* A damaged trailer or INDEX does not cost the recording: they only repeat
  what the chunk headers say, so the reader falls back to scanning the
  chunks (as for an unfinished file) and says so in ``recovery_note``.  A
  damaged chunk before them is still an error: the user's fix is a good
  copy, not a partial reading.
* Every failure a user can meet (missing, unreadable, foreign, newer,
  truncated, damaged file; a full disk) is one ``RecordingError`` naming the
  file and, where there is one, the byte offset; a failed write carries its
  errno (``disk_full``: ENOSPC or EDQUOT, which the CLI reports apart).  ``ValueError`` is kept for
  callers that break the writer's contract.
"""
from __future__ import annotations

import enum
import errno as errno_codes
import hashlib
import json
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import zstandard

FORMAT_VERSION = 1

FILE_MAGIC = b"RRSTUBRC"
CHUNK_MAGIC = b"CK"
TRAILER_MAGIC = b"RRSTUBIX"

_FILE_HEADER = struct.Struct("<8sHHI")
_CHUNK_HEADER = struct.Struct("<2sBBIIIIII")
_TRAILER = struct.Struct("<8sQII")
HEADER_SIZE = _FILE_HEADER.size          # 16
CHUNK_HEADER_SIZE = _CHUNK_HEADER.size   # 28
TRAILER_SIZE = _TRAILER.size             # 24

FLAG_ZSTD = 0x01
_MAX_PAYLOAD = 0xFFFF_FFFF  # the chunk header stores sizes as u32

_AGAIN = "re-copy it from the source; if the original is damaged as well, record again"


class RecordingError(Exception):
    """A recording that cannot be written or read; ``str(e)`` is the whole
    message for the user and names ``path`` (and ``offset`` when set)."""

    def __init__(self, path: str, message: str, offset: int | None = None,
                 damage: str | None = None, errno: int | None = None):
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.damage = damage      # for a damaged file: where and what, e.g. "byte offset 9 (trailer, ...)"
        self.errno = errno        # for a failed write: why (ENOSPC and EDQUOT have their own exit status)

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno_codes.ENOSPC, errno_codes.EDQUOT)


class ChunkKind(enum.IntEnum):
    CONFIG = 1
    KERNEL = 2
    MARKER = 3
    EVENTS = 4
    END = 5
    INDEX = 6


_KINDS = frozenset(ChunkKind)


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    kind: ChunkKind
    offset: int          # byte offset of the chunk header in the file
    meta: dict
    raw_size: int        # payload bytes before compression
    stored_size: int     # whole chunk on disk: header + meta + stored payload


@dataclass(frozen=True, slots=True)
class _ChunkHeader:
    kind: ChunkKind
    flags: int
    meta_len: int
    payload_len: int
    raw_size: int
    meta_crc: int
    payload_crc: int

    @property
    def size(self) -> int:
        return CHUNK_HEADER_SIZE + self.meta_len + self.payload_len


def _damaged(path: str, offset: int, where: str, problem: str) -> RecordingError:
    damage = f"byte offset {offset} ({where}, {problem})"
    return RecordingError(path, f"{path}: the file is damaged at {damage}: {_AGAIN}", offset, damage)


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _file_header() -> bytes:
    head = _FILE_HEADER.pack(FILE_MAGIC, FORMAT_VERSION, HEADER_SIZE, 0)[:12]
    return head + struct.pack("<I", zlib.crc32(head))


def _trailer(index_offset: int, count: int) -> bytes:
    head = _TRAILER.pack(TRAILER_MAGIC, index_offset, count, 0)[:20]
    return head + struct.pack("<I", zlib.crc32(head))


def _parse_chunk_header(path: str, offset: int, data: bytes) -> _ChunkHeader:
    magic, kind, flags, meta_len, payload_len, raw_size, meta_crc, payload_crc, crc = (
        _CHUNK_HEADER.unpack(data))
    if magic != CHUNK_MAGIC or zlib.crc32(data[:-4]) != crc:
        raise _damaged(path, offset, "chunk header", "checksum mismatch")
    if kind not in _KINDS or flags & ~FLAG_ZSTD:
        raise _damaged(path, offset, "chunk header", f"unknown chunk kind {kind} or flags {flags:#x}")
    return _ChunkHeader(ChunkKind(kind), flags, meta_len, payload_len, raw_size, meta_crc,
                        payload_crc)


def _parse_meta(path: str, offset: int, header: _ChunkHeader, data: bytes) -> dict:
    if zlib.crc32(data) != header.meta_crc:
        raise _damaged(path, offset, f"chunk kind {header.kind.name}", "metadata checksum mismatch")
    try:
        meta = json.loads(data)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise _damaged(path, offset, f"chunk kind {header.kind.name}",
                       "metadata is not a JSON object")
    return meta


def check_output(path, *, force: bool, option: str = "-o") -> None:
    """Refuse, before anything runs, an output a new recording cannot or must not replace.

    It must be a file this process can create or replace; an existing file
    is replaced only when it is empty or, with ``force``, an rrstub recording
    (never a kernel, a text file, a device or a directory).
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise RecordingError(path, f"{option} {path}: {e.strerror}") from None
    if st is None:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise RecordingError(path, f"{option} {path}: the directory {parent} does not exist")
        # Create it for real (and remove it again): permission bits, a read-only
        # or pseudo file system (/proc) and root's privileges all answer here.
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except OSError as e:
            raise RecordingError(path, f"{option} {path}: cannot create a file in {parent} "
                                 f"({e.strerror}); choose another directory") from None
        os.unlink(path)
        return
    if stat.S_ISDIR(st.st_mode):
        raise RecordingError(path, f"{option} {path} is a directory: give the recording a file name, "
                             f"e.g. {os.path.join(path, 'run.rrr')}")
    if not stat.S_ISREG(st.st_mode):
        raise RecordingError(path, f"{option} {path} is not a regular file (a device, pipe or socket): "
                             "a recording is a file that is read back by position; give a file name")
    if not os.access(path, os.W_OK):
        raise RecordingError(path, f"{option} {path}: the file is not writable (permission denied)")
    if st.st_size == 0:
        return
    try:
        with open(path, "rb") as f:
            magic = f.read(len(FILE_MAGIC))
    except OSError as e:
        raise RecordingError(path, f"{option} {path}: cannot read it to check what it is: {e.strerror}") from None
    if magic != FILE_MAGIC:
        raise RecordingError(path, f"{option} {path} exists and is not an rrstub recording: rrstub does "
                             "not overwrite it; choose another name, or remove the file first")
    if not force:
        raise RecordingError(path, f"{option} {path} is an existing recording: give --force to replace "
                             "it, or choose another name")


class RecordingWriter:
    """Appends chunks to a new recording file; see the module docstring for
    what survives when the process dies or the disk fills up."""

    def __init__(self, path, config: dict, kernel_name: str, kernel_bytes: bytes, *,
                 level: int = 3, initrd: Optional[bytes] = None, initrd_name: Optional[str] = None):
        self.path = os.fspath(path)
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._chunks: list[ChunkInfo] = []
        self._offset = 0
        self._raw_bytes = 0
        self._failed = False
        self._has_marker = False
        self.after_chunk = None   # called with each MARKER/EVENTS ChunkInfo once it is on disk
        try:
            self._fd: int | None = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise RecordingError(self.path, f"cannot create recording {self.path}: {e.strerror}") from None
        try:
            self._write(_file_header(), 0)
            self._add(ChunkKind.CONFIG, config, b"")
            meta = {"name": kernel_name, "sha256": hashlib.sha256(kernel_bytes).hexdigest()}
            payload = kernel_bytes
            if initrd is not None:
                # The initrd follows the kernel in the same payload; "size" says where it starts.
                meta.update(size=len(kernel_bytes),
                            initrd={"name": initrd_name or "initrd", "size": len(initrd),
                                    "sha256": hashlib.sha256(initrd).hexdigest()})
                payload = kernel_bytes + initrd
            self._add(ChunkKind.KERNEL, meta, payload)
        except BaseException:
            self.close()
            raise

    @classmethod
    def continuing(cls, rec: "Recording", upto: int, path, *, level: int = 3) -> "RecordingWriter":
        """A new file at ``path`` holding ``rec``'s bytes before byte offset
        ``upto`` (a chunk boundary), to which chunks can be added as to the
        original.  Used to rewrite a recording's tail (END with new labels)."""
        kept = [c for c in rec.chunks if c.offset + c.stored_size <= upto]
        if not kept or kept[-1].offset + kept[-1].stored_size != upto:
            raise ValueError(f"byte offset {upto} is not a chunk boundary of {rec.path}")
        self = cls.__new__(cls)
        self.path = os.fspath(path)
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._chunks = list(kept)
        self._offset = 0
        self._raw_bytes = sum(c.raw_size for c in kept)
        self._failed = False
        self._has_marker = any(c.kind is ChunkKind.MARKER for c in kept)
        self.after_chunk = None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise RecordingError(self.path, f"cannot create recording {self.path}: {e.strerror}") from None
        try:
            done = 0
            while done < upto:
                data = rec._read_raw(done, min(1 << 22, upto - done))
                self._write(data, done)
                done += len(data)
        except BaseException:
            self.close()
            raise
        return self

    def rename(self, path) -> None:
        """Move the file being written to ``path`` (atomically replacing what is there)."""
        path = os.fspath(path)
        try:
            os.replace(self.path, path)
        except OSError as e:
            raise RecordingError(path, f"cannot move {self.path} to {path}: {e.strerror}") from None
        self.path = path

    @property
    def chunks(self) -> list[ChunkInfo]:
        return list(self._chunks)

    @property
    def bytes_written(self) -> int:
        return self._offset

    @property
    def raw_bytes(self) -> int:
        return self._raw_bytes

    def add_marker(self, meta: dict, blob: bytes) -> ChunkInfo:
        if not all(isinstance(meta.get(k), int) for k in ("index", "position")):
            raise ValueError(f"marker meta needs integer 'index' and 'position': {meta!r}")
        info = self._add(ChunkKind.MARKER, meta, blob)
        self._has_marker = True
        if self.after_chunk is not None:
            self.after_chunk(info)
        return info

    def add_events(self, first: int, last: int, count: int, payload: bytes) -> ChunkInfo:
        if not self._has_marker:
            raise ValueError("events need the initial snapshot first: call add_marker before add_events")
        info = self._add(ChunkKind.EVENTS, {"first": first, "last": last, "count": count}, payload)
        if self.after_chunk is not None:
            self.after_chunk(info)
        return info

    def finish(self, summary: dict) -> None:
        """Write END, INDEX and the trailer, flush to disk and close."""
        self._add(ChunkKind.END, summary, b"")
        entries = [{"kind": int(c.kind), "offset": c.offset, "meta": c.meta,
                    "raw_size": c.raw_size, "stored_size": c.stored_size} for c in self._chunks]
        index = self._add(ChunkKind.INDEX, {"count": len(entries)}, _json(entries))
        self._write(_trailer(index.offset, len(entries)), self._offset)
        try:
            os.fsync(self._fd)
        except OSError as e:
            self._failed = True
            raise RecordingError(
                self.path, f"{self.path}: cannot flush the recording to disk: {e.strerror}",
                self._offset, errno=e.errno) from None
        self.close()

    def close(self) -> None:
        """Close without finishing: the file opens as an incomplete recording."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "RecordingWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add(self, kind: ChunkKind, meta: dict, payload: bytes) -> ChunkInfo:
        if self._fd is None:
            raise ValueError(f"the recording {self.path} is already closed")
        if self._failed:
            raise RecordingError(self.path, f"{self.path}: an earlier write to this recording "
                                 "failed; nothing more can be added to it")
        raw_size = len(payload)
        if raw_size > _MAX_PAYLOAD:
            raise RecordingError(
                self.path, f"{self.path}: a {kind.name} payload of {raw_size} bytes is larger "
                f"than a chunk can hold ({_MAX_PAYLOAD} bytes)", self._offset)
        stored, flags = payload, 0
        if raw_size:
            compressed = self._cctx.compress(payload)
            if len(compressed) < raw_size:
                stored, flags = compressed, FLAG_ZSTD
        meta_bytes = _json(meta)
        head = _CHUNK_HEADER.pack(CHUNK_MAGIC, kind, flags, len(meta_bytes), len(stored), raw_size,
                                  zlib.crc32(meta_bytes), zlib.crc32(stored), 0)[:-4]
        chunk = b"".join((head, struct.pack("<I", zlib.crc32(head)), meta_bytes, stored))
        info = ChunkInfo(kind, self._offset, json.loads(meta_bytes), raw_size, len(chunk))
        self._write(chunk, self._offset)
        self._raw_bytes += raw_size
        if kind is not ChunkKind.INDEX:
            self._chunks.append(info)
        return info

    def _write(self, data: bytes, chunk_start: int) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except OSError as e:
                self._failed = True
                raise RecordingError(
                    self.path,
                    f"{self.path}: cannot write at byte offset {self._offset}: {e.strerror}; "
                    f"the {chunk_start} bytes before this chunk are intact", self._offset,
                    errno=e.errno) from None
            self._offset += n
            view = view[n:]


class Recording:
    """A recording opened for reading; build it with ``Recording.open``."""

    def __init__(self, reader: "_Reader", version: int, chunks: list[ChunkInfo],
                 recovery_note: str):
        self.path = reader.path
        self.version = version
        self.file_size = reader.size
        self.chunks = chunks
        self.recovered = bool(recovery_note)
        self.recovery_note = recovery_note
        self.config = chunks[0].meta
        self._kernel = chunks[1]
        self.kernel_name = self._kernel.meta.get("name")
        self.kernel_sha256 = self._kernel.meta.get("sha256")
        if not (isinstance(self.kernel_name, str) and isinstance(self.kernel_sha256, str)):
            raise _damaged(self.path, self._kernel.offset, "chunk kind KERNEL",
                           "its metadata lacks the kernel name or sha256")
        self.markers = [c for c in chunks if c.kind is ChunkKind.MARKER]
        self.event_chunks = [c for c in chunks if c.kind is ChunkKind.EVENTS]
        self.summary = chunks[-1].meta if chunks[-1].kind is ChunkKind.END else None
        self._reader: _Reader | None = reader

    @classmethod
    def open(cls, path) -> "Recording":
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RecordingError(path, f"no such recording: {path}") from None
        except OSError as e:
            raise RecordingError(path, f"cannot open recording {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise RecordingError(path, f"{path} is {what}, not a recording")
            reader = _Reader(path, fd, st.st_size)
            version, header_len = reader.file_header()
            try:
                trailer = reader.trailer(header_len)
                if trailer is None:
                    chunks, note = reader.scan(header_len)
                else:
                    chunks, note = reader.index(header_len, *trailer), ""
            except RecordingError as e:
                if e.damage is None:
                    raise
                chunks, note = reader.scan(header_len, damaged_end=e.damage)
            _check_order(path, chunks, header_len)
            return cls(reader, version, chunks, note)
        except BaseException:
            os.close(fd)
            raise

    def kernel_args(self) -> dict:
        """The kernel and initrd as ``RecordingWriter`` keywords, for a recording made from this one."""
        return {"kernel_name": self.kernel_name, "kernel_bytes": self.kernel_bytes(),
                "initrd": self.initrd_bytes(), "initrd_name": self.initrd_name}

    @property
    def initrd_meta(self) -> Optional[dict]:
        """{name, size, sha256} of the initrd stored with the kernel (None: it had none)."""
        initrd = self._kernel.meta.get("initrd")
        return dict(initrd) if isinstance(initrd, dict) else None

    @property
    def initrd_name(self) -> Optional[str]:
        initrd = self._kernel.meta.get("initrd")
        return initrd.get("name") if isinstance(initrd, dict) else None

    def initrd_bytes(self) -> Optional[bytes]:
        """The initrd the recorded kernel booted with (None: it had none)."""
        initrd = self._kernel.meta.get("initrd")
        if not isinstance(initrd, dict):
            return None
        data = self.payload(self._kernel)[self._kernel.meta.get("size", 0):]
        if hashlib.sha256(data).hexdigest() != initrd.get("sha256"):
            raise _damaged(self.path, self._kernel.offset, "chunk kind KERNEL",
                           "the initrd does not match its sha256")
        return data

    def kernel_bytes(self) -> bytes:
        data = self.payload(self._kernel)
        if isinstance(self._kernel.meta.get("size"), int):
            data = data[:self._kernel.meta["size"]]
        if hashlib.sha256(data).hexdigest() != self.kernel_sha256:
            raise _damaged(self.path, self._kernel.offset, "chunk kind KERNEL",
                           "the kernel image does not match its sha256")
        return data

    def payload(self, chunk: ChunkInfo) -> bytes:
        """The chunk's payload, decompressed, after checking its header, meta and payload."""
        if self._reader is None:
            raise ValueError(f"the recording {self.path} is closed")
        data = self._reader.read(chunk.offset, chunk.stored_size)
        header = _parse_chunk_header(self.path, chunk.offset, data[:CHUNK_HEADER_SIZE])
        if (header.kind, header.raw_size, header.size) != (chunk.kind, chunk.raw_size,
                                                           chunk.stored_size):
            raise _damaged(self.path, chunk.offset, f"chunk kind {header.kind.name}",
                           "the chunk does not match the index")
        meta_end = CHUNK_HEADER_SIZE + header.meta_len
        _parse_meta(self.path, chunk.offset, header, data[CHUNK_HEADER_SIZE:meta_end])
        return _unpack_payload(self.path, chunk.offset, header, data[meta_end:])

    def _read_raw(self, offset: int, n: int) -> bytes:
        if self._reader is None:
            raise ValueError(f"the recording {self.path} is closed")
        return self._reader.read(offset, n)

    @property
    def labels(self) -> list[dict]:
        """Positions named during replay (``monitor marker add``): [{name, position}], from END."""
        found = (self.summary or {}).get("labels", [])
        return [x for x in found if isinstance(x, dict) and isinstance(x.get("name"), str)
                and isinstance(x.get("position"), int)]

    def position_range(self) -> tuple[int, int]:
        """The first and last position: the first marker's, and the end's (or, when the
        recorder was killed, the last its log covers)."""
        first = self.markers[0].meta["position"]
        if self.summary is not None:
            return first, self.summary["end_position"]
        return first, max([first] + [c.meta.get("last", 0) for c in self.event_chunks])

    def verify(self) -> None:
        """Check every chunk's header, meta and payload checksums (reads the whole file)."""
        for chunk in self.chunks:
            self.payload(chunk)

    def iter_event_payloads(self) -> Iterator[tuple[ChunkInfo, bytes]]:
        for chunk in self.event_chunks:
            yield chunk, self.payload(chunk)

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            os.close(reader.fd)

    def __enter__(self) -> "Recording":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unpack_payload(path: str, offset: int, header: _ChunkHeader, stored: bytes) -> bytes:
    where = f"chunk kind {header.kind.name}"
    if zlib.crc32(stored) != header.payload_crc:
        raise _damaged(path, offset, where, "checksum mismatch")
    if not header.flags & FLAG_ZSTD:
        return stored
    try:
        raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=header.raw_size)
    except zstandard.ZstdError:
        raw = None
    if raw is None or len(raw) != header.raw_size:
        raise _damaged(path, offset, where, "the payload does not decompress to its recorded size")
    return raw


class _Reader:
    """Bounds-checked reads of one open file and the parsing of its frame:
    file header, trailer, INDEX and the chunk scan."""

    def __init__(self, path: str, fd: int, size: int):
        self.path = path
        self.fd = fd
        self.size = size

    def read(self, offset: int, n: int) -> bytes:
        parts = []
        while n:
            try:
                part = os.pread(self.fd, n, offset)
            except OSError as e:
                raise RecordingError(self.path, f"{self.path}: cannot read at byte offset {offset}: "
                                     f"{e.strerror}", offset) from None
            if not part:
                raise RecordingError(self.path, f"{self.path}: the file ended at byte offset "
                                     f"{offset}, before its recorded end; was it changed while "
                                     "being read?", offset)
            parts.append(part)
            offset += len(part)
            n -= len(part)
        return b"".join(parts)

    def file_header(self) -> tuple[int, int]:
        """(version, header length) of a header this rrstub can read."""
        path = self.path
        head = self.read(0, min(self.size, HEADER_SIZE))
        if not FILE_MAGIC.startswith(head[:len(FILE_MAGIC)]):
            raise RecordingError(path, f"{path} is not an rrstub recording "
                                 f"(it does not start with {FILE_MAGIC.decode()})")
        if len(head) < HEADER_SIZE:
            raise RecordingError(
                path, f"{path}: truncated header: the file has {self.size} bytes and a recording "
                f"starts with a {HEADER_SIZE}-byte header (the recorder stopped before writing it, "
                "or the copy was cut short)")
        _, version, header_len, crc = _FILE_HEADER.unpack(head)
        if zlib.crc32(head[:12]) != crc:
            raise _damaged(path, 0, "file header", "checksum mismatch")
        if version > FORMAT_VERSION:
            raise RecordingError(
                path, f"{path}: recorded by a newer rrstub (format {version}, this rrstub reads up "
                f"to {FORMAT_VERSION}): upgrade rrstub")
        if version != FORMAT_VERSION or header_len != HEADER_SIZE:
            raise _damaged(path, 0, "file header",
                           f"format {version} with a {header_len}-byte header was never written")
        return version, header_len

    def trailer(self, header_len: int) -> tuple[int, int] | None:
        """(INDEX offset, chunk count) from the trailer; None when there is no trailer."""
        at = self.size - TRAILER_SIZE
        if at < header_len:
            return None
        data = self.read(at, TRAILER_SIZE)
        magic, index_offset, count, crc = _TRAILER.unpack(data)
        if magic != TRAILER_MAGIC:
            return None
        if zlib.crc32(data[:-4]) != crc:
            raise _damaged(self.path, at, "trailer", "checksum mismatch")
        if not header_len <= index_offset <= at - CHUNK_HEADER_SIZE:
            raise _damaged(self.path, at, "trailer", f"index offset {index_offset} is outside the file")
        return index_offset, count

    def index(self, header_len: int, index_offset: int, count: int) -> list[ChunkInfo]:
        at = self.size - TRAILER_SIZE
        header = _parse_chunk_header(self.path, index_offset, self.read(index_offset, CHUNK_HEADER_SIZE))
        if header.kind is not ChunkKind.INDEX or index_offset + header.size != at:
            raise _damaged(self.path, at, "trailer", "it does not point at the index")
        meta_at = index_offset + CHUNK_HEADER_SIZE
        _parse_meta(self.path, index_offset, header, self.read(meta_at, header.meta_len))
        raw = _unpack_payload(self.path, index_offset, header,
                              self.read(meta_at + header.meta_len, header.payload_len))
        try:
            chunks = [_index_entry(e) for e in json.loads(raw)]
        except (ValueError, TypeError, KeyError):
            raise _damaged(self.path, index_offset, "chunk kind INDEX", "unreadable index") from None
        expected = header_len
        for c in chunks:
            if c.offset != expected:
                raise _damaged(self.path, index_offset, "chunk kind INDEX",
                               f"its entry for byte offset {c.offset} does not fit the file")
            expected += c.stored_size
        if expected != index_offset or len(chunks) != count:
            raise _damaged(self.path, index_offset, "chunk kind INDEX",
                           "its entries do not add up to the file")
        return chunks

    def scan(self, header_len: int, damaged_end: str | None = None) -> tuple[list[ChunkInfo], str]:
        """Every complete chunk from the start, and the recovery note.

        ``damaged_end``: the damage found in the trailer or INDEX of a
        finished file, which the scan replaces (it stops after END, before them).
        """
        chunks: list[ChunkInfo] = []
        pos, what = header_len, "an incomplete chunk"
        while pos < self.size and not (chunks and chunks[-1].kind is ChunkKind.END and damaged_end):
            remaining = self.size - pos
            if remaining < CHUNK_HEADER_SIZE:
                break
            header = _parse_chunk_header(self.path, pos, self.read(pos, CHUNK_HEADER_SIZE))
            if header.size > remaining:
                break
            meta = _parse_meta(self.path, pos, header, self.read(pos + CHUNK_HEADER_SIZE, header.meta_len))
            if header.kind is ChunkKind.INDEX:
                # Only a missing trailer sends a finished file here: a cut one is truncation,
                # a whole one without its magic is damage.
                pos += header.size
                if self.size - pos >= TRAILER_SIZE:
                    damaged_end = (f"byte offset {pos} (trailer, no {TRAILER_MAGIC.decode()} trailer "
                                   "right after the index)")
                else:
                    what = "an incomplete trailer"
                break
            chunks.append(ChunkInfo(header.kind, pos, meta, header.raw_size, header.size))
            pos += header.size
        n = len(chunks)
        found = f"{n} complete chunk{'s' if n != 1 else ''} up to byte offset {pos} of {self.size}"
        if damaged_end and chunks and chunks[-1].kind is ChunkKind.END:
            return chunks, (f"{self.path}: the index at the end of the file is damaged at {damaged_end}; read the "
                            f"recording by scanning its chunks instead: recovered all {found}, through "
                            "its END, so nothing recorded is missing (a good copy opens faster)")
        note = (f"the recording is incomplete (no index at its end; the recorder was probably "
                f"killed): recovered {found}")
        if pos < self.size:
            note += f"; the last {self.size - pos} bytes are {what} and were ignored"
        return chunks, note


def _index_entry(e: dict) -> ChunkInfo:
    kind = ChunkKind(e["kind"])
    fields = (e["offset"], e["raw_size"], e["stored_size"])
    if kind is ChunkKind.INDEX or not all(isinstance(v, int) for v in fields) \
            or not isinstance(e["meta"], dict):
        raise ValueError(e)
    return ChunkInfo(kind, e["offset"], e["meta"], e["raw_size"], e["stored_size"])


def _check_order(path: str, chunks: list[ChunkInfo], header_len: int) -> None:
    """CONFIG, KERNEL, a MARKER before any EVENTS, END last if present."""
    def end_of(i: int) -> int:
        return chunks[i - 1].offset + chunks[i - 1].stored_size if i else header_len

    for i, (kind, missing) in enumerate(((ChunkKind.CONFIG, "the machine configuration"),
                                         (ChunkKind.KERNEL, "the kernel image"))):
        if len(chunks) <= i or chunks[i].kind is not kind:
            raise RecordingError(
                path, f"{path}: {missing} is missing (no {kind.name} chunk at byte offset "
                f"{end_of(i)}): the recording cannot be replayed; record again", end_of(i))
    seen_marker = False
    for i, c in enumerate(chunks[2:], 2):
        if c.kind is ChunkKind.EVENTS and not seen_marker:
            problem = "events come before the initial snapshot"
        elif c.kind in (ChunkKind.CONFIG, ChunkKind.KERNEL):
            problem = f"a second {c.kind.name} chunk"
        elif c.kind is ChunkKind.END and i != len(chunks) - 1:
            problem = "chunks follow the END chunk"
        else:
            seen_marker |= c.kind is ChunkKind.MARKER
            continue
        raise RecordingError(path, f"{path}: chunk kind {c.kind.name} at byte offset {c.offset} is "
                             f"out of place ({problem}): the file was not written by rrstub or is "
                             f"damaged; {_AGAIN}", c.offset)
    if not seen_marker:
        end = end_of(len(chunks))
        raise RecordingError(
            path, f"{path}: the initial snapshot is missing (no MARKER chunk after the kernel; "
            f"the chunks end at byte offset {end}): the recording cannot be replayed; record again",
            end)
