"""Sans-IO codec for the server side of the GDB remote serial protocol.

Bytes from gdb go in through ``Codec.feed`` and come out as events: a
``Packet`` holding a typed request, or an ``Interrupt`` (a 0x03 byte outside
a packet).  Typed replies go in through ``Codec.send``; ``data_to_send``
hands back the framed bytes.  Nothing here does I/O or keeps time.

Invariants:

* ``Codec.feed`` and ``parse_request`` never raise, whatever the bytes.  A
  packet that frames correctly but cannot be understood becomes
  ``Malformed`` (the server answers an error) or ``Unknown`` (the server
  answers empty, meaning "not supported").
* Memory is bounded: at most ``max_packet`` payload bytes are buffered per
  packet; the rest of a longer payload is counted and dropped up to its
  ``#xx`` and the packet becomes ``Malformed``.  The decoded payload is held
  to the same limit.
* Wire decoding follows GDB: the checksum covers the bytes between ``$`` and
  ``#`` as sent; run-length ``*`` is expanded on those bytes first (it
  repeats the byte before it), then ``}`` escapes are removed.  The reply
  encoder relies on that order.
* Ack mode (the start state): every complete packet is answered ``+`` (good
  checksum) or ``-`` (bad: no event, gdb resends); a ``-`` from gdb queues
  the last reply again, at most once per ``data_to_send`` (a burst of
  ``-`` cannot multiply the output).  After ``start_no_ack`` nothing is acked, incoming
  ``+`` and ``-`` are ignored and checksums are not checked (GDB does the
  same: there is no way left to ask for a retransmission).
* Every reply payload is escaped for ``$ # } *`` when framed.  GDB removes
  ``}`` escapes only from binary replies (qXfer chunks, the attachments of
  host I/O replies); every other reply built here is ASCII without those
  four characters.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Callable, Optional, Union

# --------------------------------------------------------------------------
# Requests (gdb -> stub)


@dataclass(frozen=True)
class QuerySupported:
    """``qSupported[:feature;...]``: gdb's features, as sent."""
    features: tuple[str, ...]


@dataclass(frozen=True)
class StartNoAck:
    """``QStartNoAckMode``."""


@dataclass(frozen=True)
class MustReplyEmpty:
    """``vMustReplyEmpty``: the reply must be empty."""


@dataclass(frozen=True)
class StopReason:
    """``?``: why the target stopped."""


@dataclass(frozen=True)
class ReadRegisters:
    """``g``."""


@dataclass(frozen=True)
class WriteRegisters:
    """``G``: the whole register file, hex-decoded."""
    data: bytes


@dataclass(frozen=True)
class ReadRegister:
    """``p``: one register by its target-description number."""
    number: int


@dataclass(frozen=True)
class WriteRegister:
    """``P``: one register, hex-decoded, in target byte order."""
    number: int
    value: bytes


@dataclass(frozen=True)
class ReadMemory:
    """``m``."""
    addr: int
    length: int


@dataclass(frozen=True)
class WriteMemory:
    """``M`` (hex) and ``X`` (binary); ``data`` is decoded."""
    addr: int
    data: bytes


@dataclass(frozen=True)
class Continue:
    """``c[addr]`` and ``Csig[;addr]``."""
    addr: Optional[int] = None
    signal: Optional[int] = None


@dataclass(frozen=True)
class Step:
    """``s[addr]`` and ``Ssig[;addr]``."""
    addr: Optional[int] = None
    signal: Optional[int] = None


@dataclass(frozen=True)
class VContQuery:
    """``vCont?``."""


@dataclass(frozen=True)
class VCont:
    """``vCont;action[:thread]...``.

    Each action is ``(letter, thread)``: letter ``c``, ``s`` or ``t`` (``C``
    and ``S`` fold into ``c`` and ``s``, dropping the signal, which a replay
    cannot deliver); thread is the thread id as sent, or None for "all".
    """
    actions: tuple[tuple[str, Optional[str]], ...]


@dataclass(frozen=True)
class ReverseStep:
    """``bs``."""


@dataclass(frozen=True)
class ReverseContinue:
    """``bc``."""


@dataclass(frozen=True)
class InsertPoint:
    """``Zk,addr,size``: k is 0 sw break, 1 hw break, 2 write, 3 read, 4 access watch."""
    kind: int
    addr: int
    size: int


@dataclass(frozen=True)
class RemovePoint:
    """``zk,addr,size``."""
    kind: int
    addr: int
    size: int


@dataclass(frozen=True)
class SetThread:
    """``H<op><thread>``: op ``g`` (registers, memory) or ``c`` (resumption)."""
    op: str
    thread: str


@dataclass(frozen=True)
class ThreadAlive:
    """``T<thread>``."""
    thread: str


@dataclass(frozen=True)
class Kill:
    """``k`` and ``vKill;pid``."""


@dataclass(frozen=True)
class Detach:
    """``D`` and ``D;pid``."""


@dataclass(frozen=True)
class XferRead:
    """``qXfer:object:read:annex:offset,length``."""
    object: str
    annex: str
    offset: int
    length: int


@dataclass(frozen=True)
class Monitor:
    """``qRcmd,hex``: the monitor command's text."""
    command: str


@dataclass(frozen=True)
class HostOpen:
    """``vFile:open:path,flags,mode``: host I/O (the exec-file gdb reads); ``path`` decoded."""
    path: str
    flags: int
    mode: int


@dataclass(frozen=True)
class HostPread:
    """``vFile:pread:fd,count,offset``."""
    fd: int
    count: int
    offset: int


@dataclass(frozen=True)
class HostClose:
    """``vFile:close:fd``."""
    fd: int


@dataclass(frozen=True)
class HostFstat:
    """``vFile:fstat:fd``."""
    fd: int


@dataclass(frozen=True)
class HostSetFs:
    """``vFile:setfs:pid``: whose filesystem later paths name (0: the stub's)."""
    pid: int


@dataclass(frozen=True)
class HostOther:
    """Any other ``vFile:`` operation (pwrite, unlink, readlink, ...)."""
    operation: str


@dataclass(frozen=True)
class Checksum:
    """``qCRC:addr,length``: gdb's ``compare-sections`` asks the CRC of target memory."""
    addr: int
    length: int


@dataclass(frozen=True)
class Query:
    """Any other ``q``/``Q`` packet: ``name`` up to the first ``:`` or ``,``
    (with its q/Q), ``args`` after that separator."""
    name: str
    args: str


@dataclass(frozen=True)
class Unknown:
    """A packet this codec does not model; the answer is ``Empty()``."""
    payload: bytes


@dataclass(frozen=True)
class Malformed:
    """A packet that cannot be decoded or has bad arguments; the answer is an ``Error``."""
    reason: str


Request = Union[
    QuerySupported, StartNoAck, MustReplyEmpty, StopReason, ReadRegisters,
    WriteRegisters, ReadRegister, WriteRegister, ReadMemory, WriteMemory,
    Continue, Step, VContQuery, VCont, ReverseStep, ReverseContinue,
    InsertPoint, RemovePoint, SetThread, ThreadAlive, Kill, Detach, XferRead,
    Monitor, HostOpen, HostPread, HostClose, HostFstat, HostSetFs, HostOther, Checksum,
    Query, Unknown, Malformed,
]

# --------------------------------------------------------------------------
# Replies (stub -> gdb); ``encode`` gives the payload before framing.


def _check_byte(what: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{what} must fit in one byte, not {value}")


@dataclass(frozen=True)
class Ok:
    def encode(self) -> bytes:
        return b"OK"


@dataclass(frozen=True)
class Error:
    """``Exx``; ``message`` is for logs only (GDB 13 needs no ``E.text``)."""
    code: int = 1
    message: str = ""

    def __post_init__(self) -> None:
        _check_byte("error code", self.code)

    def encode(self) -> bytes:
        return b"E%02x" % self.code


@dataclass(frozen=True)
class Empty:
    """The empty reply: "not supported"."""

    def encode(self) -> bytes:
        return b""


@dataclass(frozen=True)
class Raw:
    data: bytes

    def encode(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class HexData:
    """Bytes as lowercase hex (``g``, ``p``, ``m`` replies)."""
    data: bytes

    def encode(self) -> bytes:
        return self.data.hex().encode()


@dataclass(frozen=True)
class Stop:
    """``Tss`` then ``key:value;`` for each pair of ``info``, then ``thread:id;``."""
    signal: int = 5
    info: tuple[tuple[str, str], ...] = ()
    thread: Optional[str] = None

    def __post_init__(self) -> None:
        _check_byte("signal", self.signal)
        for key, value in self._pairs():
            if not key or re.search(r"[:;$#}*]", key) or re.search(r"[;$#}*]", value):
                raise ValueError(f"bad stop reply pair {key!r}:{value!r}")

    def _pairs(self) -> tuple[tuple[str, str], ...]:
        if self.thread is None:
            return self.info
        return self.info + (("thread", self.thread),)

    def encode(self) -> bytes:
        body = "".join(f"{key}:{value};" for key, value in self._pairs())
        return f"T{self.signal:02x}{body}".encode()


@dataclass(frozen=True)
class Exited:
    """``Wss``: the process exited with this status."""
    status: int

    def __post_init__(self) -> None:
        _check_byte("exit status", self.status)

    def encode(self) -> bytes:
        return b"W%02x" % self.status


@dataclass(frozen=True)
class XferChunk:
    """One qXfer chunk: ``m`` (more follows) or ``l`` (last), then raw bytes."""
    data: bytes
    more: bool

    def encode(self) -> bytes:
        return (b"m" if self.more else b"l") + self.data


@dataclass(frozen=True)
class ConsoleOutput:
    """``O`` + hex text: output gdb prints (monitor commands)."""
    text: str

    def encode(self) -> bytes:
        return b"O" + self.text.encode().hex().encode()


@dataclass(frozen=True)
class HostResult:
    """A host I/O reply: ``F`` result (hex; ``-1,errno`` on failure) ``;`` attachment.

    ``errno`` is one of the protocol's own numbers (``FILEIO_*`` below), not the host's.
    """
    result: int
    errno: Optional[int] = None
    attachment: Optional[bytes] = None

    def encode(self) -> bytes:
        head = f"-{-self.result:x}" if self.result < 0 else f"{self.result:x}"
        if self.errno is not None:
            head += f",{self.errno:x}"
        out = b"F" + head.encode()
        return out if self.attachment is None else out + b";" + self.attachment


@dataclass(frozen=True)
class Crc:
    """``C`` + the CRC of a ``qCRC`` range, hex."""
    value: int

    def encode(self) -> bytes:
        return b"C%x" % self.value


Reply = Union[Ok, Error, Empty, Raw, HexData, Stop, Exited, XferChunk, ConsoleOutput, HostResult, Crc]

# The protocol's errno values for host I/O replies (GDB manual, "Errno Values").
FILEIO_ENOENT, FILEIO_EBADF, FILEIO_EACCES, FILEIO_EINVAL, FILEIO_EMFILE, FILEIO_EROFS = 2, 9, 13, 22, 24, 30

# The ``struct stat`` of host I/O (GDB manual, "struct stat"): big-endian, 64 bytes.
_FILEIO_STAT = struct.Struct(">IIIIIIIQQQIII")
_S_IFREG = 0o100000


def fileio_stat(size: int, mode: int = 0o444, mtime: int = 0) -> bytes:
    """The ``vFile:fstat`` attachment for a regular file of ``size`` bytes."""
    return _FILEIO_STAT.pack(0, 0, _S_IFREG | mode, 1, 0, 0, 0, size, 4096, (size + 511) // 512,
                             mtime, mtime, mtime)


def gdb_crc32(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """The CRC gdb's ``compare-sections`` expects for ``qCRC``: CRC-32 (polynomial
    0x04c11db7), most significant bit first, starting at 0xffffffff, no final inversion
    (libiberty's ``xcrc32``; zlib's CRC-32 is the bit-reversed variant)."""
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC_TABLE[(crc >> 24) ^ byte]
    return crc


def _crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i << 24
        for _ in range(8):
            c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else c << 1
        table.append(c & 0xFFFFFFFF)
    return tuple(table)


_CRC_TABLE = _crc_table()


def supported_reply(packet_size: int, reverse: bool, exec_file: bool = False) -> Raw:
    """The ``qSupported`` answer; the reverse pair only when serving a replay, the
    exec-file object only when there is a file to serve through host I/O."""
    features = (f"PacketSize={packet_size:x};QStartNoAckMode+;qXfer:features:read+;"
                "swbreak+;hwbreak+;vContSupported+")
    if exec_file:
        features += ";qXfer:exec-file:read+"
    if reverse:
        features += ";ReverseStep+;ReverseContinue+"
    return Raw(features.encode())

# --------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class Packet:
    request: Request


@dataclass(frozen=True)
class Interrupt:
    """gdb sent 0x03 (Ctrl-C) between packets."""


Event = Union[Packet, Interrupt]

# --------------------------------------------------------------------------
# Request parsing


class _BadArgument(Exception):
    """Raised inside the parser; becomes ``Malformed``."""


_HEX = re.compile(rb"[0-9a-fA-F]+")
_HEX_BYTES = re.compile(rb"(?:[0-9a-fA-F]{2})*")
_THREAD_ID = re.compile(rb"p(?:-1|[0-9a-fA-F]+)(?:\.(?:-1|[0-9a-fA-F]+))?|-1|[0-9a-fA-F]+")
_LIMIT_64 = 1 << 64


def _number(field: bytes, what: str, limit: int = _LIMIT_64) -> int:
    """A hex number below ``limit`` (no sign, prefix or spaces)."""
    if not _HEX.fullmatch(field):
        raise _BadArgument(f"bad {what}: {field[:40]!r}")
    value = int(field, 16)
    if value >= limit:
        raise _BadArgument(f"{what} {field[:40].decode()} is too large")
    return value


def _optional_address(field: bytes) -> Optional[int]:
    return _number(field, "address") if field else None


def _hex_bytes(field: bytes, what: str) -> bytes:
    if not _HEX_BYTES.fullmatch(field):
        raise _BadArgument(f"bad hex {what}")
    return bytes.fromhex(field.decode())


def _split(body: bytes, sep: bytes, count: int, what: str) -> list[bytes]:
    parts = body.split(sep, count - 1)
    if len(parts) != count:
        raise _BadArgument(f"expected {what}, got {body[:40]!r}")
    return parts


def _thread(field: bytes) -> str:
    if not _THREAD_ID.fullmatch(field):
        raise _BadArgument(f"bad thread id {field[:40]!r}")
    return field.decode()


def _range(addr_field: bytes, length_field: bytes) -> tuple[int, int]:
    addr = _number(addr_field, "address")
    length = _number(length_field, "length")
    if addr + length > _LIMIT_64:
        raise _BadArgument(f"range {addr:#x}+{length:#x} goes beyond 64 bits")
    return addr, length


def _no_arguments(request: Request) -> Callable[[bytes], Request]:
    def parse(body: bytes) -> Request:
        if body:
            raise _BadArgument(f"unexpected arguments {body[:40]!r}")
        return request
    return parse


def _parse_read_memory(body: bytes) -> Request:
    return ReadMemory(*_range(*_split(body, b",", 2, "addr,length")))


def _parse_write_memory(body: bytes, binary: bool) -> Request:
    head, data = _split(body, b":", 2, "addr,length:data")
    addr, length = _range(*_split(head, b",", 2, "addr,length"))
    if not binary:
        data = _hex_bytes(data, "data")
    if len(data) != length:
        raise _BadArgument(f"length {length} but {len(data)} data bytes")
    return WriteMemory(addr, data)


def _parse_resume(body: bytes, cls: type[Continue] | type[Step], with_signal: bool) -> Request:
    if not with_signal:
        return cls(_optional_address(body))
    sig, _, addr = body.partition(b";")
    return cls(_optional_address(addr), _number(sig, "signal", 0x100))


def _parse_point(body: bytes, cls: type[InsertPoint] | type[RemovePoint]) -> Request:
    kind, addr, size = _split(body, b",", 3, "kind,addr,size")
    if kind not in (b"0", b"1", b"2", b"3", b"4"):
        raise _BadArgument(f"unknown breakpoint type {kind[:40]!r}")
    return cls(int(kind), _number(addr, "address"), _number(size, "size"))


def _parse_write_register(body: bytes) -> Request:
    number, value = _split(body, b"=", 2, "register=value")
    return WriteRegister(_number(number, "register number"), _hex_bytes(value, "register value"))


def _parse_set_thread(body: bytes) -> Request:
    op = body[:1]
    if op not in (b"g", b"c"):
        raise _BadArgument(f"unknown H operation {op!r}")
    return SetThread(op.decode(), _thread(body[1:]))


def _parse_detach(body: bytes) -> Request:
    if body and not (body[:1] == b";" and _HEX.fullmatch(body[1:])):
        raise _BadArgument(f"bad detach arguments {body[:40]!r}")
    return Detach()


def _parse_vcont(body: bytes) -> Request:
    actions = []
    for item in body.split(b";"):
        action, colon, thread = item.partition(b":")
        letter = action[:1].lower()
        if not (action in (b"c", b"s", b"t")
                or (action[:1] in (b"C", b"S") and _HEX.fullmatch(action[1:])
                    and len(action) <= 3)):
            raise _BadArgument(f"unsupported vCont action {action[:40]!r}")
        actions.append((letter.decode(), _thread(thread) if colon else None))
    return VCont(tuple(actions))


def _parse_xfer(body: bytes) -> Request:
    obj, _, rest = body.partition(b":")
    op, _, rest = rest.partition(b":")
    if op != b"read":
        return Unknown(b"qXfer:" + body)
    annex, colon, window = rest.rpartition(b":")
    if not colon:
        raise _BadArgument("qXfer read without annex:offset,length")
    offset, length = _split(window, b",", 2, "offset,length")
    return XferRead(obj.decode("latin-1"), annex.decode("latin-1"),
                    _number(offset, "offset"), _number(length, "length"))


def _parse_monitor(body: bytes) -> Request:
    if body[:1] != b",":
        raise _BadArgument("qRcmd without a command")
    return Monitor(_hex_bytes(body[1:], "command").decode("utf-8", "replace"))


def _parse_host_io(body: bytes) -> Request:
    operation, colon, args = body.partition(b":")
    if not colon:
        raise _BadArgument(f"vFile without arguments: {body[:40]!r}")
    if operation == b"open":
        path, flags, mode = _split(args, b",", 3, "path,flags,mode")
        return HostOpen(_hex_bytes(path, "path").decode("utf-8", "replace"),
                        _number(flags, "flags", 1 << 32), _number(mode, "mode", 1 << 32))
    if operation == b"pread":
        fd, count, offset = _split(args, b",", 3, "fd,count,offset")
        return HostPread(_number(fd, "fd", 1 << 32), _number(count, "count"), _number(offset, "offset"))
    if operation in (b"close", b"fstat"):
        cls = HostClose if operation == b"close" else HostFstat
        return cls(_number(args, "fd", 1 << 32))
    if operation == b"setfs":
        return HostSetFs(_number(args, "pid", 1 << 32))
    return HostOther(operation.decode("latin-1"))


def _parse_crc(body: bytes) -> Request:
    return Checksum(*_range(*_split(body, b",", 2, "addr,length")))


def _parse_kill(body: bytes) -> Request:
    if not _HEX.fullmatch(body):
        raise _BadArgument(f"bad pid {body[:40]!r}")
    return Kill()


def _parse_query(payload: bytes) -> Request:
    name = re.split(rb"[:,]", payload, maxsplit=1)[0]
    return Query(name.decode("latin-1"), payload[len(name) + 1:].decode("latin-1"))


_EXACT: dict[bytes, Request] = {
    b"?": StopReason(),
    b"vCont?": VContQuery(),
    b"vMustReplyEmpty": MustReplyEmpty(),
    b"QStartNoAckMode": StartNoAck(),
    b"bs": ReverseStep(),
    b"bc": ReverseContinue(),
    b"qSupported": QuerySupported(()),
}

_BY_PREFIX: tuple[tuple[bytes, Callable[[bytes], Request]], ...] = (
    (b"qSupported:", lambda b: QuerySupported(tuple(f.decode("latin-1") for f in b.split(b";")))),
    (b"qXfer:", _parse_xfer),
    (b"qRcmd", _parse_monitor),
    (b"qCRC:", _parse_crc),
    (b"vFile:", _parse_host_io),
    (b"vCont;", _parse_vcont),
    (b"vKill;", _parse_kill),
)

_BY_LETTER: dict[bytes, Callable[[bytes], Request]] = {
    b"g": _no_arguments(ReadRegisters()),
    b"k": _no_arguments(Kill()),
    b"G": lambda b: WriteRegisters(_hex_bytes(b, "registers")),
    b"p": lambda b: ReadRegister(_number(b, "register number")),
    b"P": _parse_write_register,
    b"m": _parse_read_memory,
    b"M": lambda b: _parse_write_memory(b, binary=False),
    b"X": lambda b: _parse_write_memory(b, binary=True),
    b"c": lambda b: _parse_resume(b, Continue, with_signal=False),
    b"C": lambda b: _parse_resume(b, Continue, with_signal=True),
    b"s": lambda b: _parse_resume(b, Step, with_signal=False),
    b"S": lambda b: _parse_resume(b, Step, with_signal=True),
    b"Z": lambda b: _parse_point(b, InsertPoint),
    b"z": lambda b: _parse_point(b, RemovePoint),
    b"H": _parse_set_thread,
    b"T": lambda b: ThreadAlive(_thread(b)),
    b"D": _parse_detach,
}


def parse_request(payload: bytes) -> Request:
    """The request in one decoded packet payload; never raises."""
    try:
        exact = _EXACT.get(payload)
        if exact is not None:
            return exact
        for prefix, parse in _BY_PREFIX:
            if payload.startswith(prefix):
                return parse(payload[len(prefix):])
        letter = payload[:1]
        if letter in _BY_LETTER:
            return _BY_LETTER[letter](payload[1:])
        if letter in (b"q", b"Q"):
            return _parse_query(payload)
        return Unknown(payload)
    except _BadArgument as err:
        return Malformed(str(err))

# --------------------------------------------------------------------------
# Wire format


_ESCAPE = 0x7D
_NEEDS_ESCAPE = re.compile(rb"[$#}*]")
_FRAME_DELIMITER = re.compile(rb"[$#]")
_CHECKSUM = re.compile(rb"[0-9a-fA-F]{2}")
_RLE_BIAS = 29                    # a count character is (extra repeats) + 29
_RLE_MAX_EXTRA = 126 - _RLE_BIAS  # count characters stay printable ASCII
_RLE_FORBIDDEN = frozenset(c - _RLE_BIAS for c in b"#$+-")
_RUN = re.compile(rb"(.)\1{3,}", re.DOTALL)  # a run of 4 or more is worth encoding


def _too_long(length: int, limit: int) -> str:
    return f"packet too long: {length} bytes, the limit is {limit}"


def _expand_runs(wire: bytes, limit: int) -> bytes:
    """Expand ``x*n`` (x repeated n-29 more times) as GDB does, before unescaping."""
    if b"*" not in wire:
        return wire
    out = bytearray()
    start = 0
    while (star := wire.find(b"*", start)) >= 0:
        out += wire[start:star]
        if not out or star + 1 == len(wire) or wire[star + 1] <= _RLE_BIAS:
            raise _BadArgument("bad run-length encoding")
        out += out[-1:] * (wire[star + 1] - _RLE_BIAS)   # at most 226 bytes
        start = star + 2
    out += wire[start:]
    if len(out) > limit:
        raise _BadArgument(_too_long(len(out), limit))
    return bytes(out)


def _unescape(data: bytes) -> bytes:
    if b"}" not in data:
        return data
    out = bytearray()
    start = 0
    while (brace := data.find(b"}", start)) >= 0:
        if brace + 1 == len(data):
            raise _BadArgument("escape character at the end of the packet")
        out += data[start:brace]
        out.append(data[brace + 1] ^ 0x20)
        start = brace + 2
    out += data[start:]
    return bytes(out)


def _escape(payload: bytes) -> bytes:
    return _NEEDS_ESCAPE.sub(lambda m: bytes((_ESCAPE, m.group()[0] ^ 0x20)), payload)


def _encode_run(match: re.Match[bytes]) -> bytes:
    char = match.group(1)
    left = len(match.group())
    out = bytearray()
    while left >= 4:
        extra = min(left - 1, _RLE_MAX_EXTRA)
        while extra in _RLE_FORBIDDEN:
            extra -= 1
        out += char + b"*" + bytes((extra + _RLE_BIAS,))
        left -= 1 + extra
    return bytes(out + char * left)


class Codec:
    """One connection's framing state; see the module docstring."""

    def __init__(self, max_packet: int = 16384, rle: bool = False) -> None:
        if max_packet < 1:
            raise ValueError("max_packet must be positive")
        self.max_packet = max_packet
        self._rle = rle
        self._ack = True
        self._out = bytearray()
        self._last_frame = b""
        self._resend_queued = False
        self._in_packet = False
        self._payload = bytearray()   # at most max_packet bytes
        self._length = 0              # payload bytes seen, buffered or not
        self._sum = 0
        self._checksum: Optional[bytearray] = None  # set after '#'

    @property
    def ack_mode(self) -> bool:
        return self._ack

    @property
    def in_packet(self) -> bool:
        """A packet has begun (``$`` seen) and is not complete yet."""
        return self._in_packet

    def feed(self, data: bytes) -> list[Event]:
        """Consume bytes from gdb; return the complete events in them."""
        events: list[Event] = []
        pos, end = 0, len(data)
        while pos < end:
            if self._checksum is not None:
                self._checksum.append(data[pos])
                pos += 1
                if len(self._checksum) == 2:
                    packet = self._finish_packet()
                    if packet is not None:
                        events.append(packet)
            elif self._in_packet:
                found = _FRAME_DELIMITER.search(data, pos)
                stop = found.start() if found else end
                self._absorb(memoryview(data)[pos:stop])
                pos = stop
                if found:
                    pos += 1
                    if data[stop] == ord("#"):
                        self._checksum = bytearray()
                    else:                       # '$' inside a packet: gdb restarted
                        self._start_packet()
            else:
                byte = data[pos]
                pos += 1
                if byte == ord("$"):
                    self._start_packet()
                elif byte == 0x03:
                    events.append(Interrupt())
                elif self._ack and byte == ord("-") and not self._resend_queued:
                    self._out += self._last_frame
                    self._resend_queued = True
                elif self._ack and byte == ord("+"):
                    self._last_frame = b""
        return events

    def send(self, reply: Reply) -> None:
        """Frame a reply and queue it."""
        wire = _escape(reply.encode())
        if self._rle:
            wire = _RUN.sub(_encode_run, wire)
        frame = b"$" + wire + b"#%02x" % (sum(wire) & 0xFF)
        self._out += frame
        if self._ack:
            self._last_frame = frame

    def data_to_send(self) -> bytes:
        """Return and clear the queued output (acks and frames)."""
        out = bytes(self._out)
        self._out.clear()
        self._resend_queued = False
        return out

    def start_no_ack(self) -> None:
        """Leave ack mode; call after queueing ``Ok()`` for ``QStartNoAckMode``."""
        self._ack = False
        self._last_frame = b""

    def _start_packet(self) -> None:
        self._in_packet = True
        self._payload = bytearray()
        self._length = 0
        self._sum = 0

    def _absorb(self, chunk: memoryview) -> None:
        self._sum = (self._sum + sum(chunk)) & 0xFF
        room = self.max_packet - len(self._payload)
        if room > 0:
            self._payload += chunk[:room]
        self._length += len(chunk)

    def _finish_packet(self) -> Optional[Packet]:
        assert self._checksum is not None
        digits = bytes(self._checksum)
        wire, length, total = bytes(self._payload), self._length, self._sum
        self._checksum = None
        self._in_packet = False
        self._payload = bytearray()
        if self._ack:
            if not (_CHECKSUM.fullmatch(digits) and int(digits, 16) == total):
                self._out += b"-"
                return None
            self._out += b"+"
        if length > self.max_packet:
            return Packet(Malformed(_too_long(length, self.max_packet)))
        try:
            payload = _unescape(_expand_runs(wire, self.max_packet))
        except _BadArgument as err:
            return Packet(Malformed(str(err)))
        return Packet(parse_request(payload))
