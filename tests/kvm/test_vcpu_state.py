"""A marker's vCPU and memory halves on real KVM: restore, step again, get the same run."""
from __future__ import annotations

import pytest

from vmm._native import ffi, lib
from vmm.kvm import Debug, Kvm, MARKER_MSRS, MsrError, decode_vcpu_state, encode_vcpu_state
from vmm.probe import CODE_BASE, DATA_ADDR, NOP, OUT_DONE, PROBE_MEM, ProbeVm
from vmm.snapshot import LOG_DIRTY_PAGES, DirtyTracker, apply_pages, encode_pages, memory_digest

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]

PAGE = 4096
STEPS = 1000
STI = b"\xfb"
MSR_IA32_TSC = 0x10
MSR_LSTAR = 0xC0000082
XSAVE_XMM0 = 160  # offset of XMM0 in the legacy FXSAVE area
XSAVE_XSTATE_BV = 512  # header: which components hold state (bit 1: SSE)
SHADOW_INT_STI = 0x02  # kvm_vcpu_events.interrupt.shadow after sti

# Writes a counter through RBX into one page at DATA_ADDR, forever, mixing
# it and what was there before through RAX, RDX, RSI and RDI on the way: a
# run depends on both the registers and the memory it starts from.
LOOP = (
    b"\xbb" + DATA_ADDR.to_bytes(4, "little")   # mov ebx, DATA_ADDR
    + b"\x31\xc9"                               # xor ecx, ecx
    # loop:
    + b"\xff\xc1"                               # inc ecx
    + b"\x33\x03"                               # xor eax, [rbx]
    + b"\x89\x0b"                               # mov [rbx], ecx
    + b"\x6b\xd1\x07"                           # imul edx, ecx, 7
    + b"\x31\xd0"                               # xor eax, edx
    + b"\x8d\x34\x48"                           # lea esi, [rax + rcx*2]
    + b"\xc1\xc7\x03"                           # rol edi, 3
    + b"\x01\xf7"                               # add edi, esi
    + b"\x48\x83\xc3\x04"                       # add rbx, 4
    + b"\x81\xe3" + (DATA_ADDR | 0xFFF).to_bytes(4, "little")  # and ebx, DATA_ADDR | 0xfff
    + b"\xeb\xe1"                               # jmp loop
)


@pytest.fixture
def kvm():
    with Kvm() as k:
        yield k


def step_trace(p: ProbeVm, steps: int = STEPS) -> list:
    trace = []
    for _ in range(steps):
        exit = p.run()
        assert isinstance(exit, Debug), exit
        regs = p.vcpu.get_regs()
        trace.append((exit.pc, regs))
    return trace


def test_restored_state_and_memory_replay_the_same_steps(kvm):
    with ProbeVm(kvm, LOOP) as p:
        p.vcpu.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP)
        state = p.vcpu.get_state()
        ram = encode_pages(p.mem, range(PROBE_MEM // PAGE))
        ram_before = memory_digest(p.mem)

        first = step_trace(p)
        assert len({pc for pc, _ in first}) == 12            # xor, then the loop's eleven, all ran
        assert first[-1][1].rcx > 80 and memory_digest(p.mem) != ram_before

        p.vcpu.set_state(state)
        assert step_trace(p) != first                         # the memory half matters too

        p.vcpu.set_state(state)
        apply_pages(p.mem, ram)
        assert memory_digest(p.mem) == ram_before
        assert step_trace(p) == first

        # Again, from the encoded form a recording would hold.
        p.vcpu.set_state(decode_vcpu_state(encode_vcpu_state(state)))
        apply_pages(p.mem, ram)
        assert step_trace(p) == first


def test_state_taken_mid_run_resumes_mid_run(kvm):
    with ProbeVm(kvm, LOOP) as p:
        p.vcpu.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP)
        step_trace(p, 123)
        state = p.vcpu.get_state()
        ram = encode_pages(p.mem, range(PROBE_MEM // PAGE))
        rest = step_trace(p, 300)
        step_trace(p, 50)
        p.vcpu.set_state(state)
        apply_pages(p.mem, ram)
        assert step_trace(p, 300) == rest


def test_dirty_tracker_sees_the_page_the_guest_wrote(kvm):
    with ProbeVm(kvm, LOOP) as p:
        # Turning logging on for the live slot is a flags-only change KVM allows.
        p.vm.set_user_memory_region(0, 0, PROBE_MEM, p.mem.host_addr, flags=LOG_DIRTY_PAGES)
        tracker = DirtyTracker(p.vm, 0, PROBE_MEM)
        tracker.reset()
        p.vcpu.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP)
        step_trace(p, 50)
        tracker.collect()
        dirty = tracker.pages()
        assert DATA_ADDR // PAGE in dirty
        # The CPU may set accessed/dirty bits in the boot page tables; the
        # code page and the rest of RAM stay clean.
        assert CODE_BASE // PAGE not in dirty and len(dirty) <= 8
        before = tracker.digest(p.mem)
        step_trace(p, 50)
        tracker.collect()
        assert tracker.digest(p.mem) != before               # the counter moved on
        tracker.reset()
        tracker.collect()
        assert tracker.pages() == []


def test_interrupt_shadow_is_restored(kvm):
    with ProbeVm(kvm, STI + NOP * 4 + OUT_DONE) as p:
        p.vcpu.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP)
        assert isinstance(p.run(), Debug)
        after_sti = p.vcpu.get_state()
        events = ffi.new("struct kvm_vcpu_events *")
        ffi.memmove(events, after_sti.events, len(after_sti.events))
        assert events.interrupt.shadow == SHADOW_INT_STI
        assert isinstance(p.run(), Debug)
        p.vcpu.set_state(after_sti)
        ffi.memmove(events, p.vcpu.get_vcpu_events(), len(after_sti.events))
        assert events.interrupt.shadow == SHADOW_INT_STI


def test_pending_nmi_is_written_even_when_the_flags_do_not_ask(kvm):
    with ProbeVm(kvm, NOP + OUT_DONE) as p:
        events = ffi.new("struct kvm_vcpu_events *")
        ffi.memmove(events, p.vcpu.get_vcpu_events(), ffi.sizeof(events[0]))
        events.nmi.pending = 1
        events.flags = 0
        p.vcpu.set_vcpu_events(bytes(ffi.buffer(events)))
        ffi.memmove(events, p.vcpu.get_vcpu_events(), ffi.sizeof(events[0]))
        assert events.nmi.pending == 1


def test_msrs_and_xsave_are_restored(kvm):
    with ProbeVm(kvm, NOP + OUT_DONE) as p:
        usable = p.vcpu.marker_msrs()
        assert MSR_LSTAR in usable and MSR_IA32_TSC not in usable
        assert set(usable) <= set(MARKER_MSRS) and p.vcpu.marker_msrs() is usable
        p.vcpu.set_msrs({MSR_LSTAR: 0xFFFFFFFF81000000})
        state = p.vcpu.get_state()
        assert dict(state.msrs)[MSR_LSTAR] == 0xFFFFFFFF81000000

        xsave = bytearray(state.xsave)
        xsave[XSAVE_XMM0:XSAVE_XMM0 + 16] = bytes(range(16))
        xsave[XSAVE_XSTATE_BV] |= 0x02
        p.vcpu.set_xsave(bytes(xsave))
        p.vcpu.set_msrs({MSR_LSTAR: 0})
        assert p.vcpu.get_xsave()[XSAVE_XMM0:XSAVE_XMM0 + 16] == bytes(range(16))

        p.vcpu.set_state(state)
        assert p.vcpu.get_msrs([MSR_LSTAR]) == {MSR_LSTAR: 0xFFFFFFFF81000000}
        assert p.vcpu.get_xsave() == state.xsave
        assert p.vcpu.get_state() == state


def test_a_refused_msr_is_named(kvm):
    with ProbeVm(kvm, NOP + OUT_DONE) as p:
        with pytest.raises(MsrError, match="KVM refused MSR 0x12345678") as e:
            p.vcpu.get_msrs([MSR_LSTAR, 0x12345678])
        assert e.value.index == 0x12345678
        with pytest.raises(MsrError) as e:
            p.vcpu.set_msrs({MSR_LSTAR: 0, 0x12345678: 0})
        assert e.value.index == 0x12345678
