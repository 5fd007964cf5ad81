"""The GDB server: a TCP socket, the codec, and a session that maps requests to the timeline.

One gdb at a time.  ``serve`` accepts a client, runs a ``Session`` until the
client detaches, kills or disconnects, and then waits for the next one; the
timeline keeps its position, its checkpoints and its markers across
clients.  A client that connects while another is attached is answered, at
its first packet, with an error that says why (gdb prints it as "Remote
failure reply: E.rrstub: ...") and is disconnected: queueing it would leave
its gdb waiting on a reply it times out on.

A connection must speak the protocol: one that sends no complete packet
within ``handshake_timeout`` of connecting, or stops in the middle of a
packet for ``packet_timeout``, is closed, so a port scan or a dead client
cannot keep the next gdb out.  An attached gdb that simply waits at its
prompt is never timed out.  Only sessions that sent a packet count for
``clients``.

While the timeline runs forward or backward for a ``c``, ``bc`` or ``vCont``,
the session looks at the socket every few thousand instructions: a Ctrl-C
(0x03) from gdb stops the run with SIGINT, and a closed connection ends it.
gdb waits for those stop replies without a timeout.  A monitor command
(``qRcmd``) is different: gdb gives up on it after three ``remotetimeout``
periods ("Ignoring packet error"), so while one runs a helper thread sends
console output (``O`` packets, which restart gdb's timer) every
``keepalive`` seconds.

gdb caches registers and memory and nothing in the protocol tells it that a
``monitor goto`` moved the target (GDB 13's ``monitor`` sends ``qRcmd`` and
only prints what comes back).  ``examples/gdb/rrstub-hooks.gdb`` makes gdb
reread the state after every monitor command.

The recording's kernel is served to gdb as the target's executable
(``qXfer:exec-file:read`` and host I/O, see ``hostio``), so a gdb started
without a file reads the recorded symbols, and gdb's own build-id check
(``exec-file-mismatch``) compares a file it was given with the recorded one.
``qCRC`` lets gdb's ``compare-sections`` compare any file with the guest's
memory.

Invariants: every request gets exactly one reply (``qRcmd`` adds console
output before its ``OK``), a failure of the timeline becomes console output
plus an error or a stop reply instead of an exception, and only this folder
knows packet syntax.
"""
from __future__ import annotations

import ipaddress
import select
import socket
import sys
import threading
import time
from typing import Callable, Optional, TextIO

from rrstub.gdbproto import codec as C
from rrstub.gdbproto import hostio, target
from rrstub.replay.timeline import Stop, Timeline, TimelineError
from vmm import paging

PACKET_SIZE = 16384
SIGTRAP, SIGINT = 5, 2
THREAD = "1"
WRITE_REFUSED = ("writes are refused while debugging a recording: the replay must match it. "
                 "Changing registers and memory becomes possible after going live")
HANDSHAKE_TIMEOUT = 10.0    # seconds from connecting to the first complete packet
PACKET_TIMEOUT = 10.0       # seconds a started packet may take to complete
KEEPALIVE = 1.0             # seconds between console lines while a monitor command works
MAX_WAITING = 8             # connections being refused at once; more are closed at once
POINT_KINDS = {0: "break", 1: "break", 2: "write", 3: "read", 4: "access"}

MONITOR_HELP = """\
rrstub monitor commands (type them after `monitor`):
  when                  the current position in the recording
  markers               the recording's markers (a fast recording's: those replay has passed)
                        and the ones named in this session
  marker add NAME       name the current position, to come back to it with goto
  goto MARKER|POSITION  move to a marker (m0, m1, ... or a name) or an instruction number;
                        gdb rereads the state by itself with examples/gdb/rrstub-hooks.gdb
                        sourced, otherwise run `maint flush register-cache`
  info                  the recording, the replay's checkpoints and their memory
  who-wrote ADDR [N]    from the recording's index (rrstub index): the last write to the N
                        bytes (default 1) at ADDR (a number or a kernel symbol) before here
  history ADDR [N]      every write to them, in order; `monitor goto P` reaches a write's
                        position P (before the store runs; P+1 after)
  help                  this text
"""


class Session:
    """One connected gdb: turns its requests into timeline calls and replies."""

    def __init__(self, timeline: Timeline, sock: socket.socket, log: Callable[[str], None], *,
                 others: "Refusals", files: hostio.HostFiles, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 packet_timeout: float = PACKET_TIMEOUT, keepalive: float = KEEPALIVE):
        self.timeline = timeline
        self.sock = sock
        self.log = log
        self.others = others
        self.files = files
        self.handshake_timeout = handshake_timeout
        self.packet_timeout = packet_timeout
        self.keepalive = keepalive
        self.codec = C.Codec(max_packet=PACKET_SIZE)
        self.points: dict[tuple[int, int, int], str] = {}   # (kind, addr, size) inserted
        self.last_stop = C.Stop(SIGTRAP, (), THREAD)
        self.closed = False
        self.spoke = False          # sent at least one complete packet
        self.pending: list = []

    # -- I/O -------------------------------------------------------------------------
    def run(self) -> None:
        started = time.monotonic()
        packet_started: Optional[float] = None
        while not self.closed:
            events, self.pending = self.pending, []
            if not events:
                now = time.monotonic()
                if not self.spoke:
                    deadline: Optional[float] = started + self.handshake_timeout
                elif self.codec.in_packet:
                    packet_started = packet_started or now
                    deadline = packet_started + self.packet_timeout
                else:
                    deadline = packet_started = None
                if deadline is not None and now >= deadline:
                    self.log("closed a connection that " + ("sent no packet" if not self.spoke else
                             "stopped in the middle of a packet") +
                             f" for {now - (packet_started or started):.0f} s")
                    return
                data = self._wait(None if deadline is None else deadline - now)
                if data is None:
                    continue
                if not data:
                    return
                events = self.codec.feed(data)
                self._flush()   # acks and naks now, before a long continue
            while events and not self.closed:
                e = events.pop(0)
                # What came after it waits in ``pending``, where a run looks for a
                # Ctrl-C that arrived with (or right behind) its own packet.
                self.pending = events
                if isinstance(e, C.Packet):
                    self.spoke = True
                    self.handle(e.request)
                # A Ctrl-C while nothing runs: gdb also waits for a stop reply.
                elif isinstance(e, C.Interrupt):
                    self.reply(C.Stop(SIGINT, (), THREAD))
                self._flush()
                events, self.pending = self.pending, []

    def _wait(self, timeout: Optional[float]) -> Optional[bytes]:
        """Bytes from gdb, b"" when it has gone, None when ``timeout`` passed first; serves the
        connections waiting to be refused meanwhile."""
        while True:
            ready, _, _ = select.select([self.sock, *self.others.sockets()], [], [],
                                        self.others.wait_at_most(timeout))
            self.others.serve([r for r in ready if r is not self.sock])
            if self.sock in ready:
                return self._recv(None)
            if timeout is not None:
                return None

    def _serve_others(self) -> None:
        """Answer waiting connections while a long request runs (they must not time out)."""
        ready, _, _ = select.select(self.others.sockets(), [], [], 0)
        self.others.serve(ready)

    def _recv(self, timeout: Optional[float]) -> bytes:
        try:
            if timeout is not None:
                ready, _, _ = select.select([self.sock], [], [], timeout)
                if not ready:
                    return b"\0"    # nothing yet (a NUL is ignored between packets)
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.closed = True
        return data

    def _flush(self) -> None:
        out = self.codec.data_to_send()
        if out and not self.closed:
            try:
                self.sock.sendall(out)
            except OSError:
                self.closed = True

    def reply(self, r) -> None:
        self.codec.send(r)

    def _interrupted(self) -> bool:
        """Polled while the timeline runs: Ctrl-C or a closed connection stops it."""
        early = next((e for e in self.pending if isinstance(e, C.Interrupt)), None)
        if early is not None:
            self.pending.remove(early)
            return True
        self._serve_others()
        data = self._recv(0)
        if self.closed:
            return True
        if data == b"\0":
            return False
        stop = False
        for e in self.codec.feed(data):
            if isinstance(e, C.Interrupt):
                stop = True
            else:
                self.pending.append(e)   # all-stop gdb sends nothing else while we run
        self._flush()
        return stop

    # -- requests ----------------------------------------------------------------------
    def handle(self, req) -> None:
        t = self.timeline
        try:
            if isinstance(req, C.QuerySupported):
                self.reply(C.supported_reply(PACKET_SIZE, reverse=True, exec_file=True))
            elif isinstance(req, C.StartNoAck):
                self.reply(C.Ok())
                self._flush()
                self.codec.start_no_ack()
            elif isinstance(req, C.MustReplyEmpty):
                self.reply(C.Empty())
            elif isinstance(req, C.XferRead):
                self._xfer(req)
            elif isinstance(req, C.StopReason):
                self.reply(self.last_stop)
            elif isinstance(req, C.ReadRegisters):
                self.reply(C.HexData(target.encode_registers(t.registers())))
            elif isinstance(req, C.ReadRegister):
                if not 0 <= req.number < len(target.REGISTERS):
                    self.reply(C.Error(0x16, f"no register {req.number}"))
                else:
                    self.reply(C.HexData(target.encode_register(req.number, t.registers())))
            elif isinstance(req, (C.WriteRegisters, C.WriteRegister, C.WriteMemory)):
                self.log(f"refused a {type(req).__name__}: {WRITE_REFUSED}")
                self.reply(_error_text(WRITE_REFUSED))
            elif isinstance(req, C.ReadMemory):
                self._read_memory(req)
            elif isinstance(req, (C.Continue, C.Step, C.VCont, C.ReverseStep, C.ReverseContinue)):
                self._resume(req)
            elif isinstance(req, C.VContQuery):
                self.reply(C.Raw(b"vCont;c;C;s;S"))
            elif isinstance(req, (C.InsertPoint, C.RemovePoint)):
                self._point(req)
            elif isinstance(req, C.Monitor):
                self._monitor(req.command)
            elif isinstance(req, (C.HostOpen, C.HostPread, C.HostClose, C.HostFstat, C.HostSetFs,
                                  C.HostOther)):
                self.reply(self.files.handle(req))
            elif isinstance(req, C.Checksum):
                self._checksum(req)
            elif isinstance(req, (C.SetThread, C.ThreadAlive)):
                self.reply(C.Ok())
            elif isinstance(req, C.Detach):
                self.reply(C.Ok())
                self._flush()
                self.closed = True
            elif isinstance(req, C.Kill):
                # gdb does not wait for an answer; the recording stays where it is for the next client
                self.closed = True
            elif isinstance(req, C.Query):
                self._query(req)
            elif isinstance(req, C.Malformed):
                self.log(f"malformed packet: {req.reason}")
                self.reply(C.Error(0x01, req.reason))
            else:
                self.reply(C.Empty())
        except TimelineError as e:
            self.log(str(e))
            self.reply(_error_text(str(e)))

    def _query(self, req: C.Query) -> None:
        answers = {"qAttached": b"1", "qfThreadInfo": b"m" + THREAD.encode(), "qsThreadInfo": b"l",
                   "qC": b"QC" + THREAD.encode(), "qSymbol": b"OK"}
        answer = answers.get(req.name)
        self.reply(C.Raw(answer) if answer is not None else C.Empty())

    def _xfer(self, req: C.XferRead) -> None:
        if req.object == "exec-file":
            self.reply(self.files.exec_file(req.offset, req.length, PACKET_SIZE // 2))
            return
        if req.object != "features" or req.annex != "target.xml":
            self.reply(C.Empty() if req.object != "features" else C.Error(0x00, "no such annex"))
            return
        data = target.TARGET_XML.encode()
        chunk = data[req.offset:req.offset + min(req.length, PACKET_SIZE // 2)]
        self.reply(C.XferChunk(chunk, req.offset + len(chunk) < len(data)))

    def _checksum(self, req: C.Checksum) -> None:
        """``compare-sections``: the CRC of guest memory at virtual addresses, page by page."""
        crc = 0xFFFFFFFF
        addr, end = req.addr, req.addr + req.length
        try:
            while addr < end:
                n = min(end - addr, 4096 - (addr & 0xFFF))
                crc = C.gdb_crc32(self.timeline.read_memory(addr, n), crc)
                addr += n
        except paging.PageFault:
            self.reply(C.Error(0x0E, f"{addr:#x} is not mapped"))
            return
        self.reply(C.Crc(crc))

    def _read_memory(self, req: C.ReadMemory) -> None:
        length = min(req.length, PACKET_SIZE // 2 - 16)
        out = b""
        addr = req.addr
        try:
            while len(out) < length:   # page by page: an unmapped page ends the read
                n = min(length - len(out), 4096 - (addr & 0xFFF))
                out += self.timeline.read_memory(addr, n)
                addr += n
        except paging.PageFault:
            pass
        self.reply(C.HexData(out) if out or length == 0 else C.Error(0x0E, f"{req.addr:#x} is not mapped"))

    def _point(self, req) -> None:
        t = self.timeline
        kind = POINT_KINDS.get(req.kind)
        key = (req.kind, req.addr, req.size)
        if kind is None:
            self.reply(C.Empty())
            return
        if isinstance(req, C.InsertPoint):
            if kind == "break":
                t.add_breakpoint(req.addr)
            else:
                t.add_watch(kind, req.addr, req.size)
            self.points[key] = kind
        else:
            if key in self.points:
                del self.points[key]
                if kind == "break":
                    if not any(k[1] == req.addr and v == "break" for k, v in self.points.items()):
                        t.remove_breakpoint(req.addr)
                else:
                    t.remove_watch(kind, req.addr, req.size)
        self.reply(C.Ok())

    def _resume(self, req) -> None:
        t = self.timeline
        try:
            if isinstance(req, C.VCont):
                action = req.actions[0][0][:1] if req.actions else "c"
                req = C.Step() if action == "s" else C.Continue()
            if isinstance(req, C.Step):
                stop = t.step()
            elif isinstance(req, C.Continue):
                stop = t.cont(self._interrupted)
            elif isinstance(req, C.ReverseStep):
                stop = t.reverse_step()
            else:
                stop = t.reverse_cont(self._interrupted)
        except TimelineError as e:
            self.log(str(e))
            self.reply(C.ConsoleOutput(f"rrstub: {e}\n"))
            stop = Stop("interrupted", t.position)
        if stop.detail:
            self.log(stop.detail)
        self.last_stop = self._stop_reply(stop)
        if not self.closed:
            self.reply(self.last_stop)

    def _stop_reply(self, stop: Stop) -> C.Stop:
        if stop.kind == "break":
            kinds = {k[0] for k in self.points if k[1] == stop.address and self.points[k] == "break"}
            reason = "hwbreak" if kinds == {1} else "swbreak"
            return C.Stop(SIGTRAP, ((reason, ""),), THREAD)
        if stop.kind == "watch":
            return C.Stop(SIGTRAP, ((stop.watch_kind, f"{stop.address:x}"),), THREAD)
        if stop.kind in ("begin", "end"):
            return C.Stop(SIGTRAP, (("replaylog", stop.kind),), THREAD)
        if stop.kind == "interrupted":
            return C.Stop(SIGINT, (), THREAD)
        return C.Stop(SIGTRAP, (), THREAD)

    # -- monitor -----------------------------------------------------------------------
    def _monitor(self, command: str) -> None:
        words = command.split()
        done = threading.Event()

        def keep_gdb_waiting() -> None:
            # The main thread is inside the timeline; it touches neither the codec nor the
            # socket until this thread has ended.
            while not done.wait(self.keepalive):
                self.reply(C.ConsoleOutput(f"rrstub: still working on `monitor {command}` "
                                           f"(at instruction {self.timeline.position})\n"))
                self._flush()
                self._serve_others()

        helper = threading.Thread(target=keep_gdb_waiting, name="rrstub-keepalive", daemon=True)
        helper.start()
        try:
            text = self._monitor_text(words)
        except TimelineError as e:
            text = f"error: {e}\n"
        finally:
            done.set()
            helper.join()
        for i in range(0, len(text), 1000):
            self.reply(C.ConsoleOutput(text[i:i + 1000]))
        self.reply(C.Ok())

    def _monitor_text(self, words: list[str]) -> str:
        t = self.timeline
        if not words or words[0] == "help":
            return MONITOR_HELP
        if words == ["when"]:
            return f"instruction {t.position} of {t.last_words()}, guest time {t.engine.guest_now() / 1e9:.6f} s{t.log_words()}\n"
        if words == ["markers"]:
            lines = []
            for cp in t.markers():
                names = ([f"m{cp.recorded}"] if cp.recorded is not None else []) + cp.names
                lines.append(f"  {', '.join(names):<24} instruction {cp.position}"
                             f"{' (recorded)' if cp.recorded is not None else ''}\n")
            return "".join(lines) or "no markers\n"
        if words[:2] == ["marker", "add"]:
            return self._marker_add(words[2:])
        if len(words) == 2 and words[0] == "goto":
            position = _position_word(words[1])
            if position is None:
                cp = t.named(words[1])
                position = cp.position if cp is not None else self._recorded_position(words[1])
            t.goto(position)
            self.last_stop = C.Stop(SIGTRAP, (), THREAD)
            return (f"at instruction {t.position}; gdb rereads the state by itself with "
                    "examples/gdb/rrstub-hooks.gdb sourced, otherwise run `maint flush register-cache`\n")
        if words == ["info"]:
            rec = t.rec
            end = t.source.end
            return (f"recording {rec.path}\n  kernel {rec.kernel_name}, mode {t.mode}, "
                    f"{len(rec.markers)} recorded markers\n"
                    f"  ends at instruction {t.last_words()}"
                    f"{f' ({end.reason}, status {end.status})' if end is not None else ' (incomplete)'}\n"
                    f"  now at instruction {t.position}{t.log_words()}\n"
                    f"  {len(t.checkpoints)} checkpoints in memory, {t.pages.stored_bytes >> 10} KiB of pages\n")
        if words[0] in ("who-wrote", "history"):
            return self._indexed(words)
        raise TimelineError(f"unknown monitor command {' '.join(words)!r}; `monitor help` lists them")

    def _indexed(self, words: list[str]) -> str:
        """``monitor who-wrote`` and ``monitor history``, answered from the recording's index."""
        from rrstub.index.query import QueryError, value_words
        t = self.timeline
        if t.index is None:
            raise TimelineError(f"{t.rec.path} has no usable index: build it with `rrstub index "
                                f"{t.rec.path}` and start `rrstub serve` again")
        if len(words) not in (2, 3) or (len(words) == 3 and _position_word(words[2]) is None):
            raise TimelineError(f"usage: monitor {words[0]} ADDR|SYMBOL [BYTES]")
        size = _position_word(words[2]) if len(words) == 3 else 1
        try:
            address = t.index.address(words[1])
        except QueryError as e:
            raise TimelineError(str(e)) from None
        what = f"{words[1]} ({address:#x})"
        if words[0] == "who-wrote":
            w = t.index.who_wrote(address, size, t.position)
            if w is None:
                return f"{what} was not written before instruction {t.position}\n"
            return (f"{what} was last written before instruction {t.position} at {w.pos} by {w.where}: "
                    f"{value_words(w.old)} -> {value_words(w.new)} ({w.size} bytes at {w.vaddr:#x}); "
                    f"`monitor goto {w.pos}` is just before that store\n")
        found = t.index.history(address, size)
        lines = [f"{what}: {len(found)} writes\n"]
        lines += [f"  {w.pos:>12}  {w.where:<28} {value_words(w.old)} -> {value_words(w.new)}\n"
                  for w in found]
        return "".join(lines)


    def _recorded_position(self, name: str) -> int:
        """A marker or label of the recording file by name (mN, a marker's name, a label)."""
        from rrstub.session import resolve_position
        try:
            target = resolve_position(self.timeline.rec, name, "goto")
        except ValueError:
            raise TimelineError(f"no marker named {name!r}: `monitor markers` lists them") from None
        return self.timeline.resolve(target)   # a fast recording's marker: replay finds it

    def _marker_add(self, names: list[str]) -> str:
        """Name the current position in this session and, as a label, in the recording file."""
        from rrstub.edit import EditError, add_label, check_label_name, recording_id
        from rrstub.recording import RecordingError
        t = self.timeline
        name = " ".join(names)      # so that a name with spaces is refused with the rule
        try:
            check_label_name(t.rec, name)
        except EditError as e:
            raise TimelineError(str(e)) from None
        cp = t.add_marker(name)
        try:
            add_label(t.rec.path, name, cp.position, expect_id=recording_id(t.rec))
            kept = f"saved in {t.rec.path} (`rrstub info` lists it; --until/--go-live take it)"
        except (EditError, RecordingError, OSError) as e:
            kept = f"kept for this session only: {e}"
        return f"marker {name} at instruction {cp.position}: {kept}\n"


def _position_word(word: str) -> Optional[int]:
    try:
        return int(word, 0)
    except ValueError:
        return None


def _error_text(message: str) -> C.Raw:
    """``E.text``: gdb shows it for register writes; other errors read as a plain failure."""
    clean = "".join(ch for ch in message if ch not in "$#}*" and 32 <= ord(ch) < 127)
    return C.Raw(b"E." + clean[:400].encode())


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``[HOST:]PORT`` as given to --gdb; ValueError with a message otherwise."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{text!r} is not [HOST:]PORT (for example 1234 or 127.0.0.1:1234)") from None
    check_port(number)
    return host.strip("[]") or default_host, number


def check_port(port: int) -> None:
    """ValueError unless ``port`` is a TCP port number (0: the system picks a free one)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0..65535 (0 picks a free port)")


def _addresses(host: str) -> list:
    """The IP addresses ``host`` stands for; ValueError with a message when there are none."""
    if not host.strip():
        raise ValueError("the host is empty, which would listen on every interface: give an address "
                         "(127.0.0.1, the default; ::1; or 0.0.0.0 for every interface)")
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise ValueError(f"cannot listen on {host!r}: {e.strerror}") from None
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in found]


def exposure_warning(host: str, port: int) -> Optional[str]:
    """Why listening on ``host`` is risky (None for loopback); ValueError for an unusable host."""
    addresses = _addresses(host)
    if all(a.is_loopback for a in addresses):
        return None
    where = "every interface" if any(a.is_unspecified for a in addresses) else host
    return (f"listening on {where}: anyone who can reach this machine on port {port} can connect "
            "and read the recorded guest's memory and registers. To debug from another machine "
            "keep the default (127.0.0.1) and forward the port (ssh -L).")


def connect_hint(host: str, port: int) -> str:
    """What to type in gdb to reach a server listening on ``host``."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"target remote {host}:{port}"
    if address.is_unspecified:
        local = "[::1]" if address.version == 6 else "127.0.0.1"
        return f"target remote {local}:{port} here, or target remote {socket.gethostname()}:{port} elsewhere"
    return f"target remote [{address}]:{port}" if address.version == 6 else f"target remote {address}:{port}"


class Refusals:
    """Connections that arrive while a gdb is attached.

    Each packet such a connection sends is answered with an error saying
    why (gdb shows the first as a warning and gives up at the second); it is
    closed when the client closes it or after ``timeout`` seconds.
    """

    def __init__(self, listener: socket.socket, log: Callable[[str], None], timeout: float):
        self.listener = listener
        self.log = log
        self.timeout = timeout
        self.attached = ""
        self.waiting: dict[socket.socket, tuple[C.Codec, float]] = {}

    def sockets(self) -> list[socket.socket]:
        return [self.listener, *self.waiting]

    def wait_at_most(self, timeout: Optional[float]) -> Optional[float]:
        """``timeout``, shortened to the nearest deadline of a waiting connection."""
        if not self.waiting:
            return timeout
        nearest = max(0.0, min(d for _, d in self.waiting.values()) - time.monotonic())
        return nearest if timeout is None else min(timeout, nearest)

    def serve(self, ready: list) -> None:
        for sock in ready:
            if sock is self.listener:
                conn, peer = self.listener.accept()
                self.log(f"refusing gdb from {_peer(peer)}: {self.attached} is attached")
                if len(self.waiting) >= MAX_WAITING:
                    conn.close()
                    continue
                conn.settimeout(1.0)    # a client that does not read cannot stall the server
                self.waiting[conn] = (C.Codec(max_packet=PACKET_SIZE), time.monotonic() + self.timeout)
            else:
                self._answer(sock)
        now = time.monotonic()
        for sock in [s for s, (_, deadline) in self.waiting.items() if deadline <= now]:
            self._close(sock)

    def _answer(self, sock: socket.socket) -> None:
        codec, _ = self.waiting[sock]
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._close(sock)
            return
        for e in codec.feed(data):
            if isinstance(e, C.Packet):
                codec.send(_error_text(f"rrstub serves one gdb at a time and {self.attached} is "
                                       "attached: detach or quit that gdb, then connect again"))
        try:
            sock.sendall(codec.data_to_send())
        except OSError:
            self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        del self.waiting[sock]
        sock.close()

    def close_all(self) -> None:
        for sock in list(self.waiting):
            self._close(sock)


def _peer(peer) -> str:
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(timeline: Timeline, host: str, port: int, *, log: Callable[[str], None] = lambda m: None,
          ready: Callable[[int], None] = lambda port: None, clients: Optional[int] = None,
          handshake_timeout: float = HANDSHAKE_TIMEOUT, packet_timeout: float = PACKET_TIMEOUT,
          keepalive: float = KEEPALIVE) -> None:
    """Serve gdb clients one after another (``clients``: stop after that many sessions that
    spoke the protocol; None: until Ctrl-C)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}; pick another port with --port "
                      "(or --gdb HOST:PORT)") from None
    # A Linux kernel is served as an ELF of its symbols (kallsyms, when the
    # file has no symbol table), so `break start_kernel` works without a debug package.
    booted = getattr(getattr(timeline, "machine", None), "boot", None)
    symbols = booted.symbol_file() if booted is not None and booted.linux else None
    kernel = symbols if symbols is not None else timeline.rec.kernel_bytes()
    path = hostio.exec_path(timeline.rec.path,
                            timeline.rec.kernel_name + (".symbols.elf" if symbols is not None else ""))
    with listener:
        bound = listener.getsockname()[1]
        ready(bound)
        others = Refusals(listener, log, handshake_timeout)
        served = 0
        try:
            while clients is None or served < clients:
                sock, peer = listener.accept()
                log(f"gdb connected from {_peer(peer)}")
                others.attached = f"the gdb from {_peer(peer)}"
                with sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    session = Session(timeline, sock, log, others=others,
                                      files=hostio.HostFiles(path, kernel, PACKET_SIZE // 2 - 64),
                                      handshake_timeout=handshake_timeout, packet_timeout=packet_timeout,
                                      keepalive=keepalive)
                    session.run()
                if session.spoke:
                    served += 1
                    log(f"gdb disconnected; the recording stays at instruction {timeline.position}")
                others.close_all()
        finally:
            others.close_all()


def stderr_log(stream: TextIO = sys.stderr) -> Callable[[str], None]:
    def log(message: str) -> None:
        print(f"rrstub: {message}", file=stream, flush=True)
    return log
