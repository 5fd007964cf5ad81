"""`rrstub index`: a recording's segments replayed in parallel on Dask, merged into Parquet tables.

``build_index`` cuts the recording at its markers (``segments``), sends
the recording's bytes to every worker once (``Client.scatter``, so no
shared file system is assumed), runs ``segment.run_segment`` for each
segment, longest first, and writes each finished segment's tables into a
private folder next to the index.  When every segment has succeeded it
merges them with DuckDB (writes sorted by address, so a query on one
address reads one row group), writes ``meta.json`` last, and renames the
folder into place: an index either exists whole or not at all.  A failed
segment cancels the rest and names its markers.

The cluster is a ``distributed.LocalCluster`` of worker processes (one
thread each: a worker replays one segment at a time, and KVM needs no
more) or an existing scheduler's, given by address.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from typing import Callable, Optional

from rrstub.index.segment import Segment, SegmentError

INDEX_VERSION = 1
TABLES = ("writes", "events", "io", "calls", "hot")


class IndexBuildError(Exception):
    pass


def recording_digest(rec) -> str:
    """What the index depends on: every chunk but the end's labels (the UI adds those)."""
    from rrstub.recording import ChunkKind
    h = hashlib.sha256()
    for c in rec.chunks:
        if c.kind is ChunkKind.INDEX:
            continue
        if c.kind is ChunkKind.END:
            h.update(json.dumps({k: v for k, v in c.meta.items() if k != "labels"}, sort_keys=True).encode())
            continue
        h.update(rec._read_raw(c.offset, c.stored_size))
    return h.hexdigest()


def _symbols(rec) -> list[tuple[int, str, str]]:
    """The kernel's symbol table (address, nm kind, name), for names in answers."""
    from rrstub.session import ReplayError, open_kernel
    try:
        kernel = open_kernel(rec, None)
    except ReplayError as e:
        raise IndexBuildError(str(e)) from None
    return sorted({(s.address, s.kind, s.name) for s in kernel.symbols() if s.address})


def default_folder(path: str) -> str:
    return os.path.abspath(path) + ".index"


def segments(rec) -> list[Segment]:
    """Marker to marker for an exact recording; a fast recording is one segment (its markers'
    instruction counts are only known once replay has passed them)."""
    first, _ = rec.position_range()
    if rec.config.get("mode") != "exact":
        return [Segment(0, None, first, None, None)]
    marks = sorted((m.meta["position"], m.meta["index"]) for m in rec.markers
                   if isinstance(m.meta.get("position"), int) and isinstance(m.meta.get("index"), int))
    marks = [(p, i) for p, i in marks if p >= first]
    if not marks or marks[0][0] != first:
        return [Segment(0, None, first, None, None)]
    out = []
    for n, (pos, index) in enumerate(marks):
        nxt = marks[n + 1] if n + 1 < len(marks) else None
        if nxt is not None and nxt[0] == pos:
            continue
        out.append(Segment(len(out), index, pos, nxt[0] if nxt else None, nxt[1] if nxt else None))
    return out


def _client(workers: Optional[int], scheduler: Optional[str], say: Callable[[str], None]):
    import logging
    from distributed import Client, LocalCluster
    for name in ("distributed", "distributed.worker", "distributed.scheduler", "distributed.nanny"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=20)
        except (OSError, TimeoutError) as e:
            raise IndexBuildError(f"cannot reach the Dask scheduler at {scheduler}: {e} (start one with "
                                  "`dask scheduler`, and workers with `dask worker ADDRESS`)") from None
        n = len(client.scheduler_info().get("workers", {}))
        if n == 0:
            client.close()
            raise IndexBuildError(f"the Dask scheduler at {scheduler} has no workers: start some with "
                                  f"`dask worker {scheduler}` on machines with /dev/kvm and rrstub installed")
        say(f"rrstub index: {n} workers at {scheduler}")
        return client, None
    n = workers or os.cpu_count() or 1
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    say(f"rrstub index: a local Dask cluster of {n} worker processes")
    return Client(cluster), cluster


def build_index(path: str, folder: Optional[str] = None, *, workers: Optional[int] = None,
                scheduler: Optional[str] = None, rebuild: bool = False,
                say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Index the recording at ``path`` into ``folder``; returns the index's meta."""
    from rrstub.index import query
    from rrstub.recording import Recording
    folder = os.path.abspath(folder or default_folder(path))
    rec = Recording.open(path)
    try:
        rec.verify()
        digest = recording_digest(rec)
        segs = segments(rec)
        config = rec.config
        labels = rec.labels
        markers_meta = [m.meta for m in rec.markers]
        symbols = _symbols(rec)
    finally:
        rec.close()
    if os.path.exists(folder):
        try:
            query.check_index(folder, path)
            fresh = True
        except query.StaleIndex:
            fresh = False
        except query.IndexMissing:
            fresh = False
        if not rebuild:
            raise IndexBuildError(f"{folder} exists ({'up to date' if fresh else 'out of date or damaged'}); "
                                  "give --rebuild to build it again")
    with open(path, "rb") as f:
        data = f.read()
    data_digest = hashlib.sha256(data).hexdigest()[:32]
    parent = os.path.dirname(folder)
    work = os.path.join(parent, f".{os.path.basename(folder)}.part-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "segments"))
    client = cluster = None
    started = time.monotonic()
    try:
        client, cluster = _client(workers, scheduler, say)
        from distributed import as_completed
        shared = client.scatter(data, broadcast=True)
        from rrstub.index.segment import run_segment
        total = sum((s.end - s.start) for s in segs if s.end is not None)
        order = sorted(segs, key=lambda s: -(s.end - s.start) if s.end is not None else -1)
        futures = {client.submit(run_segment, shared, data_digest, s, pure=False,
                                 key=f"rrstub-segment-{data_digest}-{s.number}-{os.getpid()}",
                                 priority=len(order) - i): s
                   for i, s in enumerate(order)}
        say(f"rrstub index: {len(segs)} segments" + (f", {total:,} instructions to the last marker"
                                                        if total else ""))
        by_number = {s.number: s for s in segs}

        def progress(event) -> None:
            _, msg = event
            seg = by_number.get(msg.get("segment"))
            if seg is not None:
                of = f" of {seg.end - seg.start:,}" if seg.end is not None else ""
                say(f"rrstub index: {seg.words()}: {msg['done']:,}{of} instructions")
        from rrstub.index.segment import PROGRESS_TOPIC
        client.subscribe_topic(PROGRESS_TOPIC, progress)
        results = {}
        done = 0
        for fut in as_completed(list(futures)):
            seg = futures[fut]
            try:
                r = fut.result()
            except SegmentError as e:
                raise IndexBuildError(str(e)) from None
            except Exception as e:      # a worker that died, an error in it
                raise IndexBuildError(f"{seg.words()}: {type(e).__name__}: {e}") from None
            done += 1
            for name, blob in r.pop("tables").items():
                with open(os.path.join(work, "segments", f"{seg.number:05d}-{name}.parquet"), "wb") as f:
                    f.write(blob)
            results[seg.number] = r
            rate = r["instructions"] / r["seconds"] if r["seconds"] else 0
            say(f"rrstub index: {seg.words()} ({r['instructions']:,} instructions) in {r['seconds']:.1f} s, "
                f"{rate:,.0f}/s [{done}/{len(segs)}]")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    try:
        markers = {}
        for m in markers_meta:
            if isinstance(m.get("index"), int) and isinstance(m.get("position"), int) and config.get("mode") == "exact":
                markers[m["index"]] = m["position"]
        for r in results.values():
            markers.update({int(k): v for k, v in r["markers"].items()})
        last = max(r["last"] for r in results.values())
        first = min(s.start for s in segs)
        _merge(work, markers, labels, markers_meta)
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"address": pa.array([a for a, _, _ in symbols], pa.uint64()),
                                 "kind": pa.array([k for _, k, _ in symbols], pa.string()),
                                 "name": pa.array([n for _, _, n in symbols], pa.string())}),
                       os.path.join(work, "symbols.parquet"))
        meta = {"version": INDEX_VERSION, "recording": os.path.abspath(path), "id": config.get("id"),
                "digest": digest, "mode": config.get("mode"), "first": first, "last": last,
                "segments": [{"marker": s.marker, "start": s.start,
                              "end": s.end if s.end is not None else results[s.number]["last"],
                              "seconds": round(results[s.number]["seconds"], 3)} for s in segs],
                "instructions": last - first,
                "undecoded": sum(r["undecoded"] for r in results.values()),
                "dropped": sum(r["dropped"] for r in results.values()),
                "seconds": round(time.monotonic() - started, 3),
                "workers": scheduler or (workers or os.cpu_count() or 1),
                "bytes": 0}
        meta["bytes"] = sum(os.path.getsize(os.path.join(work, n)) for n in os.listdir(work)
                            if n.endswith(".parquet"))
        with open(os.path.join(work, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.rename(work, folder)
        return meta
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _merge(work: str, markers: dict, labels: list, markers_meta: list) -> None:
    """The segments' tables as one Parquet file each; the symbols and markers tables."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq
    seg = os.path.join(work, "segments")
    con = duckdb.connect()
    order = {"writes": "vaddr, pos", "hot": "rip"}
    for name in TABLES:
        src = os.path.join(seg, f"*-{name}.parquet").replace("'", "''")
        out = os.path.join(work, f"{name}.parquet").replace("'", "''")
        if name == "hot":
            select = f"SELECT rip, CAST(sum(count) AS UBIGINT) AS count FROM read_parquet('{src}') GROUP BY rip"
        else:
            select = f"SELECT * FROM read_parquet('{src}')"
        con.execute(f"COPY ({select} ORDER BY {order.get(name, 'pos')}) TO '{out}' "
                    "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 65536)")
    con.close()
    names = {m.get("index"): m.get("name") for m in markers_meta}
    rows = sorted(markers.items(), key=lambda kv: kv[1])
    pq.write_table(pa.table({
        "marker": pa.array([f"m{i}" for i, _ in rows] + [x["name"] for x in labels], pa.string()),
        "name": pa.array([names.get(i) for i, _ in rows] + [x["name"] for x in labels], pa.string()),
        "pos": pa.array([p for _, p in rows] + [x["position"] for x in labels], pa.uint64()),
        "kind": pa.array(["marker"] * len(rows) + ["label"] * len(labels), pa.string())}),
        os.path.join(work, "markers.parquet"))
    shutil.rmtree(seg)
