"""``rrstub index`` and ``rrstub query``: their arguments, runs and output."""
from __future__ import annotations

import argparse
import json
import sys
import time

INDEX_EPILOG = """\
what it records (Parquet tables in DIR, default REC.index/):
  writes   every store: position, rip, virtual and physical address, size, old and
           new bytes; the instructions' own (decoded in C by capstone) and the
           frames interrupt and exception deliveries push
  events   interrupts and exceptions taken: position, vector, rip, handler
  io       port I/O: position, port, size, value, direction
  calls    every position at which a function of the kernel's symbol table is entered
  hot      instructions executed per rip
  markers, symbols

how: the recording is cut at its markers; each segment is replayed from its
marker's full state on a Dask worker (the workers get the recording's bytes:
no shared file system is needed) and, for an exact recording, checked against
the next marker's digest where it ends.  A fast recording is one segment
(its markers' instruction counts are known only once replay has passed them).
The index is written to a private folder and renamed into place when every
segment succeeded: a failed or diverging segment names its markers and leaves
no index behind.

examples:
  rrstub index race.rrr                       # local cluster, a worker per core
  rrstub index race.rrr --workers 2
  dask scheduler --port 8786 &  dask worker tcp://127.0.0.1:8786 &
  rrstub index race.rrr --scheduler tcp://127.0.0.1:8786
  rrstub query race.rrr who-wrote counter

exit status: 0 indexed; 1 no index was written (a segment failed or diverged, the cluster could not
  be used, or an index exists and --rebuild was not given); 2 bad arguments or recording
"""

QUERY_EPILOG = """\
questions:
  who-wrote ADDR|SYMBOL [--before POS] [--size N]
          the last write to any of the N bytes (default 1) before position POS
          (default: the end): its position (what `monitor when` shows when a
          reverse watchpoint stops at that store, before it runs), rip as
          function+offset, old and new bytes
  history ADDR|SYMBOL [--from POS] [--to POS] [--size N]
          every write to those bytes in [--from, --to), in order
  calls FUNCTION
          every position at which FUNCTION was entered
  sql "SELECT ..."
          anything else, over the tables writes, events, io, calls, hot, markers,
          symbols (`rrstub index --help` lists them)

positions: an instruction count, mN, or a marker's or label's name.
--json prints JSON (addresses as hex strings, bytes as hex).

examples:
  rrstub query race.rrr who-wrote counter
  rrstub query race.rrr history counter --from 100000 --to 200000
  rrstub query race.rrr calls increment --json
  rrstub query race.rrr sql "SELECT function, count(*) AS n FROM calls GROUP BY 1 ORDER BY n DESC LIMIT 5"

exit status: 0 answered (also "never written"), 2 bad arguments or no usable index
"""


def add_parsers(sub) -> None:
    p = sub.add_parser("index", help="index every write of a recording, in parallel (Dask)",
                       description="Replay a recording's marker-to-marker segments in parallel and write "
                                   "an index of every memory write, interrupt, port I/O and function entry.",
                       epilog=INDEX_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recording", metavar="REC")
    p.add_argument("-o", "--output", metavar="DIR", help="where the index goes (default REC.index/)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--workers", type=int, metavar="N",
                     help="worker processes of the local Dask cluster (default: the core count)")
    how.add_argument("--scheduler", metavar="ADDRESS",
                     help="an existing Dask cluster's scheduler, e.g. tcp://10.0.0.5:8786")
    p.add_argument("--rebuild", action="store_true", help="replace an index that exists already")
    p.add_argument("--json", action="store_true", help="print the index's summary as JSON")

    q = sub.add_parser("query", help="ask a recording's index (who wrote this, when, ...)",
                       description="Answer questions about a recording from its index (rrstub index), "
                                   "with DuckDB.", epilog=QUERY_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("recording", metavar="REC")
    q.add_argument("--index", metavar="DIR", help="the index (default REC.index/)")
    q.add_argument("--json", action="store_true", help="print JSON")
    qs = q.add_subparsers(dest="question", metavar="QUESTION")
    w = qs.add_parser("who-wrote", help="the last write to an address before a position")
    w.add_argument("address", metavar="ADDR|SYMBOL")
    w.add_argument("--before", metavar="POS")
    w.add_argument("--size", type=int, default=1, metavar="N")
    h = qs.add_parser("history", help="every write to an address")
    h.add_argument("address", metavar="ADDR|SYMBOL")
    h.add_argument("--from", dest="start", metavar="POS")
    h.add_argument("--to", dest="end", metavar="POS")
    h.add_argument("--size", type=int, default=1, metavar="N")
    c = qs.add_parser("calls", help="every entry position of a function")
    c.add_argument("function", metavar="FUNCTION")
    s = qs.add_parser("sql", help="any SQL over the index's tables")
    s.add_argument("text", metavar="SQL")
    for x in (w, h, c, s):
        x.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")


def _err(msg: str) -> None:
    print(f"rrstub: {msg}", file=sys.stderr)


def cmd_index(args: argparse.Namespace) -> int:
    from rrstub.index.builder import IndexBuildError, build_index
    from rrstub.index.capture import CaptureError
    from rrstub.recording import RecordingError
    if args.workers is not None and args.workers < 1:
        _err(f"--workers {args.workers}: give 1 or more")
        return 2
    try:
        meta = build_index(args.recording, args.output, workers=args.workers, scheduler=args.scheduler,
                           rebuild=args.rebuild)
    except RecordingError as e:
        _err(str(e))
        return 2
    except (IndexBuildError, CaptureError) as e:
        _err(f"no index was written: {e}")
        return 1
    if args.json:
        print(json.dumps(meta, indent=1))
        return 0
    rate = meta["instructions"] / meta["seconds"] if meta["seconds"] else 0
    print(f"rrstub index: {meta['instructions']:,} instructions in {len(meta['segments'])} segments, "
          f"{meta['seconds']:.1f} s ({rate:,.0f} instructions/s), {meta['bytes']:,} bytes: "
          f"{args.output or meta['recording'] + '.index'}", file=sys.stderr)
    if meta["undecoded"] or meta["dropped"]:
        print(f"rrstub index: {meta['undecoded']} steps' stores could not be decoded and "
              f"{meta['dropped']} steps were run by the engine itself: writes made there are not indexed",
              file=sys.stderr)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from rrstub.index.query import Index, IndexMissing, QueryError, StaleIndex
    from rrstub.recording import RecordingError
    if args.question is None:
        _err("give a question: who-wrote, history, calls or sql (rrstub query --help)")
        return 2
    started = time.monotonic()
    try:
        with Index(args.recording, args.index) as ix:
            return _answer(ix, args, started)
    except (IndexMissing, StaleIndex, QueryError, RecordingError) as e:
        _err(str(e))
        return 2


def _answer(ix, args, started: float) -> int:
    from rrstub.index.query import value_words
    q = args.question
    if q in ("who-wrote", "history"):
        address = ix.address(args.address)
        if args.size < 1:
            _err(f"--size {args.size}: give 1 or more bytes")
            return 2
        what = f"{args.address} ({address:#x}" + (f", {args.size} bytes)" if args.size > 1 else ")")
        if q == "who-wrote":
            before = ix.position(args.before, "--before") if args.before else None
            w = ix.who_wrote(address, args.size, before)
            if args.json:
                print(json.dumps({"address": hex(address), "size": args.size, "before": before,
                                  "write": w.as_json() if w else None,
                                  "ms": round(1000 * (time.monotonic() - started), 1)}))
            elif w is None:
                print(f"{what} was not written" + (f" before {before}" if before is not None else "")
                      + " in the recording")
            else:
                print(f"{what} was last written" + (f" before {before}" if before is not None else "")
                      + f" at position {w.pos} by {w.where} (rip {w.rip:#x})"
                      + (f", a {w.kind} of vector {w.vector}" if w.kind == "frame" else "") + ":")
                print(f"  {w.size} bytes at {w.vaddr:#x}: old {value_words(w.old)}  new {value_words(w.new)}")
            return 0
        start = ix.position(args.start, "--from") if args.start else None
        end = ix.position(args.end, "--to") if args.end else None
        found = ix.history(address, args.size, start, end)
        if args.json:
            print(json.dumps({"address": hex(address), "size": args.size, "writes": [w.as_json() for w in found]}))
            return 0
        print(f"{what}: {len(found)} writes")
        for w in found:
            print(f"  {w.pos:>12}  {w.where:<28} {w.size} bytes at {w.vaddr:#x}: "
                  f"{value_words(w.old)} -> {value_words(w.new)}")
        return 0
    if q == "calls":
        found = ix.calls(args.function)
        if args.json:
            print(json.dumps({"function": args.function, "positions": found}))
        else:
            print(f"{args.function}: entered {len(found)} times")
            for p in found:
                print(f"  {p}")
        return 0
    names, rows = ix.sql(args.text)
    if args.json:
        print(json.dumps([dict(zip(names, [_jsonable(v) for v in r])) for r in rows]))
    else:
        print("\t".join(names))
        for r in rows:
            print("\t".join(_text(v) for v in r))
    return 0


def _jsonable(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, int) and abs(v) >= 1 << 53:
        return hex(v)
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def _text(v) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    return "NULL" if v is None else str(v)
