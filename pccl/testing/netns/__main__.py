"""``python -m pccl.testing.netns cleanup [--prefix pt] [--force]``: delete
testbeds left behind by crashed runs (``--force``: also live ones).

``python -m pccl.testing.netns reap PREFIX`` is the reaper a testbed starts:
it waits for EOF on stdin and, unless the owner wrote ``done`` first (a
clean ``down()``), deletes every namespace of run PREFIX.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ._core import PREFIX_STEM, cleanup_stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pccl.testing.netns")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cleanup", help="delete leftovers of crashed testbed runs")
    c.add_argument("--prefix", default=PREFIX_STEM)
    c.add_argument("--force", action="store_true", help="also delete runs whose owner lives")
    r = sub.add_parser("reap", help="(internal) the reaper each testbed starts")
    r.add_argument("prefix")
    a = ap.parse_args(argv)
    if a.cmd == "cleanup":
        for name in cleanup_stale(a.prefix, force=a.force):
            print(f"deleted {name}")
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    data = sys.stdin.buffer.read()  # returns at EOF: the owner closed it or died
    if b"done" not in data:
        cleanup_stale(a.prefix, force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
