"""The index of a recording: every write, event, port I/O and function entry, queried in milliseconds.

Owns: the C-side step record drained into Arrow columns (``capture``), one
segment's replay on a worker (``segment``), the Dask scheduling and the
atomic Parquet output (``builder``), the DuckDB questions (``query``) and
the two commands (``command``: ``rrstub index``, ``rrstub query``).
Talks to the replay only through ``rrstub.replay.timeline.Timeline``.
"""
