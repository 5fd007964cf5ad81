"""VMM figures, measured side by side in one run (`make bench`).

Prints:
  * the cost of one port-I/O exit: a bare C KVM_RUN loop (the floor), our
    typed Vcpu.run, and the whole machine loop with device dispatch;
  * the guest's CPL0 instruction rate;
  * timer interrupt latency: from a PIT deadline to the KVM_INTERRUPT that
    delivers IRQ 0, while the guest (examples/build/ticks.elf) computes
    without ever exiting on its own, so every tick needs a kick.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from vmm import boot
from vmm.kvm import Kvm
from vmm.machine import Machine
from vmm.probe import DEC_ECX, OUT_POST, jnz_back, measure_cpl0_rate, measure_exit_cost, mov_ecx

ROOT = Path(__file__).resolve().parent.parent

OUT_STATUS_0 = b"\xb0\x00\xe6\xf4"


class NullSink:
    def write(self, data):
        pass

    def flush(self):
        pass


def machine_exit_cost(kvm: Kvm, exits: int) -> float:
    """us per `out 0x80` exit through Machine.run (bus dispatch to the POST device)."""
    code = mov_ecx(exits) + OUT_POST + DEC_ECX + jnz_back(6) + OUT_STATUS_0
    image = boot.KernelImage.from_code(code, "<bench>")
    with Machine(image, kvm=kvm, serial_out=NullSink()) as m:
        start = time.perf_counter()
        result = m.run(timeout=120)
        elapsed = time.perf_counter() - start
    assert result.status == 0 and result.exits == exits + 1, result
    return elapsed / exits * 1e6


def timer_latency(kvm: Kvm) -> tuple[list[float], int]:
    """Per IRQ 0: us from the PIT deadline to its injection, running ticks.elf."""
    image = boot.load_kernel_file(ROOT / "examples" / "build" / "ticks.elf")
    samples: list[float] = []
    with Machine(image, kvm=kvm, serial_out=NullSink()) as m:
        clock, pic, vcpu = m.clock, m.pic, m.vcpu
        pending_deadline = []
        real_set_irq, real_interrupt = pic.set_irq, vcpu.interrupt

        def set_irq(irq, level):
            if irq == 0 and level and clock.firing_deadline_ns is not None:
                pending_deadline.append(clock.firing_deadline_ns)
            real_set_irq(irq, level)

        def interrupt(vector):
            if vector == pic.master.vector_base and pending_deadline:
                samples.append((clock.now_ns() - pending_deadline.pop(0)) / 1e3)
            real_interrupt(vector)

        pic.set_irq, vcpu.interrupt = set_irq, interrupt
        m.run(timeout=120)
    return samples, len(pending_deadline)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exits", type=int, default=20000, help="port-I/O exits per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median is printed")
    args = ap.parse_args()
    with Kvm() as kvm:
        raw, typed, machine = [], [], []
        for _ in range(args.rounds):
            r, t = measure_exit_cost(kvm, args.exits)
            raw.append(r)
            typed.append(t)
            machine.append(machine_exit_cost(kvm, args.exits))
        rate = measure_cpl0_rate(kvm)
        loop_us = 2 / rate * 1e6
        lat, undelivered = timer_latency(kvm)

    med = statistics.median
    print("rrstub VMM benchmark (medians of %d rounds, %d exits each)" % (args.rounds, args.exits))
    print()
    print("port-I/O exit, guest loop `out 0x80; dec ecx; jnz` (us per exit)")
    print(f"  bare C KVM_RUN loop         {med(raw):7.2f}   (floor: the host's exit cost)")
    print(f"  Vcpu.run (typed exits)      {med(typed):7.2f}   (+{med(typed) - med(raw):.2f} over C)")
    print(f"  Machine.run (bus, devices)  {med(machine):7.2f}   (+{med(machine) - med(raw):.2f} over C, "
          f"{med(machine) / med(raw):.2f}x)")
    print(f"  of which the guest's dec/jnz at the CPL0 rate: {loop_us:.2f}")
    print()
    print(f"guest CPL0 instruction rate   {rate / 1e6:7.2f} M instructions/s (dec; jnz loop)")
    print()
    if lat:
        print(f"timer interrupt latency, busy guest (ticks.elf, {len(lat)} IRQ 0 deliveries)")
        print(f"  deadline -> KVM_INTERRUPT   median {med(lat):.1f} us, p95 {pct(lat, 95):.1f} us, "
              f"max {max(lat):.1f} us")
        if undelivered:
            print(f"  raised but not yet delivered when the guest exited: {undelivered}")
    else:
        print("timer interrupt latency: no IRQ 0 was delivered (is examples/build/ticks.elf built?)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
