"""The gdb server as a service, over real sockets with a stand-in timeline (no gdb, no KVM).

Timeouts are passed small so that the tests are fast; none of them depends
on how fast the host replays.
"""
from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from rrstub.gdbproto import server

KERNEL = b"\x7fELF" + bytes(4000)


class Rec:
    path = "/tmp/nowhere/race.rrr"
    kernel_name = "race.elf"
    markers: list = []
    labels: list = []

    def kernel_bytes(self) -> bytes:
        return KERNEL


class FakeTimeline:
    """What the session asks of a timeline; ``goto`` takes ``goto_seconds``."""

    def __init__(self, goto_seconds: float = 0.0):
        self.rec = Rec()
        self.position = 0
        self.first, self.last = 0, 1000
        self.goto_seconds = goto_seconds

    def goto(self, position: int) -> None:
        if not self.first <= position <= self.last:
            raise server.TimelineError(f"instruction {position} is outside the recording "
                                       f"({self.first}..{self.last})")
        time.sleep(self.goto_seconds)
        self.position = position

    def named(self, name: str):
        return None


def packet(payload: bytes) -> bytes:
    return b"$" + payload + b"#%02x" % (sum(payload) & 0xFF)


class Client:
    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.sock = socket.create_connection((host, port), timeout=5)
        self.buf = b""

    def frame(self) -> bytes:
        while True:
            self.buf = self.buf.lstrip(b"+")
            m = re.match(rb"\$([^#]*)#[0-9a-f]{2}", self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m.group(1)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data

    def request(self, payload: bytes) -> bytes:
        self.sock.sendall(packet(payload))
        return self.frame()

    def closed_within(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except socket.timeout:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serving():
    """``serving(timeline, clients)``: a server thread; its port; the log lines."""
    threads = []

    def start(timeline=None, clients=None, **kw):
        port: list = []
        lines: list = []
        ready = threading.Event()
        t = threading.Thread(target=server.serve, daemon=True,
                             args=(timeline or FakeTimeline(), kw.get("host", "127.0.0.1"), 0),
                             kwargs=dict(log=lines.append, ready=lambda p: (port.append(p), ready.set()),
                                         clients=clients, handshake_timeout=kw.get("handshake", 0.5),
                                         packet_timeout=kw.get("packet", 0.5), keepalive=kw.get("keepalive", 1.0)))
        t.start()
        assert ready.wait(5)
        threads.append(t)
        return port[0], lines, t

    yield start


def test_a_second_client_is_told_why_and_the_first_keeps_working(serving):
    port, lines, _ = serving()
    first = Client(port)
    assert b"PacketSize" in first.request(b"qSupported")
    second = Client(port)
    reply = second.request(b"qSupported")
    assert reply.startswith(b"E.") and b"one gdb at a time" in reply and b"127.0.0.1:" in reply, reply
    assert second.request(b"vMustReplyEmpty").startswith(b"E."), "every packet gets the reason"
    second.close()
    assert first.request(b"?").startswith(b"T05")
    assert any("refusing gdb from 127.0.0.1" in line for line in lines), lines


def test_a_silent_client_is_dropped_and_does_not_count(serving):
    port, lines, thread = serving(clients=1)
    silent = Client(port)
    assert silent.closed_within(3), "a connection that never sends a packet must be closed"
    assert any("sent no packet" in line for line in lines), lines
    gdb = Client(port)
    assert b"PacketSize" in gdb.request(b"qSupported")
    gdb.close()
    thread.join(5)
    assert not thread.is_alive(), "--clients 1 ends after the one session that spoke"


def test_half_a_packet_is_dropped_and_the_next_client_is_served(serving):
    port, lines, _ = serving()
    half = Client(port)
    assert b"PacketSize" in half.request(b"qSupported")
    half.sock.sendall(b"$m10,")
    assert half.closed_within(3)
    assert any("middle of a packet" in line for line in lines), lines
    assert b"PacketSize" in Client(port).request(b"qSupported")


def test_an_attached_gdb_that_waits_at_its_prompt_is_kept(serving):
    port, _, _ = serving(handshake=0.2, packet=0.2)
    gdb = Client(port)
    gdb.request(b"qSupported")
    assert not gdb.closed_within(0.8)
    assert gdb.request(b"?").startswith(b"T05")


def test_a_long_monitor_command_keeps_gdb_informed(serving):
    port, _, _ = serving(FakeTimeline(goto_seconds=1.2), keepalive=0.2)
    gdb = Client(port)
    gdb.request(b"qSupported")
    gdb.sock.sendall(packet(b"qRcmd," + b"goto 500".hex().encode()))
    arrivals, texts = [time.monotonic()], []
    while True:
        reply = gdb.frame()
        arrivals.append(time.monotonic())
        if reply == b"OK":
            break
        texts.append(bytes.fromhex(reply[1:].decode()).decode())
    assert any("still working on `monitor goto 500`" in t for t in texts), texts
    assert "at instruction 500" in texts[-1]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert max(gaps) < 0.7, gaps        # gdb's remotetimeout restarts at every packet


def test_goto_outside_the_recording_names_the_range(serving):
    port, _, _ = serving()
    gdb = Client(port)
    gdb.request(b"qSupported")
    gdb.sock.sendall(packet(b"qRcmd," + b"goto 5000".hex().encode()))
    text = bytes.fromhex(gdb.frame()[1:].decode()).decode()
    assert "outside the recording (0..1000)" in text, text
    assert gdb.frame() == b"OK"


@pytest.mark.parametrize("name", ["m3", "M0", "start", "end", "two words", "", "3rd", "a/b"])
def test_label_names_that_shadow_or_cannot_be_typed_are_refused(serving, name):
    port, _, _ = serving()
    gdb = Client(port)
    gdb.request(b"qSupported")
    gdb.sock.sendall(packet(b"qRcmd," + f"marker add {name}".encode().hex().encode()))
    text = bytes.fromhex(gdb.frame()[1:].decode()).decode()
    assert text.startswith("error:") and "a label name starts with a letter" in text, text


def test_the_exec_file_is_the_recorded_kernel(serving):
    port, _, _ = serving()
    gdb = Client(port)
    assert b"qXfer:exec-file:read+" in gdb.request(b"qSupported")
    assert gdb.request(b"qXfer:exec-file:read::0,fff") == b"l/rrstub/race.rrr/race.elf"
    fd = gdb.request(b"vFile:open:" + b"/rrstub/race.rrr/race.elf".hex().encode() + b",0,0")
    assert fd == b"F3"
    data = gdb.request(b"vFile:pread:3,20,0")
    assert data == b"F20;" + KERNEL[:0x20]
    assert gdb.request(b"vFile:open:" + b"/etc/passwd".hex().encode() + b",0,0") == b"F-1,2"


@pytest.mark.parametrize("host, warns", [("127.0.0.1", False), ("::1", False), ("localhost", False),
                                         ("0.0.0.0", True), ("::", True), ("192.0.2.1", True)])
def test_exposure_warning(host, warns):
    warning = server.exposure_warning(host, 1234)
    assert (warning is not None) == warns
    if warns:
        assert "read the recorded guest's memory" in warning and "1234" in warning


def test_empty_host_and_bad_ports_are_refused():
    with pytest.raises(ValueError, match="every interface"):
        server.exposure_warning("", 1234)
    for port in (-1, 65536):
        with pytest.raises(ValueError, match="0..65535"):
            server.check_port(port)


def test_connect_hints_are_addresses_gdb_can_connect_to():
    assert server.connect_hint("127.0.0.1", 5) == "target remote 127.0.0.1:5"
    assert server.connect_hint("::1", 5) == "target remote [::1]:5"
    assert server.connect_hint("0.0.0.0", 5).startswith("target remote 127.0.0.1:5 here")
    assert "0.0.0.0" not in server.connect_hint("0.0.0.0", 5)


def test_ipv6_loopback_is_served(serving):
    port, _, _ = serving(host="::1")
    gdb = Client(port, host="::1")
    assert b"PacketSize" in gdb.request(b"qSupported")
    gdb.close()
