"""The GDB server: a TCP socket, the codec, and a session that maps requests to the timeline.

One gdb at a time.  ``serve`` accepts a client, runs a ``Session`` until the
client detaches, kills or disconnects, and then waits for the next one; the
timeline keeps its position, its checkpoints and its markers across
clients.  A client that connects while another is attached waits (in the
listen backlog) until that one has left.

While the timeline runs forward or backward for a ``c``, ``bc`` or ``vCont``,
the session looks at the socket every few thousand instructions: a Ctrl-C
(0x03) from gdb stops the run with SIGINT, and a closed connection ends it.

Invariants: every request gets exactly one reply (``qRcmd`` adds console
output before its ``OK``), a failure of the timeline becomes console output
plus an error or a stop reply instead of an exception, and only this folder
knows packet syntax.
"""
from __future__ import annotations

import select
import socket
import sys
from typing import Callable, Optional, TextIO

from rrstub.gdbproto import codec as C
from rrstub.gdbproto import target
from rrstub.replay.timeline import Stop, Timeline, TimelineError
from vmm import paging

PACKET_SIZE = 16384
SIGTRAP, SIGINT = 5, 2
THREAD = "1"
WRITE_REFUSED = ("writes are refused while debugging a recording: the replay must match it. "
                 "Changing registers and memory becomes possible after going live")
POINT_KINDS = {0: "break", 1: "break", 2: "write", 3: "read", 4: "access"}

MONITOR_HELP = """\
rrstub monitor commands (type them after `monitor`):
  when                  the current position in the recording
  markers               the recording's markers and the ones named in this session
  marker add NAME       name the current position, to come back to it with goto
  goto MARKER|POSITION  move to a marker (m0, m1, ... or a name) or an instruction number;
                        then run `maint flush register-cache` (or `flushregs`) so gdb rereads the state
  info                  the recording, the replay's checkpoints and their memory
  help                  this text
"""


class Session:
    """One connected gdb: turns its requests into timeline calls and replies."""

    def __init__(self, timeline: Timeline, sock: socket.socket, log: Callable[[str], None]):
        self.timeline = timeline
        self.sock = sock
        self.log = log
        self.codec = C.Codec(max_packet=PACKET_SIZE)
        self.points: dict[tuple[int, int, int], str] = {}   # (kind, addr, size) inserted
        self.last_stop = C.Stop(SIGTRAP, (), THREAD)
        self.closed = False
        self.pending: list = []

    # -- I/O -------------------------------------------------------------------------
    def run(self) -> None:
        while not self.closed:
            events, self.pending = self.pending, []
            if not events:
                data = self._recv(None)
                if not data:
                    return
                events = self.codec.feed(data)
                self._flush()   # acks and naks now, before a long continue
            for e in events:
                if self.closed:
                    break
                if isinstance(e, C.Packet):
                    self.handle(e.request)
                # A Ctrl-C while nothing runs: gdb also waits for a stop reply.
                elif isinstance(e, C.Interrupt):
                    self.reply(C.Stop(SIGINT, (), THREAD))
                self._flush()

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
                self.reply(C.supported_reply(PACKET_SIZE, reverse=True))
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
        if req.object != "features" or req.annex != "target.xml":
            self.reply(C.Empty() if req.object != "features" else C.Error(0x00, "no such annex"))
            return
        data = target.TARGET_XML.encode()
        chunk = data[req.offset:req.offset + min(req.length, PACKET_SIZE // 2)]
        self.reply(C.XferChunk(chunk, req.offset + len(chunk) < len(data)))

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
        try:
            text = self._monitor_text(words)
        except TimelineError as e:
            text = f"error: {e}\n"
        for i in range(0, len(text), 1000):
            self.reply(C.ConsoleOutput(text[i:i + 1000]))
        self.reply(C.Ok())

    def _monitor_text(self, words: list[str]) -> str:
        t = self.timeline
        if not words or words[0] == "help":
            return MONITOR_HELP
        if words == ["when"]:
            return f"instruction {t.position} of {t.last}, guest time {t.engine.guest_now() / 1e9:.6f} s\n"
        if words == ["markers"]:
            lines = []
            for cp in t.markers():
                names = ([f"m{cp.recorded}"] if cp.recorded is not None else []) + cp.names
                lines.append(f"  {', '.join(names):<24} instruction {cp.position}"
                             f"{' (recorded)' if cp.recorded is not None else ''}\n")
            return "".join(lines) or "no markers\n"
        if len(words) == 3 and words[:2] == ["marker", "add"]:
            if _position_word(words[2]) is not None:
                raise TimelineError(f"marker name {words[2]!r} looks like a position; use a name with a letter")
            cp = t.add_marker(words[2])
            from rrstub.edit import EditError, add_label
            from rrstub.recording import RecordingError
            try:
                add_label(t.rec.path, words[2], cp.position)
                kept = f"saved in {t.rec.path} (`rrstub info` lists it; --until/--go-live take it)"
            except (EditError, RecordingError, OSError) as e:
                kept = f"kept for this session only: {e}"
            return f"marker {words[2]} at instruction {cp.position}: {kept}\n"
        if len(words) == 2 and words[0] == "goto":
            position = _position_word(words[1])
            if position is None:
                cp = t.named(words[1])
                label = next((x for x in t.rec.labels if x["name"] == words[1]), None)
                if cp is None and label is None:
                    raise TimelineError(f"no marker named {words[1]!r}: `monitor markers` lists them")
                position = cp.position if cp is not None else label["position"]
            t.goto(position)
            self.last_stop = C.Stop(SIGTRAP, (), THREAD)
            return (f"at instruction {t.position}; run `maint flush register-cache` (or `flushregs`) "
                    "so gdb shows the new state\n")
        if words == ["info"]:
            rec = t.rec
            end = t.source.end
            return (f"recording {rec.path}\n  kernel {rec.kernel_name}, mode exact, "
                    f"{len(rec.markers)} recorded markers\n"
                    f"  ends at instruction {t.last}"
                    f"{f' ({end.reason}, status {end.status})' if end is not None else ' (incomplete)'}\n"
                    f"  now at instruction {t.position}\n"
                    f"  {len(t.checkpoints)} checkpoints in memory, {t.pages.stored_bytes >> 10} KiB of pages\n")
        raise TimelineError(f"unknown monitor command {' '.join(words)!r}; `monitor help` lists them")


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
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is outside 0..65535")
    return host or default_host, number


def serve(timeline: Timeline, host: str, port: int, *, log: Callable[[str], None] = lambda m: None,
          ready: Callable[[int], None] = lambda port: None, clients: Optional[int] = None) -> None:
    """Serve gdb clients one after another (``clients``: stop after that many; None: until Ctrl-C)."""
    try:
        listener = socket.create_server((host, port), reuse_port=False)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}; pick another port with --port "
                      "(or --gdb HOST:PORT)") from None
    with listener:
        bound = listener.getsockname()[1]
        ready(bound)
        served = 0
        while clients is None or served < clients:
            sock, peer = listener.accept()
            served += 1
            log(f"gdb connected from {peer[0]}:{peer[1]}")
            with sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                Session(timeline, sock, log).run()
            log(f"gdb disconnected; the recording stays at instruction {timeline.position}")


def stderr_log(stream: TextIO = sys.stderr) -> Callable[[str], None]:
    def log(message: str) -> None:
        print(f"rrstub: {message}", file=stream, flush=True)
    return log
