"""``rrstub ui``: its arguments and its run."""
from __future__ import annotations

import argparse
import os

from rrstub.ui.apihelp import API_HELP

UI_EPILOG = f"""\
the page (one recording at a time; the list at the top switches):
  timeline     the whole recording in instructions, markers and labels as named ticks
               (guest time under them); drag over it to preview the state under the
               pointer, release to go there; click anywhere to go there
  panels       the console as the guest had written it before this instruction,
               registers, disassembly around rip with the kernel's symbols
               (function+offset), a frame-pointer backtrace
  controls     play/pause at realtime, 2x, 10x or max; step -1/+1 instruction
               (arrow keys); previous/next marker; go to a position
  marker       name the current position: saved in the file as a label, as
               `monitor marker add` does (`rrstub info` lists it)
  crop         between two markers into a new file (`rrstub crop`, verified)
  go live      from the current position into a branch recording (`rrstub replay
               --go-live -o`): its console runs in the page, what you type there
               is the guest's serial input, recorded into the branch
  tree         the recordings that name this one as parent, and theirs; click to open

  A far position is first shown with the nearest checkpoint's state (the page says
  so), then refined.  After opening, the server reads the whole recording once in
  the background (progress in the page); previews are fastest after that.

{API_HELP}

examples:
  rrstub record examples/build/race.elf -o race.rrr --mode exact
  rrstub ui race.rrr                     # prints http://127.0.0.1:8765/
  rrstub ui race.rrr branch.rrr --port 0 # any free port
  curl -s 'http://127.0.0.1:8765/api/rec/r0/state?pos=1000' | python3 -m json.tool

exit status:
  0  served until Ctrl-C or SIGTERM (live runs are stopped; their branches are kept)
  2  bad arguments, or the address cannot be used (port taken, bad host)
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "ui", help="browse recordings in a web page: timeline, preview, markers, crop, go live",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a local web page for browsing recordings, as a replay window: a "
                    "timeline with a play slider and live preview of the guest's state, markers, "
                    "crop, go-live into a branch, and the branch tree. Prints the page's address. "
                    "A recording that cannot be opened is listed with the same message the other "
                    "commands print for it.",
        epilog=UI_EPILOG)
    p.add_argument("recordings", nargs="+", metavar="REC", help="recordings to open (either mode)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other address lets whoever can "
                        "reach it read the guest's memory and start live runs, and ui warns)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 picks a free one)")
    p.add_argument("--no-read-ahead", action="store_true",
                   help="do not read the recordings in the background: saves a core, but a far preview then "
                        "shows the nearest checkpoint's state until replay has been near, and the console "
                        "is known only as far as replay has gone")
    p.add_argument("--open", action="store_true", help="start the desktop browser on the page, where there is one")
    return p


def cmd_ui(args: argparse.Namespace) -> int:
    from rrstub.cli import EXIT_USAGE, _err
    from rrstub.gdbproto.server import check_port, exposure_warning
    from rrstub.ui.server import serve_ui

    try:
        check_port(args.port)
        exposed = exposure_warning(args.host, args.port) is not None
    except ValueError as e:
        _err(f"--host/--port: {e}")
        return EXIT_USAGE
    missing = [p for p in args.recordings if not os.path.exists(p)]
    if missing:
        _err(f"cannot open {missing[0]}: No such file or directory")
        return EXIT_USAGE

    def ready(url: str) -> None:
        if exposed:
            port = int(url.rstrip("/").rsplit(":", 1)[1])
            _err(f"warning: {exposure_warning(args.host, port)} The page can also start live runs of the "
                 "recorded guest.")
        print(f"rrstub ui: {len(args.recordings)} recording{'s' * (len(args.recordings) != 1)} at {url}",
              flush=True)

    try:
        serve_ui(args.recordings, args.host, args.port, open_browser=args.open,
                 read_ahead=not args.no_read_ahead, log=_err, ready=ready)
    except OSError as e:
        _err(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        pass
    return 0
