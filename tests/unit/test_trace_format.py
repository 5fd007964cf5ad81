"""`rrstub trace` output lines and instruction classes, without KVM."""
import json

import pytest

from rrstub.trace import _BRANCH, _FALLS, _SYSTEM, Executed, flow_of, format_json, format_text

STORE = Executed(120001, 0xFFFFFFFF80100A3C, bytes.fromhex("890512340000"),
                 "mov dword ptr [rip + 0x3412], eax", (("rax", 3), ("rflags", 0x246)))
INTERRUPT = Executed(7, 0x100222, b"", "<interrupt vector 32>", (("rsp", 0x106FE0), ("rflags", 0x46)),
                     interrupt=32, then=(0x100E60, b"\x6a\x00", "push 0"))


def test_text_line_has_aligned_columns_and_the_changed_registers():
    line = format_text(STORE, 8)
    assert line.startswith("  120001  ffffffff80100a3c  89 05 12 34 00 00 ")
    assert "mov dword ptr [rip + 0x3412], eax" in line
    assert line.endswith("  rax=0x3 rflags=0x246")
    other = format_text(STORE._replace(pos=5, code=b"\x90", asm="nop"), 8)
    assert other.index("rax=") == line.index("rax=")      # the columns line up


def test_text_line_without_changes_has_no_trailing_blanks():
    line = format_text(Executed(1, 0x1000, b"\xee", "out dx, al", ()), 6)
    assert line == "     1  0000000000001000  ee" + " " * 31 + "out dx, al"


def test_text_line_shows_an_interrupt_and_the_instruction_run_with_it():
    line = format_text(INTERRUPT, 6)
    assert line.startswith("     7  0000000000100222  " + " " * 33 + "<interrupt vector 32>")
    assert line.endswith("<then 100e60: push 0>  rsp=0x106fe0 rflags=0x46")


def test_json_line_is_one_object_with_hex_strings():
    obj = json.loads(format_json(STORE))
    assert obj == {"pos": 120001, "rip": "0xffffffff80100a3c", "bytes": "890512340000",
                   "asm": "mov dword ptr [rip + 0x3412], eax", "changed": {"rax": "0x3", "rflags": "0x246"}}
    assert "interrupt" not in obj and "then" not in obj
    obj = json.loads(format_json(INTERRUPT))
    assert obj == {"pos": 7, "rip": "0x100222", "bytes": "", "asm": "<interrupt vector 32>",
                   "changed": {"rsp": "0x106fe0", "rflags": "0x46"}, "interrupt": 32,
                   "then": {"rip": "0x100e60", "bytes": "6a00", "asm": "push 0"}}
    assert json.loads(format_json(STORE._replace(asm='odd "text"')))["asm"] == 'odd "text"'


@pytest.mark.parametrize("mnemonic, op_str, flow", [
    ("mov", "eax, dword ptr [rip + 0x10]", _FALLS),
    ("rep stosq", "qword ptr [rdi], rax", _FALLS),
    ("pop", "rbx", _FALLS),
    ("jne", "0x1000b0", _BRANCH),
    ("call", "0x100100", _BRANCH),
    ("ret", "", _BRANCH),
    ("mov", "cr3, rax", _SYSTEM),
    ("mov", "ds, eax", _SYSTEM),
    ("pop", "fs", _SYSTEM),
    ("iretq", "", _SYSTEM),
    ("swapgs", "", _SYSTEM),
    ("wrmsr", "", _SYSTEM),
    ("invlpg", "byte ptr [rax]", _SYSTEM),
    ("int", "0x80", _SYSTEM),
])
def test_instructions_are_classed_by_how_control_leaves_them(mnemonic, op_str, flow):
    assert flow_of(mnemonic, op_str) == flow
