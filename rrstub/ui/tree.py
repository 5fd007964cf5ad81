"""The branch tree: recordings that name one another as parent (``config["parent"]``).

A branch (``replay --go-live -o``) names its parent by recording id and
absolute path.  The tree is drawn from the files found in the folders of
the recordings involved: up from a recording through its parents' paths to
the root, then down through every recording in those folders whose parent
id is a node's id.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

from rrstub.recording import Recording, RecordingError


def _read(path: str) -> Optional[dict]:
    """(id, parent) of a recording file, None if it is not one."""
    try:
        with Recording.open(path) as rec:
            c = rec.config
            return {"id": c.get("id"), "parent": c.get("parent")}
    except (RecordingError, OSError):
        return None


def _files(folders: set[str]) -> dict[str, dict]:
    found = {}
    for folder in sorted(folders):
        for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.rrr"))):
            meta = _read(path)
            if meta is not None and meta["id"]:
                found[os.path.abspath(path)] = meta
    return found


def branch_tree(path: str, open_paths: dict[str, str]) -> dict:
    """The tree around ``path``: the root's node, each ``{"path", "name", "open", "current",
    "position", "children", "error"}`` (``open``: the page's id for an open recording)."""
    path = os.path.abspath(path)
    folders = {os.path.dirname(path)} | {os.path.dirname(p) for p in open_paths}
    chain = [path]
    seen = {path}
    while True:
        meta = _read(chain[-1])
        parent = (meta or {}).get("parent") or {}
        up = parent.get("file")
        if not up or up in seen or not os.path.exists(up):
            break
        chain.append(os.path.abspath(up))
        seen.add(chain[-1])
        folders.add(os.path.dirname(chain[-1]))
    files = _files(folders)
    children: dict[str, list[str]] = {}
    for p, meta in files.items():
        parent_id = (meta.get("parent") or {}).get("id")
        if parent_id:
            children.setdefault(parent_id, []).append(p)

    def node(p: str, visited: frozenset) -> dict:
        meta = files.get(p) or _read(p) or {}
        parent = meta.get("parent") or {}
        kids = [] if p in visited else [node(c, visited | {p}) for c in children.get(meta.get("id"), [])
                                        if c not in visited]
        return {"path": p, "name": os.path.basename(p), "open": open_paths.get(p), "current": p == path,
                "position": parent.get("position"), "children": kids,
                "error": None if meta else "not a readable recording"}

    return {"root": node(chain[-1], frozenset())}
