"""The fixed CPUID table (vmm/cpuid.py): feature bits by their SDM positions, lookup rules, KVM entries."""
import pytest

from vmm.cpuid import CPUID_TABLE, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, TSC_HZ, kvm_entries, lookup
from vmm.kvm import CpuidEntry

EAX, EBX, ECX, EDX = range(4)


def text(leaf, order):
    regs = lookup(leaf, 0)
    return b"".join(regs[r].to_bytes(4, "little") for r in order)


def test_vendor_hypervisor_signature_and_brand():
    assert text(0, (EBX, EDX, ECX)) == b"rrstubVCPU64"
    assert text(0x40000000, (EBX, ECX, EDX)) == b"rrstubrrstub"
    brand = b"".join(text(leaf, (EAX, EBX, ECX, EDX)) for leaf in (0x80000002, 0x80000003, 0x80000004))
    assert brand == b"rrstub virtual CPU".ljust(48, b"\0")


def test_highest_leaves():
    assert lookup(0, 0)[EAX] == 0x16
    assert lookup(0x40000000, 0)[EAX] == 0x40000000
    assert lookup(0x80000000, 0)[EAX] == 0x80000008


def test_family_model_stepping_and_leaf1_ebx():
    eax, ebx, _, _ = lookup(1, 0)
    assert (eax >> 8 & 0xF, eax >> 4 & 0xF, eax & 0xF) == (6, 0, 0)
    assert ebx >> 8 & 0xFF == 8            # CLFLUSH line, in 8-byte units: 64 bytes
    assert ebx >> 24 == 0                  # initial APIC ID of the only vCPU


# (leaf, subleaf, register, bit, name): positions straight from the SDM, not from vmm/cpuid.py.
PRESENT = [
    (1, 0, EDX, 0, "FPU"), (1, 0, EDX, 3, "PSE"), (1, 0, EDX, 4, "TSC"), (1, 0, EDX, 5, "MSR"),
    (1, 0, EDX, 6, "PAE"), (1, 0, EDX, 8, "CX8"), (1, 0, EDX, 11, "SEP"), (1, 0, EDX, 13, "PGE"),
    (1, 0, EDX, 15, "CMOV"), (1, 0, EDX, 16, "PAT"), (1, 0, EDX, 19, "CLFSH"), (1, 0, EDX, 23, "MMX"),
    (1, 0, EDX, 24, "FXSR"), (1, 0, EDX, 25, "SSE"), (1, 0, EDX, 26, "SSE2"),
    (1, 0, ECX, 0, "SSE3"), (1, 0, ECX, 31, "HYPERVISOR"),
    (0x80000001, 0, ECX, 0, "LAHF_LM"), (0x80000001, 0, EDX, 11, "SYSCALL"),
    (0x80000001, 0, EDX, 20, "NX"), (0x80000001, 0, EDX, 29, "LM"),
    (0x80000007, 0, EDX, 8, "INVARIANT_TSC"),
]
ABSENT = [
    (1, 0, EDX, 9, "APIC"), (1, 0, EDX, 12, "MTRR"), (1, 0, EDX, 7, "MCE"), (1, 0, EDX, 14, "MCA"),
    (1, 0, EDX, 28, "HTT"),
    (1, 0, ECX, 9, "SSSE3"), (1, 0, ECX, 13, "CX16"), (1, 0, ECX, 21, "X2APIC"), (1, 0, ECX, 24, "TSC_DEADLINE"),
    (1, 0, ECX, 26, "XSAVE"), (1, 0, ECX, 27, "OSXSAVE"), (1, 0, ECX, 28, "AVX"), (1, 0, ECX, 30, "RDRAND"),
    (7, 0, EBX, 0, "FSGSBASE"), (7, 0, EBX, 5, "AVX2"), (7, 0, EBX, 7, "SMEP"), (7, 0, EBX, 18, "RDSEED"),
    (7, 0, EBX, 20, "SMAP"), (7, 0, ECX, 22, "RDPID"),
    (0x80000001, 0, EDX, 26, "PDPE1GB"), (0x80000001, 0, EDX, 27, "RDTSCP"),
]


FEATURES = [(*p, True) for p in PRESENT] + [(*a, False) for a in ABSENT]


@pytest.mark.parametrize("leaf,subleaf,reg,bit,name,advertised", FEATURES,
                         ids=[f"{f[4]}-{'on' if f[5] else 'off'}" for f in FEATURES])
def test_feature_bit(leaf, subleaf, reg, bit, name, advertised):
    assert bool(lookup(leaf, subleaf)[reg] >> bit & 1) == advertised


def test_leaf1_and_leaf7_feature_words_hold_nothing_else():
    _, _, ecx, edx = lookup(1, 0)
    expected = [p for p in PRESENT if p[0] == 1]
    assert edx == sum(1 << p[3] for p in expected if p[2] == EDX)
    assert ecx == sum(1 << p[3] for p in expected if p[2] == ECX)
    assert lookup(7, 0) == (0, 0, 0, 0)


def test_address_widths():
    eax = lookup(0x80000008, 0)[EAX]
    assert (eax & 0xFF, eax >> 8 & 0xFF) == (39, 48)


def test_tsc_frequency_leaves_say_1ghz():
    assert TSC_HZ == 1_000_000_000
    denominator, numerator, crystal_hz, _ = lookup(0x15, 0)
    assert crystal_hz * numerator // denominator == TSC_HZ
    base_mhz, max_mhz, _, _ = lookup(0x16, 0)
    assert base_mhz == max_mhz == TSC_HZ // 1_000_000


MAX_BASIC = (1000, 1000, 1000, 0)
ZERO = (0, 0, 0, 0)
# What KVM answers for the same table (arch/x86/kvm/cpuid.c, kvm_cpuid).  A CPL0 guest on the
# development host, after KVM_SET_CPUID2 with kvm_entries(), saw exactly these, except for 0xD,
# which that host fills in itself (as it does leaves 1 and 7).
LOOKUP_RULES = [
    (0x2, 0, ZERO, "unlisted leaf below the top of the basic class"),
    (0xD, 0, ZERO, "no XSAVE leaf"),
    (0x80000005, 0, ZERO, "unlisted extended leaf in range"),
    (0x7, 1, ZERO, "leaf 7 subleaf that does not exist"),
    (0x17, 0, MAX_BASIC, "above the highest basic leaf"),
    (0xFFFF, 0, MAX_BASIC, "far above the highest basic leaf"),
    (0x50000000, 3, MAX_BASIC, "upper basic range"),
    (0x40000001, 0, MAX_BASIC, "above the highest hypervisor leaf"),
    (0x40000100, 0, MAX_BASIC, "hypervisor sub-class with no base leaf"),
    (0x80000009, 0, MAX_BASIC, "above the highest extended leaf"),
    (0xC0000000, 0, MAX_BASIC, "Centaur class absent"),
    (0xFFFFFFFF, 0xFFFFFFFF, MAX_BASIC, "highest possible leaf"),
]


@pytest.mark.parametrize("leaf,subleaf,expected,why", LOOKUP_RULES, ids=[r[-1] for r in LOOKUP_RULES])
def test_unlisted_leaves_follow_kvm(leaf, subleaf, expected, why):
    assert lookup(leaf, subleaf) == expected


def test_subleaf_matters_only_for_indexed_leaves():
    for leaf in (0, 1, 0x15, 0x80000001):
        assert lookup(leaf, 5) == lookup(leaf, 0xFFFFFFFF) == lookup(leaf, 0)


def test_inputs_are_taken_as_32_bits():
    assert lookup(1 | 0xDEAD << 32, 0) == lookup(1, 0)
    assert lookup(7, 1 << 32) == lookup(7, 0)


def test_every_value_is_a_32_bit_register():
    for regs in CPUID_TABLE.values():
        assert len(regs) == 4 and all(0 <= r < 1 << 32 for r in regs)


def test_table_is_read_only():
    with pytest.raises(TypeError):
        CPUID_TABLE[(0x99, None)] = ZERO


def test_kvm_entries_carry_the_table():
    entries = kvm_entries()
    assert all(isinstance(e, CpuidEntry) for e in entries)
    assert len(entries) == len(CPUID_TABLE) == len({(e.function, e.index) for e in entries})
    for e in entries:
        assert (e.eax, e.ebx, e.ecx, e.edx) == lookup(e.function, e.index)
    assert KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 1
    assert {(e.function, e.index): e.flags for e in entries if e.flags} == {(7, 0): 1}
