"""The recording in a browser: ``rrstub ui``.

* ``view``: one open recording (a ``Timeline`` behind a lock) and what the
  page asks of it: the state at a position (console, registers,
  disassembly with symbols, backtrace), quick previews from the nearest
  checkpoint, seeks in slices that other tabs can interleave with, and a
  background read of the whole recording that makes later previews cheap.
* ``console``: which serial bytes the guest had written before a position.
* ``tasks``: long work in child processes (crop, go-live), with the lines
  they print as progress.
* ``tree``: the branch tree (recordings naming each other as parent).
* ``server``: the aiohttp application, its JSON API under ``/api`` and the
  static page in ``static/`` (plain ES modules, no build step).

The page talks to replay only through this package, and this package to
replay only through the timeline.
"""
