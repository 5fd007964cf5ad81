"""The one CPUID table every rrstub guest sees, on every host.

A recording must replay on another machine, so what ``cpuid`` answers cannot
come from the host.  This module owns the table: the exact engine emulates
``cpuid`` from ``lookup()``, and ``kvm_entries()`` hands the same table to
KVM_SET_CPUID2 so that a host which honours it answers the same values.
This host honours it only in part (PLATFORM.md): after KVM_SET_CPUID2 with
``kvm_entries()`` a CPL0 guest saw this table for every leaf but 1, 7 and
0xD, which carry the host's feature bits.

The table is x86-64-v1 (the psABI baseline) plus SSE3 and LAHF/SAHF in long
mode, which every x86-64 CPU made since 2006 has.  x86-64-v2 is out of reach:
it needs CMPXCHG16B, which this host cannot execute at CPL0.

Leaves (anything not listed reads as described under "Unlisted leaves"):

0x0         EAX = 0x16, the highest basic leaf.  EBX:EDX:ECX = VENDOR,
            "rrstubVCPU64".  An unknown vendor keeps guests off
            vendor-specific errata work-arounds and model-specific MSRs
            (microcode, TSX control, MISC_ENABLE...), each of which would
            be one more host value to hide.
0x1         EAX = 0x600: family 6, model 0, stepping 0.  No real CPU had
            model 0 in family 6, so no errata table matches it.
            EBX = 0x10800: CLFLUSH line 8 * 8 = 64 bytes, one logical
            processor, initial APIC ID 0 (rrstub runs one vCPU).
            EDX: FPU, PSE, TSC, MSR, PAE, CX8, SEP, PGE, CMOV, PAT, CLFSH,
            MMX, FXSR, SSE, SSE2.  Left out on purpose:
              APIC (bit 9): the machine has no local APIC;
              MTRR (bit 12): there is nothing whose memory type matters,
                and without it guests leave the whole MTRR MSR family
                alone;
              MCE/MCA (7, 14): no machine-check architecture;
              DE, VME, PSE-36, DS, ACPI, SS, HTT, TM, PBE: nothing a
                64-bit rrstub guest needs, and each is more host state.
            ECX: SSE3 (bit 0) and HYPERVISOR (bit 31).  The hypervisor bit
            is set because the guest does run under one: a guest that
            believes it is on bare metal may load microcode or probe for
            hardware that is not there, and the bit lets rrstub-aware guests
            find leaf 0x40000000.  Left out on purpose: CX16 (the host
            cannot run CMPXCHG16B at CPL0), XSAVE/OSXSAVE/AVX (the host's
            emulator fails on XRSTOR), RDRAND (a host random number),
            SSSE3 and later SSE (not universal enough to promise a replay
            host has them), x2APIC, TSC-deadline, PCID, POPCNT, MOVBE.
0x7.0       All zero, EAX = 0 (no further subleaves): no FSGSBASE, BMI,
            AVX2, SMEP, SMAP, ERMS, INVPCID, RDSEED (a host random number),
            RDPID, ...  Listed explicitly, with a significant index, to say so.
0x15        EAX = 1, EBX = 1, ECX = TSC_HZ: TSC = crystal * 1 / 1, and the
            "crystal" is the virtual clock itself: the exact engine's TSC is
            virtual nanoseconds, 1 GHz.  (Linux reads this leaf only for
            Intel CPUs, so Linux still calibrates the TSC against the PIT,
            which measures the same 1 GHz in virtual time.)
0x16        EAX = EBX = ECX = 1000: base, maximum and reference frequency in
            MHz, the same 1 GHz for software that only reads this leaf.
0x40000000  EAX = 0x40000000 (no further hypervisor leaves), EBX:ECX:EDX =
            HYPERVISOR_SIGNATURE, "rrstubrrstub".  Deliberately not KVM's
            signature: a guest that finds "KVMKVMKVM" turns on kvmclock,
            whose readings come from the host clock.
0x80000000  EAX = 0x80000008, the highest extended leaf.
0x80000001  ECX: LAHF/SAHF in long mode (bit 0).  EDX: SYSCALL (11),
            NX (20), LM (29).  No RDTSCP (27), no 1 GiB pages (26), no
            LZCNT/PREFETCHW.
0x80000002  Brand string BRAND, "rrstub virtual CPU", NUL-padded to 48 bytes
 ..0004     over the three leaves.
0x80000007  EDX bit 8, invariant TSC: the virtual TSC runs at a constant rate
            and never stops (virtual time goes on through HLT).
0x80000008  EAX = 0x3027: 39 physical and 48 linear address bits.  39 bits
            (512 GiB) is what the smallest current client CPUs have, so any
            replay host can back every guest-physical address; 48 is the
            only linear width KVM accepts besides 57 (LA57 is not offered).

Unlisted leaves.  ``lookup`` answers exactly as KVM does for the same table
(arch/x86/kvm/cpuid.c, kvm_cpuid): a leaf below the top of its class (basic
0x0..., hypervisor 0x400000xx, extended 0x8000xxxx) that is not listed, or a
subleaf of 0x7 other than 0, reads as zeros; a leaf above the top of its
class, or in a class that has no base leaf (for example 0x40000100 or
0xC0000000), reads as the highest basic leaf, 0x16, as on Intel CPUs.  Doing
what KVM does means the exact engine, which emulates ``cpuid``, and an
engine that lets KVM answer from ``kvm_entries()`` show a guest the same
values.  (KVM rewrites two bits of leaf 1 at run time: APIC follows
IA32_APIC_BASE.EN and OSXSAVE follows CR4.OSXSAVE; both stay clear in an
rrstub machine, which has no local APIC and no XSAVE.)
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional

from vmm.kvm import CpuidEntry

TSC_HZ = 1_000_000_000
VENDOR = b"rrstubVCPU64"
HYPERVISOR_SIGNATURE = b"rrstubrrstub"
BRAND = b"rrstub virtual CPU"
PHYSICAL_ADDRESS_BITS = 39
LINEAR_ADDRESS_BITS = 48

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # spelled as in <linux/kvm.h>

MAX_BASIC_LEAF = 0x16
HYPERVISOR_BASE = 0x40000000
EXTENDED_BASE = 0x80000000
MAX_EXTENDED_LEAF = 0x80000008

Registers = tuple[int, int, int, int]  # eax, ebx, ecx, edx
# A key's subleaf is None when the leaf ignores ECX.
Key = tuple[int, Optional[int]]


def _bits(**positions: int) -> int:
    """A feature word from named bit positions; the names are for the reader."""
    word = 0
    for bit in positions.values():
        word |= 1 << bit
    return word


def _dwords(text: bytes) -> tuple[int, ...]:
    return tuple(int.from_bytes(text[i:i + 4], "little") for i in range(0, len(text), 4))


_LEAF1_EDX = _bits(FPU=0, PSE=3, TSC=4, MSR=5, PAE=6, CX8=8, SEP=11, PGE=13, CMOV=15,
                   PAT=16, CLFSH=19, MMX=23, FXSR=24, SSE=25, SSE2=26)
_LEAF1_ECX = _bits(SSE3=0, HYPERVISOR=31)
_EXT1_ECX = _bits(LAHF_LM=0)
_EXT1_EDX = _bits(SYSCALL=11, NX=20, LM=29)
_EXT7_EDX = _bits(INVARIANT_TSC=8)

_vendor = _dwords(VENDOR)                   # in EBX, EDX, ECX order
_signature = _dwords(HYPERVISOR_SIGNATURE)  # in EBX, ECX, EDX order
_brand = _dwords(BRAND.ljust(48, b"\0"))
_TSC_MHZ = TSC_HZ // 1_000_000

CPUID_TABLE: Mapping[Key, Registers] = MappingProxyType({
    (0x0, None): (MAX_BASIC_LEAF, _vendor[0], _vendor[2], _vendor[1]),
    (0x1, None): (0x0000_0600, 0x0001_0800, _LEAF1_ECX, _LEAF1_EDX),
    (0x7, 0): (0, 0, 0, 0),
    (0x15, None): (1, 1, TSC_HZ, 0),
    (0x16, None): (_TSC_MHZ, _TSC_MHZ, _TSC_MHZ, 0),
    (HYPERVISOR_BASE, None): (HYPERVISOR_BASE, *_signature),
    (0x80000000, None): (MAX_EXTENDED_LEAF, 0, 0, 0),
    (0x80000001, None): (0, 0, _EXT1_ECX, _EXT1_EDX),
    (0x80000002, None): _brand[0:4],
    (0x80000003, None): _brand[4:8],
    (0x80000004, None): _brand[8:12],
    (0x80000007, None): (0, 0, 0, _EXT7_EDX),
    (0x80000008, None): (LINEAR_ADDRESS_BITS << 8 | PHYSICAL_ADDRESS_BITS, 0, 0, 0),
})


def _find(leaf: int, subleaf: int) -> Optional[Registers]:
    found = CPUID_TABLE.get((leaf, None))
    return found if found is not None else CPUID_TABLE.get((leaf, subleaf))


def _class_base(leaf: int) -> int:
    """The leaf whose EAX is the top of ``leaf``'s class (KVM's classes)."""
    if HYPERVISOR_BASE <= leaf <= 0x4FFFFFFF:
        return leaf & 0xFFFFFF00
    if leaf >= 0xC0000000:
        return 0xC0000000
    return leaf & EXTENDED_BASE


def lookup(leaf: int, subleaf: int) -> Registers:
    """What ``cpuid`` returns for EAX=leaf, ECX=subleaf (both taken as 32-bit)."""
    leaf &= 0xFFFFFFFF
    subleaf &= 0xFFFFFFFF
    found = _find(leaf, subleaf)
    if found is not None:
        return found
    base = _find(_class_base(leaf), 0)
    if base is not None and leaf <= base[0]:
        return 0, 0, 0, 0
    # Like KVM, the redirected read keeps the caller's subleaf.
    return _find(MAX_BASIC_LEAF, subleaf) or (0, 0, 0, 0)


def kvm_entries() -> list[CpuidEntry]:
    """The table as KVM_SET_CPUID2 entries, in table order."""
    return [CpuidEntry(function=leaf, index=subleaf or 0,
                       flags=0 if subleaf is None else KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                       eax=eax, ebx=ebx, ecx=ecx, edx=edx)
            for (leaf, subleaf), (eax, ebx, ecx, edx) in CPUID_TABLE.items()]
