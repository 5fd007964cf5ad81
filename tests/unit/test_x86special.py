"""Decoding and emulating host-revealing instructions (vmm/x86special.py).

Decoding is checked three ways: a hand-written table from the SDM, a sweep
against capstone (an independent decoder) over every prefix pair, and
invariants on random bytes.  Emulation is checked register by register.
"""
import itertools
import random
from dataclasses import replace

import capstone
import pytest

from vmm.cpuid import lookup
from vmm.kvm import Regs
from vmm.x86special import GPR_NAMES, EmulationContext, Kind, Special, decode, emulate

K = Kind
RDRAND_KINDS = (K.RDRAND, K.RDSEED, K.RDPID)

# (bytes, long_mode, expected): expected is (kind, length) or (kind, length, opsize, reg), or None.
DECODE_CASES = [
    # The instructions, plain.
    ("0f31", True, (K.RDTSC, 2)),
    ("0f01f9", True, (K.RDTSCP, 3)),
    ("0fa2", True, (K.CPUID, 2)),
    ("0f32", True, (K.RDMSR, 2)),
    ("0f30", True, (K.WRMSR, 2)),
    ("f4", True, (K.HLT, 1)),
    ("0f22d8", True, (K.CR_WRITE, 3)),                  # mov cr3, rax
    ("440f22c0", True, (K.CR_WRITE, 4)),                # mov cr8, rax (REX.R)
    ("0f2200", True, (K.CR_WRITE, 3)),                  # ModRM.mod is ignored: still mov cr0, rax
    ("0fc7f0", True, (K.RDRAND, 3, 32, 0)),
    ("0fc7f8", True, (K.RDSEED, 3, 32, 0)),
    ("f30fc7f8", True, (K.RDPID, 4, 64, 0)),
    # Operand size: 66 -> 16, REX.W -> 64 and wins over 66.
    ("660fc7f3", True, (K.RDRAND, 4, 16, 3)),
    ("480fc7f1", True, (K.RDRAND, 4, 64, 1)),
    ("66480fc7f0", True, (K.RDRAND, 5, 64, 0)),
    ("660fc7fa", True, (K.RDSEED, 4, 16, 2)),
    ("400fc7f4", True, (K.RDRAND, 4, 32, 4)),           # empty REX: esp, not ah
    # REX.B reaches r8..r15; REX.R and REX.X do not matter.
    ("410fc7f0", True, (K.RDRAND, 4, 32, 8)),
    ("490fc7f7", True, (K.RDRAND, 4, 64, 15)),
    ("66410fc7f5", True, (K.RDRAND, 5, 16, 13)),
    ("490fc7f9", True, (K.RDSEED, 4, 64, 9)),
    ("4e0fc7ff", True, (K.RDSEED, 4, 64, 7)),
    ("f3410fc7fb", True, (K.RDPID, 5, 64, 11)),
    # A REX counts only right before the opcode; of two REX bytes the last counts.
    ("48660fc7f0", True, (K.RDRAND, 5, 16, 0)),
    ("492e0fc7f0", True, (K.RDRAND, 5, 32, 0)),
    ("48410fc7f0", True, (K.RDRAND, 5, 32, 8)),
    ("41480fc7f0", True, (K.RDRAND, 5, 64, 0)),
    # RDPID ignores 66 and REX.W; of F2 and F3 the last one counts.
    ("66f30fc7f9", True, (K.RDPID, 5, 64, 1)),
    ("f3480fc7f8", True, (K.RDPID, 5, 64, 0)),
    ("f2f30fc7f8", True, (K.RDPID, 5, 64, 0)),
    ("f3f20fc7f8", True, None),
    # RDRAND/RDSEED are NFx: with F2 or F3 they are something else (F3 /6 is SENDUIPI).
    ("f30fc7f0", True, None),
    ("f20fc7f0", True, None),
    ("f20fc7f8", True, None),
    ("f2480fc7f0", True, None),
    ("f3490fc7f3", True, None),
    # Prefixes the CPU ignores here.
    ("2e3e2664653666670f31", True, (K.RDTSC, 10)),
    ("66f2f3670fa2", True, (K.CPUID, 6)),
    ("480f31", True, (K.RDTSC, 3)),
    ("f30f01f9", True, (K.RDTSCP, 4)),
    ("410f01f9", True, (K.RDTSCP, 4)),                  # REX.B does not touch a fixed ModRM
    ("65f4", True, (K.HLT, 2)),
    ("f3f4", True, (K.HLT, 2)),
    ("660f32", True, (K.RDMSR, 3)),
    ("f30f30", True, (K.WRMSR, 3)),
    ("660f22c0", True, (K.CR_WRITE, 4)),
    # LOCK makes each of them #UD.
    ("f00f31", True, None),
    ("f00fc7f0", True, None),
    ("f0f4", True, None),
    ("f00f22c0", True, None),
    ("f00fa2", True, None),
    ("f0480f31", True, None),
    ("66f00f32", True, None),
    ("f0f20f31", True, None),                           # not XACQUIRE: that needs a memory operand
    ("f0f30f01f9", True, None),
    # 15 bytes at most; more is #GP.
    ("66" * 13 + "0f31", True, (K.RDTSC, 15)),
    ("66" * 14 + "0f31", True, None),
    ("2e" * 14 + "f4", True, (K.HLT, 15)),
    ("2e" * 15 + "f4", True, None),
    ("66" * 11 + "480fc7f0", True, (K.RDRAND, 15, 64, 0)),
    ("66" * 12 + "480fc7f0", True, None),
    ("0f31" + "90" * 20, True, (K.RDTSC, 2)),           # bytes after the instruction do not matter
    # Truncated.
    ("", True, None),
    ("0f", True, None),
    ("0f01", True, None),
    ("0fc7", True, None),
    ("0f22", True, None),
    ("66", True, None),
    ("48", True, None),
    ("6648", True, None),
    ("f30fc7", True, None),
    # Other instructions.
    ("90", True, None),                                 # nop
    ("89c8", True, None),                               # mov eax, ecx
    ("e4f4", True, None),                               # in al, 0xf4: F4 as an immediate
    ("0fc708", True, None),                             # cmpxchg8b [rax]
    ("480fc70e", True, None),                           # cmpxchg16b [rsi]
    ("0fc7c8", True, None),                             # 0F C7 /1 with a register: #UD
    ("0fc730", True, None),                             # vmptrld [rax]
    ("0fc738", True, None),                             # vmptrst [rax]
    ("f30fc738", True, None),                           # F3 0F C7 /7 with memory: not rdpid
    ("0f01f8", True, None),                             # swapgs
    ("0f01d0", True, None),                             # xgetbv
    ("0f01fa", True, None),                             # monitorx
    ("0f20c0", True, None),                             # mov rax, cr0 (a read)
    ("0f33", True, None),                               # rdpmc
    ("0f05", True, None),                               # syscall
    ("0f0b", True, None),                               # ud2
    ("f390", True, None),                               # pause
    ("cc", True, None),                                 # int3
    # 32-bit code: 40-4F are inc/dec, not prefixes; RDPID writes 32 bits.
    ("480f31", False, None),
    ("410fc7f0", False, None),
    ("0fc7f0", False, (K.RDRAND, 3, 32, 0)),
    ("660fc7f7", False, (K.RDRAND, 4, 16, 7)),
    ("0fc7f9", False, (K.RDSEED, 3, 32, 1)),
    ("f30fc7f8", False, (K.RDPID, 4, 32, 0)),
    ("0f01f9", False, (K.RDTSCP, 3)),
    ("f4", False, (K.HLT, 1)),
    ("0f22d8", False, (K.CR_WRITE, 3)),
    ("66" * 13 + "0f31", False, (K.RDTSC, 15)),
    ("f2670f31", False, (K.RDTSC, 4)),
    ("f3670fc7f8", False, (K.RDPID, 5, 32, 0)),
    ("f00f31", False, None),
]


def special(expected):
    return None if expected is None else Special(*expected)


@pytest.mark.parametrize("hexcode,long_mode,expected", DECODE_CASES,
                         ids=[f"{'64' if c[1] else '32'}-{c[0] or 'empty'}"[:40] for c in DECODE_CASES])
def test_decode_table(hexcode, long_mode, expected):
    assert decode(bytes.fromhex(hexcode), long_mode) == special(expected)


# ---------------------------------------------------------------------------
# Against capstone, every prefix pair in front of every opcode.

_CAPSTONE = {True: capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64),
             False: capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)}
_KIND_BY_MNEMONIC = {k.name.lower(): k for k in Kind if k is not K.CR_WRITE}
_REGISTERS = {}
for _n, _name in enumerate(GPR_NAMES):
    if _n < 8:
        _REGISTERS.update({_name: (64, _n), "e" + _name[1:]: (32, _n), _name[1:]: (16, _n)})
    else:
        _REGISTERS.update({_name: (64, _n), _name + "d": (32, _n), _name + "w": (16, _n)})


def capstone_special(code, long_mode):
    for insn in _CAPSTONE[long_mode].disasm(code, 0):
        if insn.mnemonic == "mov" and insn.op_str.startswith("cr"):
            return Special(K.CR_WRITE, insn.size)
        kind = _KIND_BY_MNEMONIC.get(insn.mnemonic)
        if kind in RDRAND_KINDS:
            return Special(kind, insn.size, *_REGISTERS[insn.op_str])
        return None if kind is None else Special(kind, insn.size)
    return None


def capstone_is_wrong(prefixes, code, long_mode):
    """Where capstone 5 contradicts the SDM; DECODE_CASES holds an example of each."""
    reps = [i for i, p in enumerate(prefixes) if p in (0xF2, 0xF3)]
    if not reps:
        return False
    if not long_mode and 0x67 in prefixes[reps[0]:]:
        return True                     # it rejects 67 after F2/F3 in 32-bit code
    if 0xF0 in prefixes:
        return True                     # it reads LOCK with F2/F3 as XACQUIRE/XRELEASE
    theirs = capstone_special(code, long_mode)
    return theirs is not None and theirs.kind in (K.RDRAND, K.RDSEED)  # it forgets NFx once REX.W is there


SWEEP_PREFIXES = bytes.fromhex("6667f2f3f02e65404148494c")
SWEEP_OPCODES = [bytes.fromhex(h) for h in (
    "0f31 0f01f9 0fa2 0f32 0f30 f4 0f22c0 0f22d8 0f2200 0fc7f0 0fc7f3 0fc7f8 0fc7ff 0fc7c8 0fc708 "
    "0fc730 0fc738 0f01f8 0f01d0 0f01fa 0f20c0 90 0f0b").split()]


def test_agrees_with_capstone_for_every_prefix_pair():
    checked = 0
    for n in range(3):
        for prefixes in itertools.product(SWEEP_PREFIXES, repeat=n):
            for opcode in SWEEP_OPCODES:
                code = bytes(prefixes) + opcode
                for long_mode in (True, False):
                    if capstone_is_wrong(prefixes, code, long_mode):
                        continue
                    assert decode(code, long_mode) == capstone_special(code, long_mode), (code.hex(), long_mode)
                    checked += 1
    assert checked > 6500


# ---------------------------------------------------------------------------
# Invariants.

LEGACY_PREFIXES = bytes.fromhex("f0f2f32e363e2664656667")
IGNORED_PREFIXES = bytes.fromhex("2e3626643e6567")
BASES = [bytes.fromhex(h) for h in ("0f31", "0f01f9", "0fa2", "0f32", "0f30", "f4", "0f22d8",
                                    "0fc7f0", "660fc7f3", "490fc7f7", "0fc7fd", "f30fc7f8", "f3410fc7fb")]


@pytest.mark.parametrize("long_mode", [True, False])
def test_ignored_prefixes_only_add_length_up_to_15_bytes(long_mode):
    for base in BASES:
        plain = decode(base, long_mode)
        if plain is None:
            assert not long_mode and any(0x40 <= b <= 0x4F for b in base)
            continue
        code = base
        for prefix in itertools.cycle(IGNORED_PREFIXES):
            code = bytes([prefix]) + code
            if len(code) > 15:
                assert decode(code, long_mode) is None
                break
            assert decode(code, long_mode) == replace(plain, length=len(code))
            assert decode(b"\xf0" + code, long_mode) is None


def check_invariants(code, long_mode):
    sp = decode(code, long_mode)
    if sp is None:
        return None
    assert 1 <= sp.length <= min(15, len(code))
    assert decode(code[:sp.length], long_mode) == sp          # the instruction is all in its own bytes
    assert decode(code[:sp.length - 1], long_mode) is None    # and needs every one of them
    if sp.kind in RDRAND_KINDS:
        assert sp.opsize in (16, 32, 64) and 0 <= sp.reg < (16 if long_mode else 8)
    else:
        assert (sp.opsize, sp.reg) == (0, -1)
    return sp


def test_decode_never_raises_on_random_bytes():
    rng = random.Random(20261121)
    prefixes = LEGACY_PREFIXES + bytes(range(0x40, 0x50))
    openings = [b"\x0f", b"\x0f\x01", b"\x0f\xc7", b"\x0f\x22", b"\xf4"] + SWEEP_OPCODES
    found = set()
    for i in range(6000):
        if i % 3 == 0:
            code = rng.randbytes(rng.randrange(17))
        else:  # prefixes, then something that may open a special instruction, then anything
            code = (bytes(rng.choice(prefixes) for _ in range(rng.randrange(5)))
                    + rng.choice(openings) + rng.randbytes(rng.randrange(4)))[:rng.randrange(17)]
        for long_mode in (True, False):
            sp = check_invariants(code, long_mode)
            if sp:
                found.add(sp.kind)
    assert found == set(Kind)


# ---------------------------------------------------------------------------
# Emulation.

M64 = (1 << 64) - 1
CF, PF, AF, ZF, SF, OF = 1, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 11
IF, TF = 1 << 9, 1 << 8
TSC = 0x1122_3344_5566_7788
AUX = 0x8765_4321
RAND = 0xF0E1_D2C3_B4A5_9687
BASE = Regs(**{name: 0xA5A5_0000_0000_0000 | n << 8 | n for n, name in enumerate(GPR_NAMES)},
            rip=0xFFFF_FFFF_8000_1000, rflags=0x2 | IF | TF | PF | AF | ZF | SF | OF)
ARITH_CLEARED = (BASE.rflags & ~(PF | AF | ZF | SF | OF)) | CF


class Random64:
    def __init__(self, value=RAND):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def ctx(**kw):
    kw.setdefault("random64", Random64())
    return EmulationContext(tsc=kw.pop("tsc", TSC), tsc_aux=kw.pop("tsc_aux", AUX), **kw)


def run(hexcode, regs=BASE, long_mode=True, **ctx_kw):
    code = bytes.fromhex(hexcode)
    sp = decode(code, long_mode)
    regs, context = replace(regs), ctx(**ctx_kw)
    emulated = emulate(sp, regs, context)
    return emulated, regs, context.random64.calls


# (id, bytes, initial registers changed from BASE, context, registers expected to change)
EMULATE_CASES = [
    ("rdtsc", "0f31", {}, {}, dict(rax=0x5566_7788, rdx=0x1122_3344)),
    ("rdtsc-prefixed", "2e480f31", {}, {}, dict(rax=0x5566_7788, rdx=0x1122_3344)),
    ("rdtsc-small", "0f31", {}, dict(tsc=5), dict(rax=5, rdx=0)),
    ("rdtscp", "0f01f9", {}, {}, dict(rax=0x5566_7788, rdx=0x1122_3344, rcx=AUX)),
    ("rdtscp-aux-is-32-bits", "0f01f9", {}, dict(tsc_aux=1 << 32 | 9), dict(rax=0x5566_7788, rdx=0x1122_3344, rcx=9)),
    ("rdrand16-r9", "66410fc7f1", {}, {}, dict(r9=0xA5A5_0000_0000_9687, rflags=ARITH_CLEARED)),
    ("rdrand32-r15", "410fc7f7", {}, {}, dict(r15=0xB4A5_9687, rflags=ARITH_CLEARED)),
    ("rdrand64-rax", "480fc7f0", {}, {}, dict(rax=RAND, rflags=ARITH_CLEARED)),
    ("rdrand64-r8", "490fc7f0", {}, {}, dict(r8=RAND, rflags=ARITH_CLEARED)),
    ("rdrand-wide-source", "480fc7f3", {}, dict(random64=Random64(1 << 70 | 5)), dict(rbx=5, rflags=ARITH_CLEARED)),
    ("rdrand-sets-cf", "0fc7f2", dict(rflags=0x2), {}, dict(rdx=0xB4A5_9687, rflags=0x2 | CF)),
    ("rdseed16-rsp", "660fc7fc", {}, {}, dict(rsp=0xA5A5_0000_0000_9687, rflags=ARITH_CLEARED)),
    ("rdseed32-esi", "0fc7fe", {}, {}, dict(rsi=0xB4A5_9687, rflags=ARITH_CLEARED)),
    ("rdseed64-r12", "490fc7fc", {}, {}, dict(r12=RAND, rflags=ARITH_CLEARED)),
    ("rdpid-rcx", "f30fc7f9", {}, {}, dict(rcx=AUX)),
    ("rdpid-r8", "f3410fc7f8", {}, {}, dict(r8=AUX)),
    ("cpuid-0", "0fa2", dict(rax=0xFFFF_FFFF_0000_0000, rcx=0xFFFF_FFFF_0000_0000), {},
     dict(rax=0x16, rbx=0x7473_7272, rdx=0x4356_6275, rcx=0x3436_5550)),   # "rrst" "ubVC" "PU64"
    ("cpuid-1", "0fa2", dict(rax=1), {}, dict(zip(("rax", "rbx", "rcx", "rdx"), lookup(1, 0)))),
    ("cpuid-80000008", "0fa2", dict(rax=0x8000_0008), {}, dict(rax=0x3027, rbx=0, rcx=0, rdx=0)),
    ("cpuid-7-subleaf", "0fa2", dict(rax=7, rcx=0x1_0000_0001), {}, dict(rax=0, rbx=0, rcx=0, rdx=0)),
    ("rdmsr-tsc", "0f32", dict(rcx=0xFFFF_FFFF_0000_0010), {}, dict(rax=0x5566_7788, rdx=0x1122_3344)),
    ("rdmsr-other", "0f32", dict(rcx=0x1B), dict(msr_read={0x1B: 0xFEE0_0900}.get), dict(rax=0xFEE0_0900, rdx=0)),
    ("rdmsr-64bit", "0f32", dict(rcx=0x277), dict(msr_read=lambda i: 0x0007_0406_0007_0406),
     dict(rax=0x0007_0406, rdx=0x0007_0406)),
]


@pytest.mark.parametrize("hexcode,initial,context,changed", [c[1:] for c in EMULATE_CASES],
                         ids=[c[0] for c in EMULATE_CASES])
def test_emulate(hexcode, initial, context, changed):
    start = replace(BASE, **initial)
    emulated, regs, draws = run(hexcode, start, **context)
    sp = decode(bytes.fromhex(hexcode))
    assert emulated
    assert regs == replace(start, rip=start.rip + sp.length, **changed)
    assert draws == (1 if sp.kind in (K.RDRAND, K.RDSEED) else 0)


def test_rdpid_in_32_bit_code_writes_32_bits():
    emulated, regs, _ = run("f30fc7fa", long_mode=False, tsc_aux=0xFFFF_FFFF)
    assert emulated and regs == replace(BASE, rdx=0xFFFF_FFFF, rip=BASE.rip + 4)


def test_rip_wraps_at_64_bits():
    emulated, regs, _ = run("0f31", replace(BASE, rip=M64))
    assert emulated and regs.rip == 1


@pytest.mark.parametrize("hexcode,initial", [
    ("f4", {}),                         # hlt
    ("0f22d8", {}),                     # mov cr3, rax
    ("440f22c0", {}),                   # mov cr8, rax
    ("0f30", dict(rcx=0xC000_0080)),    # wrmsr EFER
    ("0f32", dict(rcx=0x1B)),           # rdmsr the context cannot answer
], ids=["hlt", "cr3", "cr8", "wrmsr", "rdmsr-unknown"])
def test_left_to_the_cpu(hexcode, initial):
    start = replace(BASE, **initial)
    emulated, regs, draws = run(hexcode, start)
    assert not emulated and regs == start and draws == 0
