"""The GDB remote protocol codec and the x86-64 target description (no gdb, no KVM)."""
import random
import struct
import tracemalloc
import xml.etree.ElementTree as ET
from typing import get_args

import pytest

from rrstub.gdbproto import codec as c
from rrstub.gdbproto.target import (
    G_PACKET_SIZE, REGISTER_INDEX, REGISTERS, TARGET_XML, encode_register, encode_registers)


REQUEST_TYPES = get_args(c.Request)


def frame(payload: bytes) -> bytes:
    """A packet as gdb sends it (payload already escaped if it needs to be)."""
    return b"$" + payload + b"#%02x" % (sum(payload) & 0xFF)


def gdb_reads(reply: bytes, binary: bool = False) -> bytes:
    """Decode one reply frame the way GDB 13 does: check the checksum, expand
    run-length '*' on the wire bytes, then (binary replies only) unescape."""
    assert reply[:1] == b"$" and reply[-3:-2] == b"#", reply
    wire = reply[1:-3]
    assert reply[-2:] == b"%02x" % (sum(wire) & 0xFF)
    assert b"$" not in wire and b"#" not in wire
    out = bytearray()
    pos = 0
    while pos < len(wire):
        if wire[pos] == ord("*"):
            count = wire[pos + 1]
            assert 32 <= count <= 126 and chr(count) not in "#$+-", count
            out += out[-1:] * (count - 29)
            pos += 2
        else:
            out.append(wire[pos])
            pos += 1
    if not binary:
        return bytes(out)
    data = bytearray()
    pos = 0
    while pos < len(out):
        if out[pos] == ord("}"):
            data.append(out[pos + 1] ^ 0x20)
            pos += 2
        else:
            data.append(out[pos])
            pos += 1
    return bytes(data)


def one_request(data: bytes, **kwargs) -> c.Request:
    codec = c.Codec(**kwargs)
    events = codec.feed(data)
    assert len(events) == 1 and isinstance(events[0], c.Packet), events
    assert codec.data_to_send() == b"+"
    return events[0].request

# --------------------------------------------------------------------------
# Framing, checksums, acks


def test_good_packet_is_acked_and_parsed_in_any_checksum_case():
    codec = c.Codec()
    assert codec.feed(b"$m1000,4#8e") == [c.Packet(c.ReadMemory(0x1000, 4))]
    assert codec.data_to_send() == b"+"
    assert codec.feed(b"$qXfer:features:read:target.xml:0,ffb#79")[0].request == \
        c.XferRead("features", "target.xml", 0, 0xFFB)
    assert codec.feed(b"$vCont;c:p1.-1#0F") == [c.Packet(c.VCont((("c", "p1.-1"),)))]
    assert codec.data_to_send() == b"++"


def test_bad_or_non_hex_checksum_is_nacked_without_event():
    codec = c.Codec()
    assert codec.feed(b"$g#68") == []
    assert codec.feed(b"$g#zz") == []
    assert codec.data_to_send() == b"--"
    assert codec.feed(b"$g#67") == [c.Packet(c.ReadRegisters())]


def test_packets_split_across_feeds_and_several_per_feed():
    data = frame(b"qC") + frame(b"?") + frame(b"g")
    codec = c.Codec()
    events = []
    for byte in data:
        events += codec.feed(bytes([byte]))
    assert events == [c.Packet(c.Query("qC", "")), c.Packet(c.StopReason()),
                      c.Packet(c.ReadRegisters())]
    assert c.Codec().feed(data) == events


def test_reply_framing_and_checksum():
    codec = c.Codec()
    codec.send(c.Ok())
    codec.send(c.Empty())
    codec.send(c.Error(0x0E, "bad address"))
    assert codec.data_to_send() == b"$OK#9a$#00$E0e#da"
    assert codec.data_to_send() == b""


def test_nak_retransmits_the_last_reply_until_acked():
    codec = c.Codec()
    codec.feed(frame(b"?"))
    codec.send(c.Stop())
    assert codec.data_to_send() == b"+$T05#b9"
    codec.feed(b"-")
    assert codec.data_to_send() == b"$T05#b9"
    codec.feed(b"-")
    assert codec.data_to_send() == b"$T05#b9"
    codec.feed(b"+-")
    assert codec.data_to_send() == b""


def test_a_burst_of_naks_retransmits_once():
    codec = c.Codec()
    codec.send(c.HexData(bytes(4096)))
    frame_ = codec.data_to_send()
    codec.feed(b"-" * 100_000)
    assert codec.data_to_send() == frame_


def test_no_ack_mode_switch_and_behaviour():
    codec = c.Codec()
    assert codec.feed(frame(b"QStartNoAckMode")) == [c.Packet(c.StartNoAck())]
    codec.send(c.Ok())
    codec.start_no_ack()
    assert codec.data_to_send() == b"+$OK#9a"
    assert not codec.ack_mode
    # gdb's ack of the OK, then a packet with a wrong checksum: not checked any more.
    assert codec.feed(b"+$g#00-") == [c.Packet(c.ReadRegisters())]
    codec.send(c.HexData(b"\x01\xff"))
    codec.feed(b"-")
    assert codec.data_to_send() == b"$01ff#2d"


def test_noise_between_packets_is_ignored_and_dollar_restarts_a_packet():
    codec = c.Codec()
    assert codec.feed(b"junk#12\n" + b"$m0,4" + frame(b"g")) == [c.Packet(c.ReadRegisters())]
    assert codec.data_to_send() == b"+"


def test_interrupt_outside_a_packet_and_data_inside():
    codec = c.Codec()
    assert codec.feed(b"\x03") == [c.Interrupt()]
    events = codec.feed(frame(b"X100,2:\x03\x03") + b"\x03")
    assert events == [c.Packet(c.WriteMemory(0x100, b"\x03\x03")), c.Interrupt()]
    codec.start_no_ack()
    assert codec.feed(b"+\x03") == [c.Interrupt()]

# --------------------------------------------------------------------------
# Escapes and run-length encoding


def test_incoming_escapes_as_gdb_13_sends_them():
    # Captured from gdb 13.1 writing #$}****** 03 00 } with X.
    packet = frame(b"X1000,c:}\x03}\x04}]}\n}\n}\n}\n}\n}\n\x03\x00}]")
    assert one_request(packet) == c.WriteMemory(0x1000, b"#$}******\x03\x00}")


@pytest.mark.parametrize("rle", [False, True])
def test_binary_reply_round_trips_every_byte(rle):
    data = bytes(range(256)) + b"$$$$####}}}}****" + b"#" + b"\x03" * 40 + b"]" * 33
    codec = c.Codec(rle=rle)
    codec.send(c.XferChunk(data, more=True))
    wire = codec.data_to_send()
    assert gdb_reads(wire, binary=True) == b"m" + data
    if not rle:
        assert b"*" not in wire[1:-3].replace(b"}\n", b"")


def test_incoming_run_length_is_expanded_before_unescaping():
    assert one_request(frame(b"G0* ")) == c.WriteRegisters(b"\x00\x00")
    # '*' repeats the wire byte before it, here the second byte of an escape.
    assert one_request(frame(b"X0,5:}\x03*!")) == c.WriteMemory(0, b"#\x03\x03\x03\x03")


@pytest.mark.parametrize("payload", [b"*  ", b"G0*", b"G0*\x1d", b"X0,1:}"])
def test_bad_run_length_or_escape_is_malformed(payload):
    assert isinstance(one_request(frame(payload)), c.Malformed)


@pytest.mark.parametrize("run, expected", [
    (3, b"000"), (4, b"0* "), (7, b'0*"0'), (8, b'0*"00'), (9, b"0*%"),
    (15, b"0**0"), (17, b"0*,0"), (98, b"0*~"), (99, b"0*~0"), (102, b"0*~0* "),
])
def test_run_length_encoding_follows_the_manual(run, expected):
    codec = c.Codec(rle=True)
    codec.send(c.Raw(b"0" * run))
    wire = codec.data_to_send()
    assert wire[1:-3] == expected
    assert gdb_reads(wire) == b"0" * run


def test_run_length_never_uses_forbidden_counts():
    rng = random.Random(7)
    for _ in range(300):
        text = b"".join(bytes([rng.choice(b"0f ")]) * rng.randint(1, 250) for _ in range(5))
        codec = c.Codec(rle=True)
        codec.send(c.Raw(text))
        wire = codec.data_to_send()
        assert gdb_reads(wire) == text            # checks count characters too
        assert len(wire) <= len(text) + 4

# --------------------------------------------------------------------------
# Bounded input


def test_oversized_packet_is_acked_and_answered_malformed():
    codec = c.Codec(max_packet=16)
    events = codec.feed(frame(b"M0,40:" + b"00" * 64))
    assert events == [c.Packet(c.Malformed("packet too long: 134 bytes, the limit is 16"))]
    assert codec.data_to_send() == b"+"
    assert codec.feed(frame(b"g")) == [c.Packet(c.ReadRegisters())]


def test_oversized_packet_with_bad_checksum_is_nacked():
    codec = c.Codec(max_packet=16)
    assert codec.feed(b"$" + b"a" * 100 + b"#00") == []
    assert codec.data_to_send() == b"-"


def test_run_length_cannot_expand_beyond_the_limit():
    request = one_request(frame(b"G0*~0*~"), max_packet=100)
    assert request == c.Malformed("packet too long: 197 bytes, the limit is 100")
    request = one_request(frame(b"G0*~" + b"0" * 10), max_packet=100)
    assert request == c.Malformed("packet too long: 109 bytes, the limit is 100")


def test_unterminated_packet_keeps_memory_bounded():
    codec = c.Codec(max_packet=4096)
    chunk = b"\x03x}*" * 16384                  # 64 KiB, no '$' or '#'
    codec.feed(b"$")
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(160):                    # 10 MiB of payload
            assert codec.feed(chunk) == []
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    events = codec.feed(b"#00")
    limit = "the limit is 4096"
    assert events == [c.Packet(c.Malformed(f"packet too long: {160 * len(chunk)} bytes, {limit}"))]

# --------------------------------------------------------------------------
# Requests

REQUESTS = [
    (b"qSupported:multiprocess+;swbreak+;hwbreak+;qRelocInsn+;fork-events+;vfork-events+;"
     b"exec-events+;vContSupported+;QThreadEvents+;no-resumed+;memory-tagging+;"
     b"xmlRegisters=i386",
     c.QuerySupported(("multiprocess+", "swbreak+", "hwbreak+", "qRelocInsn+", "fork-events+",
                       "vfork-events+", "exec-events+", "vContSupported+", "QThreadEvents+",
                       "no-resumed+", "memory-tagging+", "xmlRegisters=i386"))),
    (b"qSupported", c.QuerySupported(())),
    (b"QStartNoAckMode", c.StartNoAck()),
    (b"vMustReplyEmpty", c.MustReplyEmpty()),
    (b"?", c.StopReason()),
    (b"g", c.ReadRegisters()),
    (b"G0011ff", c.WriteRegisters(b"\x00\x11\xff")),
    (b"p10", c.ReadRegister(16)),
    (b"P3e=0040000000000000", c.WriteRegister(62, b"\x00\x40" + bytes(6))),
    (b"mffffffff81000000,40", c.ReadMemory(0xFFFFFFFF81000000, 0x40)),
    (b"mffffffffffffffff,1", c.ReadMemory(0xFFFFFFFFFFFFFFFF, 1)),
    (b"M7fff0010,4:deadBEEF", c.WriteMemory(0x7FFF0010, b"\xde\xad\xbe\xef")),
    (b"X1000,0:", c.WriteMemory(0x1000, b"")),
    (b"c", c.Continue()),
    (b"cffffffff81000010", c.Continue(0xFFFFFFFF81000010)),
    (b"C05", c.Continue(signal=5)),
    (b"s", c.Step()),
    (b"S0b;1000", c.Step(0x1000, 11)),
    (b"vCont?", c.VContQuery()),
    (b"vCont;s:p1.1;c:p1.-1", c.VCont((("s", "p1.1"), ("c", "p1.-1")))),
    (b"vCont;C05:p1.1;t", c.VCont((("c", "p1.1"), ("t", None)))),
    (b"bs", c.ReverseStep()),
    (b"bc", c.ReverseContinue()),
    (b"Z0,ffffffff81000000,1", c.InsertPoint(0, 0xFFFFFFFF81000000, 1)),
    (b"Z1,ffffffff81000000,1", c.InsertPoint(1, 0xFFFFFFFF81000000, 1)),
    (b"Z2,7fff0010,4", c.InsertPoint(2, 0x7FFF0010, 4)),
    (b"z4,7fff0010,8", c.RemovePoint(4, 0x7FFF0010, 8)),
    (b"Hgp1.1", c.SetThread("g", "p1.1")),
    (b"Hc-1", c.SetThread("c", "-1")),
    (b"Hg0", c.SetThread("g", "0")),
    (b"Tp1.1", c.ThreadAlive("p1.1")),
    (b"k", c.Kill()),
    (b"vKill;1", c.Kill()),
    (b"D", c.Detach()),
    (b"D;1", c.Detach()),
    (b"qXfer:features:read:target.xml:0,ffb", c.XferRead("features", "target.xml", 0, 0xFFB)),
    (b"qXfer:features:read:target.xml:ffb,ffb", c.XferRead("features", "target.xml", 0xFFB, 0xFFB)),
    (b"qRcmd,6d61726b657273", c.Monitor("markers")),
    (b"qAttached:1", c.Query("qAttached", "1")),
    (b"qAttached", c.Query("qAttached", "")),
    (b"qOffsets", c.Query("qOffsets", "")),
    (b"qSymbol::", c.Query("qSymbol", ":")),
    (b"qfThreadInfo", c.Query("qfThreadInfo", "")),
    (b"qsThreadInfo", c.Query("qsThreadInfo", "")),
    (b"qC", c.Query("qC", "")),
    (b"qTStatus", c.Query("qTStatus", "")),
    (b"qThreadExtraInfo,p1.1", c.Query("qThreadExtraInfo", "p1.1")),
    (b"QThreadEvents:1", c.Query("QThreadEvents", "1")),
    (b"qXfer:features:write:x:0:ab", c.Unknown(b"qXfer:features:write:x:0:ab")),
    (b"vFile:setfs:0", c.HostSetFs(0)),
    (b"vFile:open:2f727273747562,0,1a4", c.HostOpen("/rrstub", 0, 0o644)),
    (b"vFile:pread:3,3fff,1000", c.HostPread(3, 0x3FFF, 0x1000)),
    (b"vFile:close:3", c.HostClose(3)),
    (b"vFile:fstat:3", c.HostFstat(3)),
    (b"vFile:unlink:2f78", c.HostOther("unlink")),
    (b"qCRC:100000,1a0", c.Checksum(0x100000, 0x1A0)),
    (b"!", c.Unknown(b"!")),
    (b"", c.Unknown(b"")),
]


@pytest.mark.parametrize("payload, expected", REQUESTS, ids=[p.decode()[:24] for p, _ in REQUESTS])
def test_every_request_type(payload, expected):
    assert c.parse_request(payload) == expected
    assert one_request(frame(payload)) == expected


@pytest.mark.parametrize("payload, reason", [
    (b"m12,zz", "bad length"),
    (b"m12", "addr,length"),
    (b"m-1,4", "bad address"),
    (b"m0x10,4", "bad address"),
    (b"m 10,4", "bad address"),
    (b"m10000000000000000,1", "too large"),
    (b"mffffffffffffffff,2", "beyond 64 bits"),
    (b"M10,4:0011", "length 4 but 2"),
    (b"M10,1:0", "bad hex"),
    (b"X10,3:ab", "length 3 but 2"),
    (b"Z9,1000,1", "breakpoint type"),
    (b"Z0,1000", "kind,addr,size"),
    (b"z0,1000,1,2", "bad size"),
    (b"G123", "bad hex"),
    (b"P10", "register=value"),
    (b"pq", "register number"),
    (b"C100", "signal"),
    (b"cxyz", "bad address"),
    (b"Hx1", "H operation"),
    (b"Hgp1.x", "thread id"),
    (b"T", "thread id"),
    (b"gx", "unexpected arguments"),
    (b"kk", "unexpected arguments"),
    (b"Dx", "detach"),
    (b"vCont;r1000,1010:p1.1", "vCont action"),
    (b"vCont;", "vCont action"),
    (b"vKill;z", "pid"),
    (b"qRcmd,6d6", "bad hex"),
    (b"qRcmd", "without a command"),
    (b"qXfer:features:read:target.xml", "annex"),
    (b"qXfer:features:read:target.xml:0", "offset,length"),
    (b"vFile:open:2f7,0,0", "bad hex path"),
    (b"vFile:pread:3,10", "fd,count,offset"),
    (b"vFile:close:x", "bad fd"),
    (b"vFile:setfs", "without arguments"),
    (b"qCRC:100000", "addr,length"),
])
def test_malformed_arguments(payload, reason):
    request = c.parse_request(payload)
    assert isinstance(request, c.Malformed) and reason in request.reason, request


def test_parse_request_never_raises_on_random_payloads():
    rng = random.Random(1)
    letters = b"gGpPmMXcCsSvZzHTkDqQbx?,:;=-}.0123456789abcdefp"
    for _ in range(5000):
        head = rng.choice([b"", b"vCont;", b"qXfer:", b"qRcmd,", b"qSupported:", b"vKill;",
                           b"vFile:open:", b"vFile:pread:", b"qCRC:"])
        payload = head + bytes(rng.choice(letters) for _ in range(rng.randint(0, 12)))
        assert isinstance(c.parse_request(payload), REQUEST_TYPES)

# --------------------------------------------------------------------------
# Replies


def test_stop_replies():
    assert c.Stop().encode() == b"T05"
    assert c.Stop(info=(("watch", "7fff0010"),)).encode() == b"T05watch:7fff0010;"
    assert c.Stop(info=(("replaylog", "begin"),), thread="p1.1").encode() == \
        b"T05replaylog:begin;thread:p1.1;"
    assert c.Stop(info=(("hwbreak", ""),)).encode() == b"T05hwbreak:;"
    assert c.Stop(2, (("swbreak", ""),), "1").encode() == b"T02swbreak:;thread:1;"
    with pytest.raises(ValueError):
        c.Stop(info=(("watch", "1;2"),))
    with pytest.raises(ValueError):
        c.Stop(256)


def test_other_replies():
    assert c.Error().encode() == b"E01"
    assert c.Error(0x16, "no such register").message == "no such register"
    assert c.Exited(0).encode() == b"W00"
    assert c.Exited(0x2A).encode() == b"W2a"
    assert c.HexData(b"\x00\xab\xff").encode() == b"00abff"
    assert c.XferChunk(b"<x/>", more=False).encode() == b"l<x/>"
    assert c.ConsoleOutput("ok\n").encode() == b"O6f6b0a"
    assert c.Raw(b"QCp1.1").encode() == b"QCp1.1"
    with pytest.raises(ValueError):
        c.Error(300)


def test_supported_reply():
    assert c.supported_reply(0x4000, reverse=False).encode() == (
        b"PacketSize=4000;QStartNoAckMode+;qXfer:features:read+;swbreak+;hwbreak+;"
        b"vContSupported+")
    assert c.supported_reply(16384, reverse=True).encode().endswith(
        b";vContSupported+;ReverseStep+;ReverseContinue+")
    assert b";qXfer:exec-file:read+" in c.supported_reply(16384, reverse=True, exec_file=True).encode()


def test_host_io_replies():
    assert c.HostResult(0).encode() == b"F0"
    assert c.HostResult(0x1F).encode() == b"F1f"
    assert c.HostResult(-1, c.FILEIO_ENOENT).encode() == b"F-1,2"
    assert c.HostResult(3, attachment=b"a$b").encode() == b"F3;a$b"
    stat = c.fileio_stat(0x12345)
    assert len(stat) == 64
    assert stat[8:12] == (0o100444).to_bytes(4, "big")      # st_mode: a regular, read-only file
    assert stat[28:36] == (0x12345).to_bytes(8, "big")      # st_size
    # A binary attachment is escaped when framed and gdb unescapes it.
    codec = c.Codec()
    codec.send(c.HostResult(4, attachment=b"#$}*"))
    assert gdb_reads(codec.data_to_send(), binary=True) == b"F4;#$}*"


def test_crc_is_the_one_gdb_computes():
    # libiberty xcrc32 (gdb's compare-sections): CRC-32/MPEG-2 without the final inversion.
    assert c.gdb_crc32(b"123456789") == 0x0376E6E7
    assert c.gdb_crc32(b"") == 0xFFFFFFFF
    assert c.gdb_crc32(b"6789", c.gdb_crc32(b"12345")) == c.gdb_crc32(b"123456789")
    assert c.Crc(0x0376E6E7).encode() == b"C376e6e7"


def test_in_packet_tracks_a_started_packet():
    codec = c.Codec()
    assert not codec.in_packet
    codec.feed(b"$m10")
    assert codec.in_packet
    codec.feed(b",4#")
    assert codec.in_packet
    codec.feed(frame(b"m10,4")[-2:])
    assert not codec.in_packet

# --------------------------------------------------------------------------
# Fuzz


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_never_break_the_codec(seed):
    rng = random.Random(seed)
    limit = 64
    codec = c.Codec(max_packet=limit, rle=bool(seed & 1))
    if seed & 2:
        codec.start_no_ack()
    alphabet = b"$#}*\x03+-gmM0a,:" + bytes(range(256))
    packets = reads = 0
    for _ in range(2000):
        chunk = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.1:
            chunk += frame(b"m10,4")
        for event in codec.feed(chunk):
            assert isinstance(event, (c.Packet, c.Interrupt))
            if isinstance(event, c.Packet):
                packets += 1
                request = event.request
                reads += request == c.ReadMemory(0x10, 4)
                assert isinstance(request, REQUEST_TYPES)
                for field in ("payload", "data"):
                    assert len(getattr(request, field, b"")) <= limit
        if rng.random() < 0.05:
            codec.send(c.Stop())
        out = codec.data_to_send()
        acks = out.replace(b"$T05#b9", b"")
        assert set(acks) <= (set(b"+-") if codec.ack_mode else set())
        packets -= acks.count(b"+")
        if codec.ack_mode:
            assert packets == 0                 # exactly one '+' per packet
    assert reads > 20
    # Whatever state the garbage left, "#xx" closes it and the next packet parses.
    events = codec.feed(b"#xx" + frame(b"m10,4"))
    assert events[-1] == c.Packet(c.ReadMemory(0x10, 4))

# --------------------------------------------------------------------------
# Target description and register packing


def test_g_layout():
    assert G_PACKET_SIZE == sum(reg.bits // 8 for reg in REGISTERS) == 608
    offsets = {name: REGISTERS[REGISTER_INDEX[name]].offset
               for name in ("rip", "eflags", "st0", "xmm0", "mxcsr", "fs_base", "cr3", "efer")}
    assert offsets == {"rip": 128, "eflags": 136, "st0": 164, "xmm0": 276, "mxcsr": 532,
                       "fs_base": 536, "cr3": 576, "efer": 600}
    assert [REGISTER_INDEX[n] for n in ("rax", "gs", "st0", "fctrl", "xmm0", "mxcsr")] == \
        [0, 23, 24, 32, 40, 56]
    end = 0
    for reg in REGISTERS:
        assert reg.offset == end
        end += reg.size


def all_values():
    values = {reg.name: n + 1 for n, reg in enumerate(REGISTERS)}
    values["xmm1"] = struct.pack("<4f", 1.0, 2.5, -3.0, 4.25)
    values["st0"] = bytes(range(10))
    values["cr3"] = 0x1234000
    values["rip"] = 0xFFFFFFFF81000123
    return values


def test_encode_registers_places_values_little_endian():
    values = all_values()
    data = encode_registers(values)
    assert len(data) == G_PACKET_SIZE
    for name in ("rip", "eflags", "cs", "cr3", "xmm1", "st0", "mxcsr", "k_gs_base"):
        reg = REGISTERS[REGISTER_INDEX[name]]
        field = data[reg.offset:reg.offset + reg.size]
        assert field == encode_register(REGISTER_INDEX[name], values)
        value = values[name]
        assert field == (value if isinstance(value, bytes) else value.to_bytes(reg.size, "little"))
    assert int.from_bytes(data[128:136], "little") == 0xFFFFFFFF81000123


@pytest.mark.parametrize("change", [
    lambda v: v.pop("efer"),
    lambda v: v.update(eflags=1 << 32),
    lambda v: v.update(rax=-1),
    lambda v: v.update(xmm0=bytes(15)),
])
def test_encode_registers_rejects_missing_or_bad_values(change):
    values = all_values()
    change(values)
    with pytest.raises(ValueError):
        encode_registers(values)


def test_encode_register_bad_number():
    with pytest.raises(ValueError):
        encode_register(len(REGISTERS), all_values())


def test_target_xml_matches_the_register_table():
    root = ET.fromstring(TARGET_XML.split("\n", 2)[2])   # skip the XML and DOCTYPE lines
    assert root.findtext("architecture") == "i386:x86-64"
    features = {f.get("name"): [r.get("name") for r in f.findall("reg")]
                for f in root.findall("feature")}
    assert list(features) == ["org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse",
                              "org.gnu.gdb.i386.segments", "org.rrstub.x86.system"]
    assert features["org.gnu.gdb.i386.segments"] == ["fs_base", "gs_base"]
    assert features["org.rrstub.x86.system"] == [
        "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"]
    regs = root.findall("feature/reg")
    assert [(r.get("name"), int(r.get("bitsize")), int(r.get("regnum"))) for r in regs] == \
        [(reg.name, reg.bits, n) for n, reg in enumerate(REGISTERS)]
    types = {r.get("name"): r.get("type") for r in regs}
    assert (types["rip"], types["rsp"], types["eflags"], types["st0"], types["xmm0"],
            types["mxcsr"]) == ("code_ptr", "data_ptr", "i386_eflags", "i387_ext", "vec128",
                                "i386_mxcsr")
    defined = {t.get("id") for f in root.findall("feature") for t in f}
    assert {"i386_eflags", "vec128", "i386_mxcsr"} <= defined
