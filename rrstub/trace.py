"""`rrstub trace`: every instruction of an exact recording, from its replay (being written)."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("trace", help="list every instruction a recording executed",
                       description="(not yet available)")
    p.add_argument("recording", metavar="REC")
    return p


def cmd_trace(args: argparse.Namespace) -> int:
    print("rrstub: trace is not implemented yet", flush=True)
    return 2
