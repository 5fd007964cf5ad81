"""What the engines need to know about this host, measured once per boot and cached.

``host_facts()`` runs the few `rrstub doctor` probes that decide how to
record (single-step at CPL0 and CPL3, hardware breakpoints at CPL0, the
speed of guest kernel code and of one step) and keeps the answer in
``$XDG_CACHE_HOME/rrstub/host-facts.json`` for the current boot of this
machine, so that `rrstub record` does not re-measure every time.

``choose_mode()`` is the `--mode auto` rule, with the reason in words.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from vmm.kvm import Kvm, default_kvm_path
from vmm.probe import measure_cpl0_rate, probe_hw_breakpoint, probe_singlestep, probe_syscall_privilege

CACHE_VERSION = 2
# Exact recording is picked when stepping every instruction costs at most this
# many times running the guest live.
EXACT_MAX_SLOWDOWN = 8.0


@dataclass(frozen=True)
class HostFacts:
    singlestep_cpl0: bool
    singlestep_cpl3: bool
    hw_breakpoint_cpl0: bool
    cpl0_instructions_per_s: float
    singlestep_us: float
    syscall_keeps_user_cs: bool = False   # kvm_pvm: syscall from CPL3 leaves CS/SS at user privilege

    @property
    def exact_slowdown(self) -> float:
        """How many times slower than live the exact engine runs guest kernel code here."""
        return self.singlestep_us * self.cpl0_instructions_per_s / 1e6


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rrstub" / "host-facts.json"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def host_facts(kvm_path: Optional[str] = None, refresh: bool = False) -> HostFacts:
    path = kvm_path or default_kvm_path()
    key = {"version": CACHE_VERSION, "boot_id": _boot_id(), "kvm": path}
    cache = _cache_path()
    if not refresh and key["boot_id"]:
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return HostFacts(**saved["facts"])
        except (OSError, ValueError, TypeError, KeyError):
            pass
    with Kvm(path) as kvm:
        ss0, step_us = probe_singlestep(kvm, cpl3=False)
        ss3, _ = probe_singlestep(kvm, cpl3=True)
        hw = probe_hw_breakpoint(kvm)
        rate = measure_cpl0_rate(kvm)
        _, keeps_user_cs = probe_syscall_privilege(kvm)
    facts = HostFacts(ss0.works, ss3.works, hw.works, rate, step_us, syscall_keeps_user_cs=keeps_user_cs)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "facts": asdict(facts)}))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home only costs re-measuring next time
    return facts


def choose_mode(f: HostFacts) -> tuple[str, str]:
    """(mode, why) for --mode auto."""
    if not f.singlestep_cpl0 and not f.hw_breakpoint_cpl0:
        return "fast", ("this host can neither single-step nor break on execution at guest CPL0; "
                        "fast recording works, but replaying or debugging the recording needs a host "
                        "that can (`rrstub doctor`)")
    if not f.singlestep_cpl0:
        return "fast", ("this host cannot single-step guest kernel code; the fast recording replays "
                        "here, but debugging it (which replays it instruction by instruction) needs a "
                        "host that can single-step")
    if not f.hw_breakpoint_cpl0:
        return "exact", ("this host has no hardware execution breakpoints at guest CPL0, which "
                         "replaying a fast recording needs")
    slowdown = f.exact_slowdown
    if slowdown <= EXACT_MAX_SLOWDOWN:
        return "exact", (f"stepping every instruction costs only about {slowdown:.1f}x live here "
                         "(guest kernel code is emulated anyway), and exact also makes "
                         "rdtsc/rdrand/cpuid deterministic")
    return "fast", (f"stepping every instruction would cost about {slowdown:.0f}x live here "
                    f"(more than {EXACT_MAX_SLOWDOWN:g}x), so fast records at near live speed and "
                    "debugging replays the recording instruction by instruction. Fast runs rdtsc, "
                    "rdrand and cpuid at guest CPL0 on the host: use --mode exact for guests that "
                    "read the TSC")
