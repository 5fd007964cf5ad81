"""The rrstub machine: one vCPU, guest RAM, and our userspace PC devices.

Owns the wiring (which device sits at which port and IRQ line), the run loop
and exit dispatch, interrupt injection, halting, serial input, and the
reports a user sees when the guest dies.

Invariants:
* No KVM in-kernel device is used: every interrupt comes from our PIC and is
  injected with KVM_INTERRUPT at an open interrupt window.
* Every timed device reads ``self.clock``; a timer that falls due while the
  guest runs without exiting kicks the vCPU out of KVM_RUN (deadline timer
  in native/rrnative.c), so timers fire even in a busy guest.
* Serial input never overruns the UART: bytes wait in ``SerialInput`` until
  the FIFO has room (back-pressure), and only enter the guest at an exit.
"""
from __future__ import annotations

import collections
import os
import select
import sys
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Optional

from vmm import boot, cpuid
from vmm.boot import acpi as acpi_tables
from vmm.boot.kernel import Kernel
from vmm.bus import PortBus
from vmm.clock import Clock, HostClock
from vmm.devices.acpi import AcpiPm
from vmm.devices.hypercall import HYPERCALL_PORT, HypercallPort
from vmm.devices.misc import DebugExit, I8042, PostCode
from vmm.devices.pic import PicPair
from vmm.devices.pit import Pit8254
from vmm.devices.rtc import CmosRtc
from vmm.devices.serial import Serial16550
from vmm.diagnostics import disassemble_one, format_exits, format_registers
from vmm.kvm import (Debug, FailEntry, Hlt, InternalError, Interrupted, IoIn, IoOut,
                     IrqWindowOpen, Kvm, MmioRead, MmioWrite, Shutdown, SystemEvent,
                     UnknownExit, Vcpu, host_monotonic_ns)
from vmm.memory import GuestMemory
from vmm.paging import PageFault, read_virtual, virt_to_phys
from vmm._native import lib

PIC_MASTER = 0x20
PIC_SLAVE = 0xA0
PIT_BASE, PIT_IRQ = 0x40, 0
I8042_BASE = 0x60
RTC_BASE, RTC_IRQ = 0x70, 8
POST_PORT = 0x80
DEBUG_EXIT_PORT = 0xF4
COM1, COM1_IRQ = 0x3F8, 4

DEFAULT_MEM = 64 << 20
RAM_SLOT = 0
# The devices whose state a marker holds (attribute names on Machine).
DEVICE_NAMES = ("pic", "pit", "port_b", "rtc", "serial", "i8042", "post", "debug_exit", "acpi_pm")
# Devices added after recordings were made.  A marker holds one only once the
# guest has moved it from its power-on state, so a guest that never touches
# it has the machine state (and marker digests) it had before the device
# existed; a marker without one restores it to power-on (port_b after pit,
# whose channel 2 it completes).
LATER_DEVICES = ("port_b", "acpi_pm")
RECENT_EXITS = 16
REPAIR_REFRESH_NS = 250_000_000   # how often the live loop re-reads the guest's page-fault entry

# `rrstub run` exit statuses for outcomes that are not the guest's own.
EXIT_CRASH = 70      # triple fault, emulation failure, KVM internal error
EXIT_HUNG = 71       # halted with no way to wake up
EXIT_TIMEOUT = 124   # still running at --timeout (as timeout(1))


class MachineError(Exception):
    """The machine stopped for a reason that is not the guest's choice."""

    exit_code = EXIT_CRASH


class GuestCrashed(MachineError):
    exit_code = EXIT_CRASH


class GuestHung(MachineError):
    exit_code = EXIT_HUNG


class GuestTimeout(MachineError):
    exit_code = EXIT_TIMEOUT


@dataclass(frozen=True, slots=True)
class RunResult:
    reason: str          # "exit": debug-exit port; "reset": i8042 reset line; "poweroff": ACPI S5
    status: int          # the value the guest wrote to the debug-exit port (0 on reset)
    exits: int           # KVM exits handled
    guest_ns: int        # virtual time at the stop


class SerialInput:
    """Host bytes waiting to enter the UART, read from a file or pipe by a thread.

    The reader wakes the machine (``wake`` event and a vCPU ``kick``) when
    bytes arrive, and stops for good on ``close()``.
    """

    def __init__(self, source: BinaryIO, wake: threading.Event, kick: Callable[[], None]):
        self._source = source
        self._wake = wake
        self._kick = kick
        self._chunks: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        self.eof = False
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._reader, name="serial-input", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        fd = self._source.fileno()
        try:
            while True:
                ready, _, _ = select.select([fd, self._stop_r], [], [])
                if self._stop_r in ready:
                    return
                data = os.read(fd, 4096)
                if not data:
                    break
                with self._lock:
                    self._chunks.append(data)
                self._wake.set()
                self._kick()
        except OSError:
            pass
        self.eof = True
        self._wake.set()
        self._kick()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        os.close(self._stop_r)
        os.close(self._stop_w)

    @property
    def pending(self) -> bool:
        return bool(self._chunks)

    def take(self, limit: int) -> bytes:
        with self._lock:
            if not self._chunks:
                return b""
            head = self._chunks[0]
            if len(head) <= limit:
                return self._chunks.popleft()
            self._chunks[0] = head[limit:]
            return head[:limit]

    def give_back(self, data: bytes) -> None:
        if data:
            with self._lock:
                self._chunks.appendleft(data)


class SerialOutput:
    """Guest UART bytes to a host stream, flushed at line ends and when the guest idles.

    If the reader goes away (``rrstub run ... | head``), the rest of the
    guest's output is discarded with one warning; the guest runs on.
    """

    def __init__(self, stream: BinaryIO, warn: Callable[[str], None]):
        self._stream = stream
        self._warn = warn
        self.bytes = 0
        self.broken = False

    def __call__(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.broken:
            return
        try:
            self._stream.write(data)
            if b"\n" in data:
                self._stream.flush()
        except BrokenPipeError:
            self._break()

    def flush(self) -> None:
        if self.broken:
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._break()

    def _break(self) -> None:
        self.broken = True
        self._warn("serial output reader went away (broken pipe): discarding the guest's further output")
        # Point the descriptor at /dev/null so the buffered bytes left in the
        # stream cannot fail again when it is flushed at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass


class Machine:
    def __init__(self, kernel, mem_size: int = DEFAULT_MEM, cmdline: str = "",
                 serial_in: Optional[BinaryIO] = None, serial_out: Optional[BinaryIO] = None,
                 warn: Callable[[str], None] = lambda msg: print(f"rrstub: {msg}", file=sys.stderr),
                 kvm: Optional[Kvm] = None, clock: Optional[Clock] = None,
                 rtc_epoch_ns: Optional[int] = None, dirty_log: bool = False):
        self.kernel = kernel
        self.warn = warn
        self.kvm = self.vm = self.mem = self.serial_in = None
        self._own_kvm = kvm is None
        try:
            self._build(kernel, mem_size, cmdline, serial_in, serial_out, kvm, clock,
                        time.time_ns() if rtc_epoch_ns is None else rtc_epoch_ns, dirty_log)
        except BaseException:
            self.close()
            raise

    def _build(self, kernel, mem_size, cmdline, serial_in, serial_out, kvm, clock, rtc_epoch_ns,
               dirty_log) -> None:
        self.kvm = kvm or Kvm()
        self.vm = self.kvm.create_vm()
        self.mem = GuestMemory(mem_size)
        self.vm.set_user_memory_region(RAM_SLOT, 0, mem_size, self.mem.host_addr,
                                       lib.KVM_MEM_LOG_DIRTY_PAGES if dirty_log else 0)
        self.vcpu: Vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid(cpuid.kvm_entries())
        self.boot = kernel if isinstance(kernel, Kernel) else Kernel.from_image(kernel)
        regs, sregs = self.boot.load(self.mem, self.vcpu.get_sregs(), cmdline)
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(regs)

        # A recorder or replayer brings its own clock; a live run reads the host.
        self.clock = clock if clock is not None else HostClock()
        self.rtc_epoch_ns = rtc_epoch_ns
        self._wake = threading.Event()
        self._stop: Optional[tuple[str, int]] = None
        self.exits = 0
        self.emulated: dict[str, int] = {}     # instructions performed by vmm.emulate, by mnemonic
        self.syscall_repair = None             # vmm.syscallfix, when the host needs it (repair_syscalls)
        self.recent_exits: collections.deque = collections.deque(maxlen=RECENT_EXITS)

        # The PIC tells us when its INT output changes, so the loop tests a
        # flag per exit instead of rescanning priorities.
        self._intr = False
        self.pic = PicPair(self._on_intr)
        self.serial_out = SerialOutput(serial_out if serial_out is not None else sys.stdout.buffer, self.warn)
        self.serial = Serial16550(lambda level: self.pic.set_irq(COM1_IRQ, level), self.serial_out)
        self.pit = Pit8254(self.clock, lambda level: self.pic.set_irq(PIT_IRQ, level))
        self.rtc = CmosRtc(self.clock, lambda level: self.pic.set_irq(RTC_IRQ, level), rtc_epoch_ns)
        self.hypercalls = HypercallPort(self.vcpu.get_regs, self.vcpu.set_regs, self.warn)
        self.bus = PortBus()
        self.bus.insert(self.pic.master, PIC_MASTER, 2)
        self.bus.insert(self.pic.slave, PIC_SLAVE, 2)
        self.bus.insert(self.pit, PIT_BASE, 4)
        self.i8042 = I8042(self._on_reset, self.pit.port_b_read, self.pit.port_b_write)
        self.acpi_pm = AcpiPm(self._on_power_off)
        self.port_b = self.pit.port_b
        self.post = PostCode()
        self.debug_exit = DebugExit(self._on_debug_exit)
        self.bus.insert(self.i8042, I8042_BASE, 5)
        self.bus.insert(self.rtc, RTC_BASE, 2)
        self.bus.insert(self.post, POST_PORT, 1)
        self.bus.insert(self.debug_exit, DEBUG_EXIT_PORT, 1)
        self.bus.insert(self.serial, COM1, 8)
        self.bus.insert(self.hypercalls, HYPERCALL_PORT, 4)
        self.bus.insert(self.acpi_pm, acpi_tables.PM1A_EVT_PORT, acpi_tables.PM_PORT_COUNT)
        self._power_on = {name: getattr(self, name).state() for name in LATER_DEVICES}

        self._window_requested = False
        self.injections = 0
        self.last_vector = 0            # the vector of the last interrupt given to the vCPU
        self._end_ns: Optional[int] = None
        # Exit dispatch, shared by the live loop and the record/replay engines
        # (which handle Hlt, Interrupted and interrupt windows themselves).
        self.handlers = {
            IoOut: self._on_io_out, IoIn: self._on_io_in, Hlt: self._on_hlt,
            Interrupted: _ignore, IrqWindowOpen: _ignore,
            MmioRead: self._on_mmio_read, MmioWrite: _ignore,
            Shutdown: self._on_shutdown, InternalError: self._on_internal_error,
            FailEntry: self._on_fail_entry, Debug: self._on_unexpected,
            SystemEvent: self._on_system_event, UnknownExit: self._on_unexpected,
        }
        if serial_in is not None:
            self.serial_in = SerialInput(serial_in, self._wake, self.vcpu.kick)

    def attach_serial_in(self, stream: BinaryIO) -> None:
        """Start feeding the UART from ``stream`` (a replay that goes live)."""
        if self.serial_in is not None:
            self.serial_in.close()
        self.serial_in = SerialInput(stream, self._wake, self.vcpu.kick)

    def repair_syscalls(self) -> None:
        """Finish user-mode syscalls this host's KVM leaves at user privilege (live runs only)."""
        from vmm.syscallfix import SyscallRepair
        self.syscall_repair = SyscallRepair(self.vcpu, self.mem)

    # -- device state (markers) --------------------------------------------
    def device_states(self) -> dict:
        """Every device's state, by name: the device half of a marker."""
        states = {name: getattr(self, name).state() for name in DEVICE_NAMES}
        for name in LATER_DEVICES:
            if states[name] == self._power_on[name]:
                del states[name]
        return states

    def restore_devices(self, states: dict) -> None:
        missing = [name for name in DEVICE_NAMES if name not in states and name not in LATER_DEVICES]
        if missing:
            raise ValueError(f"device state lacks {', '.join(missing)}")
        for name in DEVICE_NAMES:
            getattr(self, name).restore(states[name] if name in states else self._power_on[name])
        self._intr = self.pic.has_interrupt()
        self._window_requested = False
        self.vcpu.request_interrupt_window(False)

    # -- device callbacks --------------------------------------------------
    def _on_intr(self, level: bool) -> None:
        self._intr = level

    def _on_debug_exit(self, value: int) -> None:
        self._stop = ("exit", value)

    def _on_reset(self) -> None:
        self._stop = ("reset", 0)

    def _page_fault_entry(self, repair, deadline):
        """The live loop stopped at the guest's page-fault entry (``vmm.syscallfix``).

        A broken syscall is finished there; any other fault goes on by one
        step with the breakpoint cleared.  Returns the exit that step ended
        with when it is not the step's own debug exit (an I/O exit of the
        handler's first instruction, say), for the caller to handle.
        """
        if repair.repair():
            return None
        repair.single_step_flags()
        try:
            exit = self.vcpu.run(0 if deadline is None else self.clock.to_host_ns(deadline))
        finally:
            repair.rearm()
        return None if isinstance(exit, Debug) else exit

    def _on_power_off(self) -> None:
        self._stop = ("poweroff", 0)

    # -- the run loop --------------------------------------------------------
    def run(self, timeout: Optional[float] = None) -> RunResult:
        """Run until the guest exits or resets; raise MachineError otherwise."""
        vcpu, clock = self.vcpu, self.clock
        vcpu.attach_kicks()
        # --timeout is host seconds; a live clock may run faster or slower (--clock-rate).
        end_ns = self._end_ns = (None if timeout is None
                                 else clock.now_ns() + int(timeout * 1e9 * getattr(clock, "rate", 1.0)))
        handlers = self.handlers
        to_host_ns = clock.to_host_ns
        recent = self.recent_exits
        try:
            repair = self.syscall_repair
            refresh_at = 0
            while self._stop is None:
                self._poll_devices()
                self.inject()
                deadline = self._until_timeout(clock.next_deadline())
                if repair is not None and host_monotonic_ns() >= refresh_at:
                    repair.refresh()
                    refresh_at = host_monotonic_ns() + REPAIR_REFRESH_NS
                exit = vcpu.run(0 if deadline is None else to_host_ns(deadline))
                self.exits += 1
                recent.append(exit)
                if repair is not None and repair.is_hit(exit):
                    exit = self._page_fault_entry(repair, deadline)
                    if exit is None:
                        continue
                    self.exits += 1
                    recent.append(exit)
                handlers[type(exit)](exit)
                if end_ns is not None and clock.now_ns() >= end_ns and self._stop is None:
                    raise GuestTimeout(self._timeout_report(timeout))
        finally:
            vcpu.detach_kicks()
            self.serial_out.flush()
        reason, status = self._stop
        return RunResult(reason, status, self.exits, clock.now_ns())

    def inject(self, window: bool = True) -> None:
        """Give the guest the PIC's interrupt if it can take one now; else, if ``window``,
        ask KVM for an exit when it can (``injections`` counts the interrupts given)."""
        vcpu = self.vcpu
        if self._intr and vcpu.ready_for_injection and vcpu.if_flag:
            self.last_vector = self.pic.acknowledge()
            vcpu.interrupt(self.last_vector)
            vcpu.ready_for_injection = False
            self.injections += 1
        want = self._intr and window
        if want != self._window_requested:
            vcpu.request_interrupt_window(want)
            self._window_requested = want

    def _poll_devices(self) -> None:
        """Fire due timers and move waiting host input into the UART."""
        self.clock.run_due()
        if self.serial_in is not None and self.serial_in.pending:
            self._feed_serial()

    def _until_timeout(self, deadline: Optional[int]) -> Optional[int]:
        """The earlier of ``deadline`` and the --timeout end (None: neither)."""
        if self._end_ns is None:
            return deadline
        return self._end_ns if deadline is None else min(deadline, self._end_ns)

    def _feed_serial(self) -> None:
        room = self.serial.rx_room()
        if room:
            data = self.serial_in.take(room)
            accepted = self.serial.receive(data)
            self.serial_in.give_back(data[accepted:])

    # -- exit handlers --------------------------------------------------------
    def _on_io_out(self, exit: IoOut) -> None:
        size, data, write = exit.size, exit.data, self.bus.write
        if exit.count == 1:
            write(exit.port, size, int.from_bytes(data, "little"))
        else:
            for i in range(0, len(data), size):
                write(exit.port, size, int.from_bytes(data[i:i + size], "little"))

    def _on_io_in(self, exit: IoIn) -> None:
        size, read = exit.size, self.bus.read
        data = b"".join(read(exit.port, size).to_bytes(size, "little") for _ in range(exit.count))
        self.vcpu.complete_io_in(data)

    def _on_mmio_read(self, exit: MmioRead) -> None:
        self.vcpu.complete_mmio_read(b"\xff" * exit.length)

    def halted_with_interrupts_off(self) -> GuestHung:
        return GuestHung(self._report(
            "the guest halted with interrupts disabled (cli; hlt): nothing can wake it up. "
            "A kernel that is done should write its exit status to the debug-exit port 0xf4."))

    def halted_for_good(self) -> GuestHung:
        return GuestHung(self._report(
            "the guest halted waiting for an interrupt, but no timer is armed and no more "
            "serial input can arrive (give it input with --serial-in, or check its PIC masks)"))

    def _on_hlt(self, exit: Hlt) -> None:
        if not self.vcpu.if_flag:
            raise self.halted_with_interrupts_off()
        self.serial_out.flush()
        clock = self.clock
        while self._stop is None:
            self._poll_devices()
            if self._intr:
                return
            deadline = clock.next_deadline()
            if deadline is None and not self.input_can_wake():
                raise self.halted_for_good()
            if self._end_ns is not None and clock.now_ns() >= self._end_ns:
                return  # run() reports the timeout
            deadline = self._until_timeout(deadline)
            self.idle_wait(None if deadline is None else deadline - clock.now_ns())

    def input_can_wake(self) -> bool:
        """Input can wake a halted guest: the UART can take it (RTS up, not in
        loopback, FIFO not full) and some is, or may yet be, there."""
        return (self.serial_in is not None and self.serial.rx_room() > 0
                and (self.serial_in.pending or not self.serial_in.eof))

    def input_waiting(self) -> bool:
        """Host input is here and the UART has room for it."""
        return self.serial_in is not None and self.serial_in.pending and self.serial.rx_room() > 0

    def idle_wait(self, ns: Optional[int]) -> None:
        """Block for up to ``ns`` nanoseconds (None: without limit), or until input or a kick wakes us."""
        self._wake.wait(None if ns is None else max(0, ns) / 1e9)
        self._wake.clear()

    def _on_shutdown(self, exit: Shutdown) -> None:
        raise GuestCrashed(self._report(
            "the guest triple-faulted (KVM_EXIT_SHUTDOWN): an exception occurred while it could "
            "not deliver exceptions, typically no valid IDT, a bad stack, or a fault in the "
            "double-fault handler"))

    def emulate_failed(self):
        """After KVM could not emulate the instruction at rip: perform it ourselves (vmm.emulate).

        On success the vCPU holds the state after the instruction (and an
        exception it raises is queued for delivery); None: not one we can.
        """
        try:
            from vmm import emulate
        except ImportError:         # the emulator is not part of this build yet
            return None
        cpu = VcpuCpu(self.vcpu, self.mem)
        try:
            code = cpu.read(cpu.linear_rip(), 15)
        except PageFault:
            try:
                code = cpu.read(cpu.linear_rip(), 1)
            except PageFault:
                return None
        done = emulate.emulate(code, cpu)
        if done is None:
            return None
        cpu.commit(done)
        self.emulated[done.mnemonic] = self.emulated.get(done.mnemonic, 0) + 1
        return done

    def _on_internal_error(self, exit: InternalError) -> None:
        if exit.is_emulation_failure and self.emulate_failed() is not None:
            return
        if exit.is_emulation_failure:
            regs, sregs = self.vcpu.get_regs(), self.vcpu.get_sregs()
            try:
                paddr = virt_to_phys(self.mem, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, regs.rip)
            except PageFault:
                paddr = None
            if paddr is not None and paddr >= self.mem.size:
                raise GuestCrashed(self._report(
                    f"the guest jumped to rip {regs.rip:#x} (physical {paddr:#x}), which is not "
                    f"guest RAM (RAM ends at {self.mem.size:#x}): KVM found no instruction to "
                    "execute there (KVM internal error: emulation failure)"))
            raise GuestCrashed(self._report(
                "the host KVM could not emulate a guest instruction (KVM internal error: "
                "emulation failure).", instruction=True,
                advice="This host's KVM emulates guest kernel code and does not support this "
                       "instruction (run `rrstub doctor` to see what the host can do); run the "
                       "guest on a host with hardware virtualization (VMX/SVM) or avoid the "
                       "instruction in the guest."))
        raise GuestCrashed(self._report(
            f"KVM internal error, suberror {exit.suberror}, data "
            f"{' '.join(f'{d:#x}' for d in exit.data) or '(none)'}", instruction=True))

    def _on_fail_entry(self, exit: FailEntry) -> None:
        raise GuestCrashed(self._report(
            f"KVM could not enter the guest (hardware entry failure reason {exit.hardware_reason:#x}): "
            "the vCPU state is invalid"))

    def _on_system_event(self, exit: SystemEvent) -> None:
        self._stop = ("reset", 0)

    def _on_unexpected(self, exit) -> None:
        raise GuestCrashed(self._report(f"unexpected KVM exit {exit!r}"))

    # -- reports ----------------------------------------------------------------
    def _instruction_text(self, regs, sregs) -> str:
        try:
            code = read_virtual(self.mem, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, regs.rip, 15)
        except PageFault as e:
            return f"  instruction bytes unavailable: {e}"
        text, length = disassemble_one(code, regs.rip)
        shown = code[:length] if length else code[:8]
        return f"  instruction at rip {regs.rip:#x} (CPL{sregs.cpl}): {shown.hex(' ')}    {text}"

    def _report(self, what: str, instruction: bool = False, advice: str = "") -> str:
        regs, sregs = self.vcpu.get_regs(), self.vcpu.get_sregs()
        parts = [what]
        if instruction:
            parts.append(self._instruction_text(regs, sregs))
        if advice:
            parts.append(advice)
        parts.append("registers:\n" + format_registers(regs, sregs))
        parts.append(f"last {len(self.recent_exits)} of {self.exits} exits (oldest first):\n"
                     + format_exits(self.recent_exits))
        return "\n".join(parts)

    def _timeout_report(self, timeout: float) -> str:
        return self._report(f"the guest was still running after --timeout {timeout:g} s "
                            f"({self.exits} exits, {self.serial_out.bytes} serial bytes out)")

    def close(self) -> None:
        """Release everything; safe after a failed construction and when called twice."""
        if self.serial_in is not None:
            self.serial_in.close()
            self.serial_in = None
        if self.vm is not None:
            self.vm.close()
        if self.mem is not None:
            self.mem.close()
        if self._own_kvm and self.kvm is not None:
            self.kvm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ignore(exit) -> None:
    pass


class VcpuCpu:
    """The vCPU and guest memory as ``vmm.emulate`` sees them (its ``Cpu``): state is read
    from KVM once, changed in place, and written back by ``commit``."""

    def __init__(self, vcpu: Vcpu, mem: GuestMemory):
        self.vcpu, self.mem = vcpu, mem
        self.regs = vcpu.get_regs()
        self.sregs = vcpu.get_sregs()
        self._fpu: Optional[bytearray] = None
        self._fpu_dirty = False
        self.xcr0 = 0x3             # x87 | SSE: the CPUID rrstub offers has no AVX
        self.xss = None             # IA32_XSS unknown: XSAVES/XRSTORS are not emulated

    def linear_rip(self) -> int:
        return (self.sregs.cs.base + self.regs.rip) & 0xFFFF_FFFF_FFFF_FFFF

    def _phys(self, vaddr: int, n: int) -> list[tuple[int, int]]:
        s, out = self.sregs, []
        while n > 0:
            chunk = min(n, 4096 - (vaddr & 0xFFF))
            paddr = virt_to_phys(self.mem, s.cr0, s.cr3, s.cr4, s.efer, vaddr)
            if paddr + chunk > self.mem.size:
                raise PageFault(vaddr, 0, f"maps to physical {paddr:#x}, outside RAM")
            out.append((paddr, chunk))
            vaddr += chunk
            n -= chunk
        return out

    def read(self, vaddr: int, n: int) -> bytes:
        return b"".join(self.mem.read(p, c) for p, c in self._phys(vaddr, n))

    def write(self, vaddr: int, data: bytes) -> None:
        at = 0
        for p, c in self._phys(vaddr, len(data)):
            self.mem.write(p, data[at:at + c])
            at += c

    def fpu(self) -> bytes:
        if self._fpu is None:
            self._fpu = bytearray(self.vcpu.get_xsave())
        return bytes(self._fpu)

    def set_fpu(self, area: bytes) -> None:
        self._fpu = bytearray(area)
        self._fpu_dirty = True

    def commit(self, done) -> None:
        """Write back what the emulated instruction changed, and queue its exception."""
        if self._fpu_dirty and self._fpu is not None:
            self.vcpu.set_xsave(bytes(self._fpu))
        self.vcpu.set_regs(self.regs)
        if done.exception is not None:
            vector, code = done.exception
            if done.cr2 is not None:
                from dataclasses import replace
                self.vcpu.set_sregs(replace(self.vcpu.get_sregs(), cr2=done.cr2))
            self.vcpu.inject_exception(vector, code)
