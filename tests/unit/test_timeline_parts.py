"""The replay timeline's parts that need no KVM: page history, memory operands, --gdb addresses."""
from types import SimpleNamespace

import pytest

from rrstub.gdbproto.server import parse_address
from rrstub.replay.accesses import READ, WRITE, memory_accesses
from rrstub.replay.timeline import PageHistory
from vmm.snapshot import ZERO_PAGE


def page(byte: int) -> bytes:
    return bytes([byte]) * 4096


def test_page_history_answers_the_newest_value_at_or_before_a_position():
    h = PageHistory()
    h.add(0, [(1, page(1))])
    h.add(1000, [(1, page(2)), (2, page(3))])
    h.add(500, [(1, page(4))])        # a checkpoint made later, between the two
    assert h.value_at(1, 0) == page(1)
    assert h.value_at(1, 499) == page(1)
    assert h.value_at(1, 500) == page(4)
    assert h.value_at(1, 999) == page(4)
    assert h.value_at(1, 10 ** 9) == page(2)
    assert h.value_at(2, 999) == ZERO_PAGE      # not stored before 1000: RAM starts zeroed
    assert h.value_at(3, 5) == ZERO_PAGE
    assert h.stored_bytes == 4 * 4096


def test_page_history_replaces_a_value_stored_twice_at_one_position():
    h = PageHistory()
    h.add(7, [(0, page(1))])
    h.add(7, [(0, page(2))])
    assert h.value_at(0, 7) == page(2)
    assert h.stored_bytes == 4096


def regs(**values):
    names = ("rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags").split()
    base = {n: 0 for n in names}
    base.update(values)
    return SimpleNamespace(**base)


def test_rip_relative_load_and_store():
    r = regs(rip=0x1000a0)
    # mov 0x6f7a(%rip),%edx  (race.c's `int seen = counter`)
    assert memory_accesses(bytes.fromhex("8b157a6f0000"), r) == [(0x107020, 4, READ)]
    r = regs(rip=0x1000b9)
    # mov %eax,0x6f61(%rip)  (`counter = seen + 1`)
    assert memory_accesses(bytes.fromhex("89056f6f0000"), r) == [(0x1000bf + 0x6f6f, 4, WRITE)]


def test_base_index_scale_and_32_bit_registers():
    r = regs(rbx=0x2000, rcx=3, rip=0)
    assert memory_accesses(bytes.fromhex("89048b"), r) == [(0x2000 + 12, 4, WRITE)]   # mov %eax,(%rbx,%rcx,4)
    r = regs(rax=0xFFFFFFFF00001000, rip=0)
    assert memory_accesses(bytes.fromhex("678b08"), r) == [(0x1000, 4, READ)]        # mov (%eax),%ecx


def test_segment_bases_and_implicit_stack_accesses():
    r = regs(rip=0, rsp=0x8000, rbp=0x9000)
    assert memory_accesses(bytes.fromhex("65488b042510000000"), r, gs_base=0x5000) == [(0x5010, 8, READ)]
    assert memory_accesses(b"\x50", r) == [(0x7FF8, 8, WRITE)]          # push %rax
    assert memory_accesses(b"\x58", r) == [(0x8000, 8, READ)]           # pop %rax
    assert memory_accesses(b"\xc3", r) == [(0x8000, 8, READ)]           # ret
    assert memory_accesses(b"\xe8\x00\x00\x00\x00", r) == [(0x7FF8, 8, WRITE)]   # call
    assert memory_accesses(b"\xc9", r) == [(0x9000, 8, READ)]           # leave
    assert memory_accesses(b"\x48\xcf", r) == [(0x8000, 40, READ)]      # iretq


def test_string_instructions_use_rsi_and_rdi():
    r = regs(rip=0, rsi=0x100, rdi=0x200)
    got = sorted(memory_accesses(b"\x48\xa5", r))                        # movsq
    assert got == [(0x100, 8, READ), (0x200, 8, WRITE)]


def test_no_access_for_lea_nop_and_undecodable_bytes():
    r = regs(rip=0, rax=0x1234)
    assert memory_accesses(bytes.fromhex("488d0400"), r) == []         # lea (%rax,%rax,1),%rax
    assert memory_accesses(bytes.fromhex("0f1f440000"), r) == []       # nopl 0(%rax,%rax,1)
    assert memory_accesses(b"\x0f\x0b"[:1], r) == []                   # a cut instruction


@pytest.mark.parametrize("text, expected", [
    ("1234", ("127.0.0.1", 1234)), (":1234", ("127.0.0.1", 1234)),
    ("0.0.0.0:9000", ("0.0.0.0", 9000)), ("localhost:0", ("localhost", 0)),
])
def test_gdb_addresses(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text, message", [("abc", "not [HOST:]PORT"), ("host:", "not [HOST:]PORT"),
                                           ("70000", "outside 0..65535")])
def test_bad_gdb_addresses_say_what_is_expected(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_address(text)
