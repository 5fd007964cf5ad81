"""`rrstub doctor` measures the host live and reports every fact the issue asks for."""
from __future__ import annotations

import json

import pytest

from conftest import rrstub

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

PROBES = ("singlestep_cpl0", "singlestep_cpl3", "hw_breakpoint_cpl0", "sw_breakpoint_cpl0",
          "dr7_watchpoint_cpl0", "cpuid_masking_cpl0", "pmu")


def test_doctor_json_reports_every_probe_with_measured_figures():
    r = rrstub("doctor", "--json", timeout=110)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    for name in PROBES:
        assert isinstance(report[name]["works"], bool), name
        assert report[name]["detail"], name
    # Execution control the whole design relies on, on any KVM host.
    assert report["singlestep_cpl0"]["works"]
    assert report["hw_breakpoint_cpl0"]["works"]
    assert report["capabilities"]["IMMEDIATE_EXIT"]
    assert report["cpl0_instructions_per_s"] > 100_000
    assert 0 < report["port_io_exit_raw_us"] < 1000
    # Our typed loop can only add to the bare C loop's cost (allow for noise).
    assert report["port_io_exit_us"] > 0.8 * report["port_io_exit_raw_us"]
    assert report["singlestep_us"] > 0


def test_doctor_text_names_each_fact():
    r = rrstub("doctor", timeout=110)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    for label in ("single-step CPL0", "single-step CPL3", "hw breakpoints", "sw breakpoints",
                  "DR7 watchpoints", "CPUID masking CPL0", "PMU", "CPL0 instructions", "port-I/O exit"):
        assert label in out
    assert "probing single-step at CPL0..." in r.stderr.decode()
