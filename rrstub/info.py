"""`rrstub info`: what a recording holds, read from its index without replaying it.

Everything comes from chunk metadata (config, markers, event-chunk ranges,
the END summary); event payloads are decoded only for an incomplete
recording, whose counts are not in a summary.
"""
from __future__ import annotations

from rrstub import events as ev
from rrstub.engines import place
from rrstub.recording import Recording

UNITS = {"exact": "instructions", "fast": "exits"}


def describe(path: str, verify: bool = False) -> dict:
    with Recording.open(path) as rec:
        if verify:
            rec.verify()
        c = rec.config
        summary = rec.summary
        first, last = rec.position_range()
        sizes: dict[str, dict[str, int]] = {}
        for chunk in rec.chunks:
            s = sizes.setdefault(chunk.kind.name.lower(), {"chunks": 0, "raw": 0, "stored": 0})
            s["chunks"] += 1
            s["raw"] += chunk.raw_size
            s["stored"] += chunk.stored_size
        if summary is not None and "events" in summary:
            counts = dict(summary["events"])
        else:
            counts = _count_events(rec)
        markers = [{"index": m.meta["index"], "position": m.meta["position"],
                    "guest_s": m.meta.get("guest_ns", 0) / 1e9, "full": m.meta.get("full", False),
                    "pages": m.meta.get("pages"), "stored_bytes": m.stored_size,
                    "name": m.meta.get("name"), "origin": m.meta.get("origin", "")} for m in rec.markers]
        mode = c.get("mode", "?")
        return {
            "file": path, "format_version": rec.version, "file_bytes": rec.file_size,
            "complete": not rec.recovered, "recovery_note": rec.recovery_note,
            "mode": mode, "mode_reason": c.get("mode_reason", ""), "unit": UNITS.get(mode, "positions"),
            "kernel": {"name": rec.kernel_name, "sha256": rec.kernel_sha256,
                       **({"initrd": rec.initrd_meta} if rec.initrd_meta else {}),
                       **({"boot": c["boot"]} if c.get("boot") else {})},
            "machine": {"mem_bytes": c.get("mem_size"), "cmdline": c.get("cmdline", "")},
            "recorded": {"host": c.get("host", {}), "created": c.get("created", ""),
                         "rrstub": c.get("rrstub", ""), "serial_input": c.get("serial_input", False)},
            "end": ({"reason": summary["reason"], "status": summary["status"],
                     "position": summary["end_position"], "guest_s": summary["guest_ns"] / 1e9,
                     "host_s": summary.get("host_seconds"), "serial_bytes": summary.get("serial_bytes"),
                     "landmarks": summary.get("landmarks"),
                     "relocated_landmarks": summary.get("relocated_landmarks"), "exits": summary.get("exits")}
                    if summary else None),
            "first_position": first, "last_position": last,
            "markers": markers, "labels": rec.labels, "events": counts, "sizes": sizes,
            "id": c.get("id"), "parent": c.get("parent"), "derived": c.get("derived"),
            "rolling": (summary or {}).get("rolling") or c.get("rolling"),
            "guest_controlled": bool(c.get("guest_controlled")),
            "raw_bytes": sum(s["raw"] for s in sizes.values()),
        }


def _count_events(rec: Recording) -> dict:
    counts: dict = {}
    for _, payload in rec.iter_event_payloads():
        for e in ev.decode_events(payload):
            ev.count(counts, e)
    return counts


def format_info(i: dict) -> str:
    lines = [f"{i['file']}: rrstub recording, format {i['format_version']}, {i['file_bytes']} bytes"]
    if not i["complete"]:
        # With its END the log is whole: only the index had to be rebuilt by a scan.
        lines.append(f"  {'RECOVERED' if i['end'] else 'INCOMPLETE'}: {i['recovery_note']}")
    rec = i["recorded"]
    host = rec["host"]
    lines.append(f"  recorded {rec['created']} on {host.get('name', '?')} (Linux {host.get('kernel', '?')}, "
                 f"{host.get('machine', '?')}) by rrstub {rec['rrstub']}")
    lines.append(f"  mode: {i['mode']}" + (f" ({i['mode_reason']})" if i["mode_reason"] else ""))
    if i["mode"] == "fast":
        lines.append("  positions: the markers and the end below are at exit numbers; --until, --from, serve and "
                     "trace count instructions from the first marker (give a marker as mN or by its name)")
    lines.append(f"  kernel: {i['kernel']['name']} sha256 {i['kernel']['sha256']}")
    if i["kernel"].get("initrd"):
        initrd = i["kernel"]["initrd"]
        lines.append(f"  initrd: {initrd.get('name')} ({initrd.get('size')} bytes) sha256 {initrd.get('sha256')}")
    m = i["machine"]
    lines.append(f"  machine: {m['mem_bytes'] // (1 << 20) if m['mem_bytes'] else '?'} MiB RAM, "
                 f"cmdline {m['cmdline']!r}, serial input {'recorded' if rec['serial_input'] else 'none'}")
    if i.get("id"):
        lines.append(f"  id: {i['id']}")
    p = i.get("parent")
    if p:
        lines.append(f"  branch of {p.get('file')} (id {p.get('id')}) at {place(p.get('unit', i['unit'][:-1]), p.get('position', 0))} "
                     f"(--go-live {p.get('at')}), {p.get('guest_ns', 0) / 1e9:.6f} s of guest time")
    d = i.get("derived")
    if d:
        what = {"crop": "cropped from"}.get(d.get("how"), f"{d.get('how')} of")
        to = f" to m{d['to_marker']}" if "to_marker" in d else ""
        lines.append(f"  {what} {d.get('from_file')} (id {d.get('from_id')}) from m{d.get('from_marker')}{to} "
                     f"at {place(i['unit'][:-1], d.get('position', 0))}")
    r = i.get("rolling")
    if r:
        window = f"the last {r['window_s']:g} s of guest time" if r.get("window_s") else "what fits"
        quota = f", quota {r['quota']} bytes" if r.get("quota") else ""
        lines.append(f"  rolling: keeps {window}{quota}; restarted {r.get('rebases', 0)} times, "
                     f"now from {place(i['unit'][:-1], r.get('kept_from_position', r.get('dropped_to_position', 0)))}")
    if i.get("guest_controlled"):
        lines.append("  recording started and stopped by the guest (rrstub run --allow-guest-record)")
    e = i["end"]
    if e:
        lines.append(f"  ended: {e['reason']} (status {e['status']}) at {place(i['unit'][:-1], e['position'])}, "
                     f"{e['guest_s']:.6f} s of guest time, recorded in {e['host_s']:.2f} s")
        extra = [f"{e['serial_bytes']} serial bytes out" if e["serial_bytes"] is not None
                 else "serial output not hashed (a crop)"]
        if i["mode"] == "fast":
            moved = e.get("relocated_landmarks")
            extra.append(f"{e['landmarks']} landmarks" + (f" ({moved} moved out of loops)" if moved else ""))
        lines.append("         " + ", ".join(extra))
    else:
        lines.append(f"  ended: unknown (incomplete); the log covers up to {place(i['unit'][:-1], i['last_position'])}")
    lines.append(f"  markers: {len(i['markers'])}")
    for mk in i["markers"]:
        kind = "full" if mk["full"] else f"{mk['pages']} pages"
        named = f"  {mk['name']}" if mk.get("name") else ""
        origin = f" [{mk['origin']}]" if mk.get("origin") and mk.get("origin") != "auto" else ""
        lines.append(f"    m{mk['index']:<3} at {place(i['unit'][:-1], mk['position']):<18} guest {mk['guest_s']:.6f} s  "
                     f"{kind}, {mk['stored_bytes']} bytes{named}{origin}")
    if i.get("labels"):
        lines.append(f"  labels (positions named during replay, no snapshot): {len(i['labels'])}")
        for x in i["labels"]:
            lines.append(f"    {x['name']:<16} at {place('instruction', x['position'])}")
    lines.append("  events: " + (", ".join(f"{k} {v}" for k, v in sorted(i["events"].items())) or "none"))
    lines.append("  sizes (raw -> stored):")
    for kind, s in i["sizes"].items():
        lines.append(f"    {kind:<7} {s['chunks']:>5} chunks  {s['raw']:>10} -> {s['stored']:>10} bytes")
    return "\n".join(lines)


def write_kernel(path: str, out: str) -> str:
    """Write the kernel image embedded in recording ``path`` to ``out`` (checked against its
    recorded sha256); return a line saying what was written."""
    with Recording.open(path) as rec:
        data = rec.kernel_bytes()
        name, digest = rec.kernel_name, rec.kernel_sha256
    with open(out, "wb") as f:
        f.write(data)
    return f"wrote the recorded kernel {name} ({len(data)} bytes, sha256 {digest}) to {out}"
