"""Markers: complete machine states at known positions of a recording.

A marker holds the vCPU state (``VcpuState``), every device's state, the
engine's own state (position, virtual clock) and guest pages: all non-zero
pages for the initial marker, the pages the guest dirtied since the previous
marker (KVM dirty log) for the others.  Restoring marker N therefore means
applying the page sets of markers 0..N in order.

Each marker also has a digest that chains the previous marker's digest with
the registers, the devices and the dirtied pages.  Replay recomputes it at
the same position; equal digests mean equal machines (memory included, by
induction from the initial marker), so one comparison per marker verifies
the whole replay so far.

Invariants: a marker is taken only where the vCPU has no half-finished
instruction (``settle`` first); the dirty tracker is reset at every marker,
so "dirtied since the last marker" means the same thing in record and
replay.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Callable, Optional

from vmm import snapshot
from vmm.kvm import VcpuState, decode_vcpu_state, encode_vcpu_state
from vmm.machine import RAM_SLOT, Machine

MARKER_MAGIC = b"RRMK"
MARKER_VERSION = 1
_LEN = struct.Struct("<I")


class MarkerError(Exception):
    """A marker blob cannot be decoded."""


@dataclass(frozen=True, slots=True)
class MarkerState:
    """A decoded marker: what ``restore`` puts back."""
    index: int
    position: int
    engine: dict            # engine-specific: clock base, instruction count, ...
    vcpu: VcpuState
    devices: dict
    pages: bytes            # a vmm.snapshot page set
    digest: bytes
    full: bool


def encode_marker(index: int, position: int, engine: dict, vcpu: VcpuState, devices: dict,
                  pages: bytes, digest: bytes, full: bool) -> bytes:
    head = json.dumps({"index": index, "position": position, "engine": engine, "full": full,
                       "digest": digest.hex()}, sort_keys=True).encode()
    parts = [head, encode_vcpu_state(vcpu), snapshot.encode_devices(devices), pages]
    return snapshot.seal(MARKER_MAGIC, MARKER_VERSION,
                         [b for p in parts for b in (_LEN.pack(len(p)), p)])


def decode_marker(blob: bytes) -> MarkerState:
    try:
        _, payload = snapshot.unseal(blob, MARKER_MAGIC, MARKER_VERSION, "marker")
        r = snapshot.Reader(payload, "marker")
        parts = []
        for _ in range(4):
            (n,) = r.unpack(_LEN)
            parts.append(bytes(r.take(n)))
        r.finish()
        head = json.loads(parts[0])
        return MarkerState(index=head["index"], position=head["position"], engine=head["engine"],
                           vcpu=decode_vcpu_state(parts[1]), devices=snapshot.decode_devices(parts[2]),
                           pages=parts[3], digest=bytes.fromhex(head["digest"]), full=head["full"])
    except (snapshot.SnapshotError, ValueError, KeyError, TypeError) as e:
        raise MarkerError(f"marker cannot be decoded: {e}") from None


def marker_meta(index: int, position: int, guest_ns: int, full: bool, digest: bytes,
                pages: Optional[int], name: Optional[str], origin: str, resume: Optional[str]) -> dict:
    """A MARKER chunk's meta.

    origin: how the marker came to be (start, auto, signal, key, hypercall,
    crop, rebase, branch, guest-start).  resume: for a recording's first
    marker only, what replay still has to do after restoring it: None (the
    state lies between two instructions, nothing pending) or "after_point"
    (the marker was taken inside a point, after its deliveries and before
    its interrupt injection: replay runs the injection).  "landmark" marks
    such a point in the fast engine.
    """
    meta = {"index": index, "position": position, "guest_ns": guest_ns, "full": full,
            "digest": digest.hex(), "pages": pages, "origin": origin}
    if name:
        meta["name"] = name
    if resume:
        meta["resume"] = resume
    return meta


def chain_digest(previous: bytes, vcpu: VcpuState, devices_blob: bytes, pages_digest: int) -> bytes:
    """The marker digest: previous marker, general and system registers, devices, dirtied pages.

    FPU/XSAVE, MSRs and event state are stored in the marker but not hashed:
    the guest reaches them only through registers and memory, which are.
    """
    h = hashlib.blake2b(previous, digest_size=16)
    h.update(repr(vcpu.regs).encode())
    h.update(repr(vcpu.sregs).encode())
    h.update(devices_blob)
    h.update(pages_digest.to_bytes(8, "little"))
    return h.digest()


class MarkerKeeper:
    """Takes markers while recording and verifies them while replaying.

    ``settle`` finishes any I/O the vCPU has pending, so the state read is
    the state between two instructions.
    """

    def __init__(self, machine: Machine, settle: Callable[[], None]):
        self.machine = machine
        self.settle = settle
        self.tracker = snapshot.DirtyTracker(machine.vm, RAM_SLOT, machine.mem.size)
        self.count = 0
        self.last_digest = b""

    def capture(self, position: int, engine: dict, full: bool, name: Optional[str] = None,
                origin: str = "auto", resume: Optional[str] = None) -> tuple[bytes, bytes, dict]:
        """(blob, digest, meta) of the machine now; starts a new dirty interval.

        A full marker starts a recording: at position 0 only the loader has
        written RAM; later (a branch, a guest-started recording) every
        non-zero page is stored and the marker count restarts at 0.
        ``resume`` tells replay what is left to do after restoring it
        (``marker_meta``).
        """
        m = self.machine
        vcpu, devices, devices_blob = self._state_now()
        if full:
            if position == 0:
                pages = snapshot.encode_pages(m.mem, sorted(m.mem.host_written))
            else:
                pages = snapshot.encode_pages(m.mem, snapshot.nonzero_pages(m.mem))
            digest = chain_digest(hashlib.blake2b(pages, digest_size=16).digest(), vcpu, devices_blob, 0)
            self.count = 0
        else:
            pages = snapshot.encode_pages(m.mem, self.tracker.pages())
            digest = self._incremental_digest(vcpu, devices_blob)
        blob = encode_marker(self.count, position, engine, vcpu, devices, pages, digest, full)
        meta = marker_meta(self.count, position, engine.get("guest_ns", 0), full, digest,
                           None if full else len(self.tracker.pages()), name, origin, resume)
        self._advance(digest)
        return blob, digest, meta

    def current_digest(self) -> bytes:
        """What ``capture`` would compute now, without encoding pages: for verification."""
        vcpu, _, devices_blob = self._state_now()
        return self._incremental_digest(vcpu, devices_blob)

    def _state_now(self) -> tuple[VcpuState, dict, bytes]:
        """Settle the vCPU and collect the dirty log; (vCPU state, device states, their encoding)."""
        self.settle()
        self.tracker.collect()
        devices = self.machine.device_states()
        return self.machine.vcpu.get_state(), devices, snapshot.encode_devices(devices)

    def _incremental_digest(self, vcpu: VcpuState, devices_blob: bytes) -> bytes:
        return chain_digest(self.last_digest, vcpu, devices_blob, self.tracker.digest(self.machine.mem))

    def verified(self, digest: bytes) -> None:
        """Replay reached a marker with this digest: start the next interval."""
        self._advance(digest)

    def _advance(self, digest: bytes) -> None:
        self.tracker.reset()
        self.count += 1
        self.last_digest = digest

    def restore(self, state: MarkerState, pages_chain: Optional[list[bytes]] = None) -> None:
        """Put the machine in the marker's state (memory from the page sets of markers 0..N)."""
        m = self.machine
        if state.full:
            m.mem.view[:] = bytes(m.mem.size)
        for pages in (pages_chain or []) + [state.pages]:
            snapshot.apply_pages(m.mem, pages)
        m.vcpu.set_state(state.vcpu)
        m.restore_devices(state.devices)
        self.tracker.collect()
        self.tracker.reset()
        self.count = state.index + 1
        self.last_digest = state.digest
