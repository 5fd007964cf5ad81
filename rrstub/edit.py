"""Editing recordings: crop, rebase (rolling and quota recording), position labels.

A recording is a chain: the initial marker holds every page, each later
marker the pages dirtied since the one before, and every event after a
marker in file order happens after that marker's state.  So a recording
can start at any marker M: rebuild M's memory from the page sets of
markers 0..M, store it as a full marker, and keep the chunks that follow M
in the file, renumbering markers so that M becomes marker 0.

The new first marker keeps M's digest, so the digest chain of the markers
after it is unchanged and replay verifies them as in the original.  M was
taken inside a point (after its deliveries, before its interrupt
injection); the point that carries it is dropped from the log and the
marker says ``resume: after_point``, which makes replay run that
injection after restoring it.

Crop also ends at a marker B: the log keeps the point that carries B (so
replay verifies B's digest there) and ends with ``End(reason="cropped")``
at B's position.

Labels name positions found during replay (``monitor marker add``); they
live in the END chunk's meta, so adding one rewrites the file's tail into
a new file that replaces the old one atomically.
"""
from __future__ import annotations

import dataclasses
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

from rrstub import events as ev
from rrstub.markers import MarkerError, decode_marker, encode_marker
from rrstub.recording import ChunkKind, Recording, RecordingWriter, check_output
from vmm import snapshot

class EditError(Exception):
    """The edit cannot be made as asked; the message names the input and what to do."""


def new_id() -> str:
    """A recording's identity, named by its branches and crops."""
    return uuid.uuid4().hex


def recording_id(rec: Recording) -> str:
    """The recording's id; recordings made before ids existed get one from their config."""
    rid = rec.config.get("id")
    if isinstance(rid, str):
        return rid
    return uuid.uuid5(uuid.NAMESPACE_OID, repr(sorted(rec.config.items()))).hex


def find_marker(rec: Recording, text: str, what: str) -> int:
    """The index of the recorded marker ``text`` names: mN, its name, or its position."""
    t = text.strip()
    if t[:1] in "mM" and t[1:].isdigit():
        index = int(t[1:])
        if index < len(rec.markers):
            return index
    for i, m in enumerate(rec.markers):
        if m.meta.get("name") == t:
            return i
    if t.isdigit():
        for i, m in enumerate(rec.markers):
            if m.meta["position"] == int(t):
                return i
    names = ", ".join(f"m{i}" + (f" ({m.meta['name']})" if m.meta.get("name") else "")
                      + f" at {m.meta['position']}" for i, m in enumerate(rec.markers[:12]))
    more = f" and {len(rec.markers) - 12} more" if len(rec.markers) > 12 else ""
    labels = [x["name"] for x in rec.labels]
    hint = (f"; {', '.join(labels)} {'is a label' if len(labels) == 1 else 'are labels'} "
            "(a position named during replay, with no snapshot): a crop must start and end at a "
            "recorded marker") if t in labels else ""
    raise EditError(f"{what} {text!r}: {rec.path} has no such marker{hint}. It has markers "
                    f"m0..m{len(rec.markers) - 1}: {names}{more} (`rrstub info` lists them)")


def _state(rec: Recording, index: int):
    try:
        return decode_marker(rec.payload(rec.markers[index]))
    except MarkerError as e:
        raise EditError(f"{rec.path}: marker m{index} at byte offset {rec.markers[index].offset} "
                        f"is unusable: {e}") from None


def full_marker(rec: Recording, index: int, resume: Optional[str],
                progress: Callable[[str], None] = lambda m: None) -> tuple[bytes, dict]:
    """Marker ``index`` of ``rec`` as a full marker numbered 0: (blob, meta)."""
    mem = bytearray(rec.config["mem_size"])
    state = None
    for i in range(index + 1):
        state = _state(rec, i)
        if state.full:
            mem[:] = bytes(len(mem))
        snapshot.apply_pages(mem, state.pages)
        if i and i % 50 == 0:
            progress(f"rebuilding memory: marker {i} of {index}")
    pages = snapshot.encode_pages(mem, snapshot.nonzero_pages(mem))
    blob = encode_marker(0, state.position, state.engine, state.vcpu, state.devices, pages,
                         state.digest, True)
    old = rec.markers[index].meta
    meta = {"index": 0, "position": state.position, "guest_ns": old.get("guest_ns", 0), "full": True,
            "digest": state.digest.hex(), "pages": None, "origin": old.get("origin", "auto")}
    if old.get("name"):
        meta["name"] = old["name"]
    if resume:
        meta["resume"] = resume
    return blob, meta


@dataclass
class Copied:
    markers: int = 0
    counts: dict = field(default_factory=dict)
    end: Optional[ev.End] = None
    last_position: int = 0
    summary: Optional[dict] = None


def _carrying_point(rec: Recording, index: int) -> Optional[ev.Point]:
    """The Point that carries marker ``index`` (it follows the marker in the file)."""
    start = rec.markers[index].offset
    for chunk in rec.event_chunks:
        if chunk.offset < start:
            continue
        for e in ev.decode_events(rec.payload(chunk)):
            if isinstance(e, ev.Point) and e.marker == index:
                return e
    return None


def resume_of(rec: Recording, index: int) -> Optional[str]:
    """What replay must still do after restoring marker ``index`` as a first marker."""
    if index == 0:
        return rec.markers[0].meta.get("resume")
    point = _carrying_point(rec, index)
    if point is None:
        raise EditError(f"{rec.path}: marker m{index} has no point in the log after it (the "
                        "recording ends right there); pick an earlier marker")
    return "after_landmark" if point.landmark is not None else "after_point"


def copy_from_marker(rec: Recording, writer: RecordingWriter, first: int, last: Optional[int] = None,
                     progress: Callable[[str], None] = lambda m: None,
                     resume: Optional[str] = None) -> Copied:
    """Write ``rec`` from marker ``first`` (as marker 0) to ``writer``; up to marker ``last`` if given.

    Without ``last`` everything after the marker is copied, the END summary
    included in ``Copied.summary`` (not written: the caller finishes).
    """
    blob, meta = full_marker(rec, first, resume or resume_of(rec, first), progress)
    writer.add_marker(meta, blob)
    out = Copied(markers=1, last_position=meta["position"])
    start = rec.markers[first].offset
    chunks = [c for c in rec.chunks if c.offset > start]
    for n, chunk in enumerate(chunks):
        if n and n % 200 == 0:
            progress(f"copying chunk {n} of {len(chunks)}")
        if chunk.kind is ChunkKind.MARKER:
            index = chunk.meta["index"]
            if last is not None and index > last:
                break
            state = _state(rec, index)
            blob = encode_marker(index - first, state.position, state.engine, state.vcpu, state.devices,
                                 state.pages, state.digest, state.full)
            writer.add_marker(dict(chunk.meta, index=index - first), blob)
            out.markers += 1
        elif chunk.kind is ChunkKind.EVENTS:
            encoder = ev.EventEncoder()
            done = False
            for e in ev.decode_events(rec.payload(chunk)):
                if isinstance(e, ev.Point) and e.marker is not None:
                    if e.marker == first:
                        continue        # delivered already: its state is the first marker
                    e = dataclasses.replace(e, marker=e.marker - first)
                    done = last is not None and e.marker + first == last
                if isinstance(e, ev.End):
                    out.end = e
                encoder.add(e)
                ev.count(out.counts, e)
                out.last_position = max(out.last_position, e.pos)
                if done:
                    break
            first_pos, count, payload = encoder.take()
            covered = out.last_position if done else chunk.meta["last"]
            if count or not done:
                writer.add_events(covered if first_pos is None else first_pos, covered, count, payload)
            out.last_position = max(out.last_position, covered)
            if done:
                break
        elif chunk.kind is ChunkKind.END:
            out.summary = dict(chunk.meta)
    return out


def derived_config(rec: Recording, how: str, first: int, **extra) -> dict:
    config = dict(rec.config)
    m = rec.markers[first].meta
    config["id"] = new_id()
    config["derived"] = dict({"how": how, "from_id": recording_id(rec),
                              "from_file": os.path.basename(rec.path), "from_marker": first,
                              "position": m["position"], "guest_ns": m.get("guest_ns", 0),
                              "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, **extra)
    return config


def _tmp_near(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.{os.getpid()}.tmp")


def crop(src: str, out: str, start: str, stop: str,
         progress: Callable[[str], None] = lambda m: None, force: bool = False) -> dict:
    """``rrstub crop``: the part of ``src`` between two of its markers, as its own recording.

    ``out`` may replace an existing recording only with ``force`` (``recording.check_output``).
    """
    if os.path.abspath(src) == os.path.abspath(out):
        raise EditError(f"-o {out}: the cropped recording must go to another file than {src}")
    check_output(out, force=force)
    with Recording.open(src) as rec:
        first = find_marker(rec, start, "--from")
        last = find_marker(rec, stop, "--to")
        if last <= first:
            a, b = rec.markers[first].meta, rec.markers[last].meta
            raise EditError(f"--to {stop!r} (m{last}, position {b['position']}) is not after --from "
                            f"{start!r} (m{first}, position {a['position']}): give the earlier marker "
                            "to --from")
        rec.verify()
        # A fast recording's markers are at exit numbers and its labels at instruction
        # counts from its start, which the crop's first marker does not know: they go.
        fast = rec.config.get("mode") == "fast"
        labels = [] if fast else [x for x in rec.labels if rec.markers[first].meta["position"] <= x["position"]
                                  <= rec.markers[last].meta["position"]]
        config = derived_config(rec, "crop", first, to_marker=last,
                                to_position=rec.markers[last].meta["position"])
        tmp = _tmp_near(out)
        writer = RecordingWriter(tmp, config, **rec.kernel_args())
        try:
            copied = copy_from_marker(rec, writer, first, last, progress)
            end_meta = rec.markers[last].meta
            end = ev.End(end_meta["position"], "cropped", 0,
                         f"cropped from {os.path.basename(src)} at m{last}")
            encoder = ev.EventEncoder()
            encoder.add(end)
            ev.count(copied.counts, end)
            first_pos, count, payload = encoder.take()
            writer.add_events(first_pos, end.pos, count, payload)
            src_summary = rec.summary or {}
            summary = {
                "reason": "cropped", "status": 0, "end_position": end.pos,
                "guest_ns": end_meta.get("guest_ns", 0), "unit": src_summary.get("unit", ""),
                "markers": copied.markers, "events": copied.counts,
                "serial_bytes": None, "serial_sha256": None, "host_seconds": 0.0,
                "labels": labels,
            }
            writer.finish(summary)
            writer.rename(out)
        except BaseException:
            writer.close()
            unlink_quietly(tmp)
            raise
        return {"file": out, "from": first, "to": last, "markers": copied.markers,
                "first_position": rec.markers[first].meta["position"], "last_position": end.pos,
                "bytes": os.path.getsize(out), "source_bytes": rec.file_size,
                "labels_dropped": len(rec.labels) - len(labels) if fast else 0}


def unlink_quietly(path: str) -> None:
    """Remove a temporary file if it is there."""
    try:
        os.unlink(path)
    except OSError:
        pass


def rebase(path: str, writer: RecordingWriter, first: int, config_extra: dict,
           progress: Callable[[str], None] = lambda m: None,
           resume: Optional[str] = None) -> tuple[RecordingWriter, Copied]:
    """Rolling and quota recording: restart the unfinished recording ``path``
    (being written by ``writer``) at its marker ``first``.

    The new file replaces ``path`` atomically, so a crash leaves either the
    old or the new recording; returns the writer to continue with.
    """
    with Recording.open(path) as rec:
        config = dict(rec.config)
        config.update(config_extra)
        tmp = _tmp_near(path)
        new = RecordingWriter(tmp, config, **rec.kernel_args())
        try:
            copied = copy_from_marker(rec, new, first, None, progress, resume)
            new.rename(path)
        except BaseException:
            new.close()
            unlink_quietly(tmp)
            raise
    writer.close()
    return new, copied


LABEL_RULE = ("a label name starts with a letter and has only letters, digits, '_', '-' and '.'; "
              "it cannot be mN (a marker), 'start' or 'end', or a recorded marker's name")


def check_label_name(rec: Recording, name: str) -> None:
    """EditError with ``LABEL_RULE`` unless ``name`` can name a position of ``rec`` without
    shadowing a marker (positions, markers and labels share one namespace: --until, goto)."""
    if not name:
        raise EditError(f"a label needs a name: {LABEL_RULE}")
    shadows = ((name[:1] in "mM" and name[1:].isdigit()) or name.lower() in ("start", "end")
               or any(m.meta.get("name") == name for m in rec.markers))
    if shadows or not (name.isascii() and name[0].isalpha()
                       and all(ch.isalnum() or ch in "_-." for ch in name)):
        raise EditError(f"cannot name a position {name!r}: {LABEL_RULE}")


def add_label(path: str, name: str, position: int, expect_id: Optional[str] = None) -> None:
    """Name ``position`` in the finished recording ``path`` (a label: no snapshot).

    ``expect_id``: the id of the recording the position belongs to; a file at ``path``
    with another id (replaced since it was opened) is refused, never written.
    """
    with Recording.open(path) as rec:
        check_label_name(rec, name)
        if expect_id is not None and recording_id(rec) != expect_id:
            raise EditError(f"{path} is no longer the recording being debugged (its id is now "
                            f"{recording_id(rec)}, was {expect_id}): it was replaced, and a label "
                            "for this replay does not belong in it")
        if rec.summary is None:
            raise EditError(f"{path} is incomplete (its recorder did not finish it): labels are kept "
                            "in the END chunk, which it lacks; crop it first or record again")
        labels = [x for x in rec.labels if x["name"] != name]
        labels.append({"name": name, "position": position})
        end = next(c for c in rec.chunks if c.kind is ChunkKind.END)
        tmp = _tmp_near(path)
        writer = RecordingWriter.continuing(rec, end.offset, tmp)
        try:
            writer.finish(dict(rec.summary, labels=labels))
            writer.rename(path)
        except BaseException:
            writer.close()
            unlink_quietly(tmp)
            raise
