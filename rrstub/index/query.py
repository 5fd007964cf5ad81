"""`rrstub query`: answers from a recording's index, with DuckDB over its Parquet tables.

The tables (``REC.index/``, built by ``rrstub index``):

  writes   pos, rip, vaddr, paddr, size, old, new, kind ('store' | 'frame'), vector
  events   pos, vector, rip, handler, kind ('interrupt' | 'exception' | 'software')
  io       pos, rip, port, size, value, direction ('in' | 'out')
  calls    pos, rip, function          (every step whose rip is a function's entry)
  hot      rip, count                  (instructions executed per rip)
  markers  marker, name, pos, kind ('marker' | 'label')
  symbols  address, kind, name         (the kernel's symbol table)

A position is the instruction count before a step: a write at pos P has
not happened at position P and has at P + 1 (the number ``monitor when``
shows while a reverse watchpoint's store is about to run).  ``writes`` is
sorted by vaddr, so a question about one address reads one row group.
"""
from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from typing import Optional

from rrstub.index.builder import INDEX_VERSION, default_folder, recording_digest


class IndexMissing(Exception):
    pass


class StaleIndex(Exception):
    pass


class QueryError(Exception):
    pass


def check_index(folder: str, recording: str) -> dict:
    """The index's meta if it belongs to this recording as it is now; IndexMissing or StaleIndex if not."""
    from rrstub.recording import Recording
    meta_path = os.path.join(folder, "meta.json")
    build = f"build it with `rrstub index {recording}`"
    with Recording.open(recording) as rec:
        digest = recording_digest(rec)
        rid = rec.config.get("id")
    if not os.path.isdir(folder):
        raise IndexMissing(f"{recording} has no index ({folder} does not exist): {build}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise StaleIndex(f"{folder} is not a usable index ({meta_path}: {e}): rebuild it with "
                         f"`rrstub index --rebuild {recording}`") from None
    if meta.get("version") != INDEX_VERSION or meta.get("id") != rid or meta.get("digest") != digest:
        why = ("was built by another rrstub version" if meta.get("version") != INDEX_VERSION else
               "belongs to another recording" if meta.get("id") != rid else
               "was built before the recording changed")
        raise StaleIndex(f"the index {folder} {why}: rebuild it with `rrstub index --rebuild {recording}`")
    for name in ("writes", "events", "io", "calls", "hot", "markers", "symbols"):
        if not os.path.isfile(os.path.join(folder, f"{name}.parquet")):
            raise StaleIndex(f"the index {folder} lacks {name}.parquet: rebuild it with "
                             f"`rrstub index --rebuild {recording}`")
    return meta


@dataclass
class Write:
    pos: int
    rip: int
    vaddr: int
    paddr: int
    size: int
    old: Optional[bytes]
    new: bytes
    kind: str
    vector: Optional[int]
    where: str              # rip as function+offset

    def as_json(self) -> dict:
        return {"pos": self.pos, "rip": hex(self.rip), "where": self.where, "vaddr": hex(self.vaddr),
                "paddr": hex(self.paddr), "size": self.size,
                "old": self.old.hex() if self.old is not None else None, "new": self.new.hex(),
                "kind": self.kind, "vector": self.vector}


def value_words(data: Optional[bytes]) -> str:
    """Bytes as a little-endian number (and decimal) up to 8 of them, else hex bytes; ? when unknown."""
    if data is None:
        return "?"
    if len(data) <= 8:
        n = int.from_bytes(data, "little")
        return f"{n:#x} ({n})"
    return data.hex()


class Index:
    """An open index: DuckDB views over its tables, the kernel's symbols in memory."""

    def __init__(self, recording: str, folder: Optional[str] = None):
        import duckdb
        self.recording = recording
        self.folder = os.path.abspath(folder or default_folder(recording))
        self.meta = check_index(self.folder, recording)
        self.con = duckdb.connect()
        for name in ("writes", "events", "io", "calls", "hot", "markers", "symbols"):
            f = os.path.join(self.folder, f"{name}.parquet").replace("'", "''")
            self.con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{f}')")
        rows = self.con.execute("SELECT address, kind, name FROM symbols ORDER BY address").fetchall()
        self._by_name: dict[str, int] = {}
        for address, _, name in rows:
            self._by_name.setdefault(name, address)
        text = [(a, n) for a, k, n in rows if k in "TtWw"]
        self._text_at = [a for a, _ in text]
        self._text_names = [n for _, n in text]
        self._marks = self.con.execute("SELECT marker, name, pos FROM markers").fetchall()

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- names ---------------------------------------------------------------------
    def where(self, address: int) -> str:
        i = bisect.bisect_right(self._text_at, address) - 1
        if i < 0 or (i + 1 == len(self._text_at) and address - self._text_at[i] > 1 << 16):
            return hex(address)
        off = address - self._text_at[i]
        return self._text_names[i] + (f"+{off:#x}" if off else "")

    def address(self, text: str) -> int:
        """An address: a number (0x... or decimal) or a symbol of the kernel."""
        t = text.strip()
        if t in self._by_name:
            return self._by_name[t]
        try:
            return int(t, 0)
        except ValueError:
            raise QueryError(f"{text!r} is neither an address (0x...) nor a symbol of the recorded kernel") from None

    def position(self, text: str, what: str) -> int:
        """A position: a number, mN, or a marker's or label's name."""
        t = text.strip()
        for marker, name, pos in self._marks:
            if t in (marker, name):
                return pos
        try:
            value = int(t, 0)
        except ValueError:
            raise QueryError(f"{what} {text!r}: give a position (a number), a marker (m0, m1, ...) or a "
                             "marker or label name") from None
        if not self.meta["first"] <= value <= self.meta["last"]:
            raise QueryError(f"{what} {value} is outside the recording ({self.meta['first']}.."
                             f"{self.meta['last']})")
        return value

    # -- questions -------------------------------------------------------------------
    def _writes(self, sql: str, params: list) -> list[Write]:
        rows = self.con.execute(
            "SELECT pos, rip, vaddr, paddr, size, old, new, kind, vector FROM writes " + sql, params).fetchall()
        return [Write(*r[:5], bytes(r[5]) if r[5] is not None else None, bytes(r[6]), r[7], r[8],
                      self.where(r[1])) for r in rows]

    # No write record is longer than a page (rrtrace.c splits them), so a range
    # condition on vaddr alone lets DuckDB skip the row groups of other addresses.
    _COVERS = "vaddr > ? AND vaddr < ? AND vaddr + size > ?"

    def _covers(self, address: int, size: int) -> list[int]:
        return [max(address - 4096, -1), address + size, address]

    def who_wrote(self, address: int, size: int = 1, before: Optional[int] = None) -> Optional[Write]:
        """The last write to any byte of [address, address + size) before position ``before``."""
        params = self._covers(address, size)
        cond = self._COVERS
        if before is not None:
            cond += " AND pos < ?"
            params.append(before)
        found = self._writes(f"WHERE {cond} ORDER BY pos DESC LIMIT 1", params)
        return found[0] if found else None

    def history(self, address: int, size: int = 1, start: Optional[int] = None,
                end: Optional[int] = None) -> list[Write]:
        params = self._covers(address, size)
        cond = self._COVERS
        if start is not None:
            cond += " AND pos >= ?"
            params.append(start)
        if end is not None:
            cond += " AND pos < ?"
            params.append(end)
        return self._writes(f"WHERE {cond} ORDER BY pos", params)

    def calls(self, function: str) -> list[int]:
        address = self.address(function)
        return [r[0] for r in self.con.execute("SELECT pos FROM calls WHERE rip = ? ORDER BY pos",
                                               [address]).fetchall()]

    def sql(self, text: str):
        import duckdb
        try:
            cur = self.con.execute(text)
        except duckdb.Error as e:
            raise QueryError(f"the SQL failed: {e}") from None
        names = [d[0] for d in cur.description] if cur.description else []
        return names, cur.fetchall()


def last_change(ix: Index, address: int, length: int, before: int, first: int) -> tuple[bool, Optional[Write]]:
    """For reverse-continue to a write watchpoint: the last write before ``before`` (and not
    before ``first``) that changed a byte of [address, address + length), as the timeline's
    watchpoints see writes (by value).  (False, None) when the index cannot say (a write whose
    old bytes it does not have, or an index that misses some steps' stores): scan instead."""
    if ix.meta.get("undecoded") or ix.meta.get("dropped"):
        return False, None
    params = ix._covers(address, length) + [before, first]
    cursor = before
    while True:
        found = ix._writes(f"WHERE {Index._COVERS} AND pos < ? AND pos >= ? ORDER BY pos DESC LIMIT 256",
                           params[:3] + [cursor, first])
        for w in found:
            if w.old is None:
                return False, None
            lo, hi = max(address, w.vaddr) - w.vaddr, min(address + length, w.vaddr + w.size) - w.vaddr
            if w.old[lo:hi] != w.new[lo:hi]:
                return True, w
        if len(found) < 256:
            return True, None
        cursor = found[-1].pos
