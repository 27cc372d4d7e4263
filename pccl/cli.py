"""The ``pccl`` command: ``pccl status`` and ``pccl master``.

* ``pccl status HOST:PORT`` reads the master's ``--status`` endpoint (its
  ``/status`` JSON) and prints what the status page at ``http://HOST:PORT/``
  shows: counters, peer groups with their ring order, peers, pending
  joiners, recent events.  ``--watch`` keeps it live (Ctrl-C stops),
  ``--json`` prints the raw document.
* ``pccl master ...`` is ``pccl-master ...`` (the same flags).

Exit codes: 0 success, 1 the endpoint cannot be read (unreachable, timed
out, not a pccl-master status document; one line on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Any

DEFAULT_INTERVAL = 1.0
DEFAULT_TIMEOUT = 5.0
MAX_DOCUMENT = 64 << 20  # bytes of /status read at most
EVENTS_SHOWN = 12


class StatusError(Exception):
    """The status endpoint could not be read or did not answer a status."""


# --------------------------------------------------------------------------
# Reading /status.


def status_url(endpoint: str) -> str:
    """``HOST:PORT`` (``[v6]:PORT``), or an ``http://`` URL, to the /status URL."""
    text = endpoint.strip()
    if text.startswith(("http://", "https://")):
        base = text.rstrip("/")
        if base.endswith("/status"):
            return base
        return base + "/status"
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT (the master's --status address), got {endpoint!r}")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{int(port)}/status"


def fetch_status(url: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """The /status document at ``url`` (StatusError with a one-line reason)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http only
            body = resp.read(MAX_DOCUMENT + 1)
    except urllib.error.HTTPError as exc:
        raise StatusError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise StatusError(f"cannot reach {url}: {reason}") from None
    except TimeoutError:
        raise StatusError(f"no answer from {url} within {timeout:g} s") from None
    except (OSError, ValueError) as exc:  # connection reset, bad status line, ...
        raise StatusError(f"cannot read {url}: {exc}") from None
    if len(body) > MAX_DOCUMENT:
        raise StatusError(f"{url}: answer larger than {MAX_DOCUMENT} bytes")
    try:
        doc = json.loads(body)
    except ValueError:
        raise StatusError(
            f"{url} did not answer JSON: not a pccl-master --status endpoint?"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("peers"), list) or "epoch" not in doc:
        raise StatusError(f"{url} answered JSON that is not a pccl-master status document")
    return doc


# --------------------------------------------------------------------------
# Rendering with rich.


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    units = ["B", "KB", "MB", "GB", "TB"]
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n /= 1000
        i += 1
    return f"{n:.0f} {units[i]}" if i == 0 else f"{n:.2f} {units[i]}" if n < 10 else (
        f"{n:.1f} {units[i]}"
    )


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _label(peer: dict | None, pid: str) -> str:
    if peer and peer.get("name"):
        return f"{peer['name']} ({pid})"
    return pid


STATE_STYLE = {"admitted": "green", "pending": "yellow"}
EVENT_STYLE = {
    "joined": "blue",
    "admitted": "green",
    "lost": "bold red",
    "evicted": "red",
    "left": "dim",
    "epoch": "magenta",
}


def render(doc: dict[str, Any], url: str, error: str | None = None):
    """A rich renderable of one /status document."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    peers = {p["peer_id"]: p for p in doc.get("peers", [])}
    counters = doc.get("counters", {})
    rates = doc.get("rates") or {}
    parts: list[Any] = []

    head = Text()
    head.append("pccl-master ", style="bold")
    head.append(f"{doc.get('listen', '?')}  ")
    head.append(f"epoch {doc.get('epoch')}  world {doc.get('world_size')}  ")
    head.append(f"auth {'hmac' if doc.get('auth') else 'none'}  ")
    if "uptime_s" in doc:
        head.append(f"up {_secs(doc['uptime_s'])}  ")
    head.append(f"({url})", style="dim")
    parts.append(head)
    if error:
        parts.append(Text(f"unreachable: {error} (showing the last status read)", style="bold red"))

    cps = rates.get("collectives_per_s")
    line = Text()
    for i, (name, value, bad) in enumerate((
        ("collectives/s", "-" if cps is None else f"{cps:.2f}", False),
        ("collectives ok", counters.get("ops_ok", 0), False),
        ("aborted ops", counters.get("ops_aborted", 0), counters.get("ops_aborted", 0) > 0),
        ("open ops", doc.get("open_ops", 0), False),
        ("pending", len(doc.get("pending", [])), False),
        ("joined", counters.get("peers_joined", 0), False),
        ("lost", counters.get("peers_lost", 0), counters.get("peers_lost", 0) > 0),
        ("evicted", counters.get("peers_evicted", 0), counters.get("peers_evicted", 0) > 0),
        ("left", counters.get("peers_left", 0), False),
    )):
        if i:
            line.append("  ")
        line.append(f"{name} ", style="dim")
        line.append(str(value), style="bold red" if bad else "bold")
    parts.append(line)

    groups = Table(title="groups (ring in send order)", title_justify="left", show_edge=False)
    groups.add_column("group", justify="right")
    groups.add_column("size", justify="right")
    groups.add_column("state")
    groups.add_column("ring")
    for g in doc.get("groups", []):
        ring = g.get("ring", [])
        bw = {(e["from"], e["to"]): e.get("bytes_per_s") for e in g.get("edges", [])}
        text = Text()
        for i, pid in enumerate(ring):
            text.append(_label(peers.get(pid), pid), style="" if pid in peers else "dim strike")
            if len(ring) > 1:
                nxt = ring[(i + 1) % len(ring)]
                rate = bw.get((pid, nxt))
                text.append(f" -({_bytes(rate)}/s)-> " if rate is not None else " -> ", style="dim")
        if len(ring) > 1:
            text.append(_label(peers.get(ring[0]), ring[0]), style="dim")
        state = Text("broken", style="bold red") if g.get("broken") else Text("ok", style="green")
        groups.add_row(str(g.get("group")), str(len(ring)), state, text)
    if not doc.get("groups"):
        groups.add_row("-", "0", "", Text("no ring yet (no admitted peer)", style="dim"))
    parts.append(groups)

    rank = {pid: i for g in doc.get("groups", []) for i, pid in enumerate(g.get("ring", []))}
    ptable = Table(title="peers", title_justify="left", show_edge=False)
    for name, justify in (
        ("peer", "left"), ("group", "right"), ("rank", "right"), ("state", "left"),
        ("heartbeat", "right"), ("sent", "right"), ("received", "right"),
        ("connected", "right"), ("address", "left"),
    ):
        ptable.add_column(name, justify=justify)  # type: ignore[arg-type]
    for pid, p in peers.items():
        ptable.add_row(
            _label(p, pid),
            str(p.get("group")),
            str(rank.get(pid, "-")),
            Text(p.get("state", "?"), style=STATE_STYLE.get(p.get("state", ""), "")),
            _secs(p.get("last_heartbeat_age")),
            _bytes(p.get("tx_bytes")),
            _bytes(p.get("rx_bytes")),
            _secs(p.get("connected_for")),
            str(p.get("address", "")),
        )
    if not peers:
        ptable.add_row(Text("no peer connected", style="dim"), *[""] * 8)
    parts.append(ptable)

    pending = doc.get("pending", [])
    if pending:
        parts.append(Text("pending joiners: " + ", ".join(
            _label(peers.get(pid), pid) for pid in pending), style="yellow"))

    etable = Table(title="recent events", title_justify="left", show_edge=False)
    etable.add_column("age", justify="right")
    etable.add_column("event")
    etable.add_column("epoch", justify="right")
    etable.add_column("peer")
    etable.add_column("detail")
    for e in reversed(doc.get("events", [])[-EVENTS_SHOWN:]):
        pid = e.get("peer_id")
        who = f"{e['name']} ({pid})" if e.get("name") and pid else (pid or "")
        detail = " ".join(x for x in (
            f"group {e['group']}" if "group" in e else "", e.get("reason", "")) if x)
        etable.add_row(
            _secs(e.get("age")) + " ago",
            Text(e.get("kind", "?"), style=EVENT_STYLE.get(e.get("kind", ""), "")),
            str(e.get("epoch", "")),
            who,
            detail,
        )
    if not doc.get("events"):
        etable.add_row("", Text("none yet", style="dim"), "", "", "")
    parts.append(etable)
    return Group(*parts)


# --------------------------------------------------------------------------
# Commands.


def cmd_status(args: argparse.Namespace) -> int:
    try:
        url = status_url(args.endpoint)
    except ValueError as exc:
        print(f"pccl status: {exc}", file=sys.stderr)
        return 2
    try:
        doc = fetch_status(url, args.timeout)
    except StatusError as exc:
        print(f"pccl status: {exc}", file=sys.stderr)
        return 1
    if args.json and not args.watch:
        print(json.dumps(doc, indent=1, sort_keys=True))
        return 0

    from rich.console import Console

    # Off a terminal (a pipe, a log) rich would assume 80 columns; tables
    # read better wider.  COLUMNS still wins when set.
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=120)
    if not args.watch:
        console.print(render(doc, url))
        return 0
    # Ctrl-C is how --watch ends, also when the shell that started it made
    # the job ignore SIGINT (a background job of a non-interactive shell,
    # as in CI): Python then installs no handler of its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.json:
            _watch_json(doc, url, args)
        elif console.is_terminal:
            _watch_live(console, doc, url, args)
        else:
            _watch_lines(console, doc, url, args)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends --watch: a clean exit
    return 0


def _poll(url: str, args: argparse.Namespace, doc: dict) -> tuple[dict, str | None]:
    time.sleep(args.interval)  # the refresh period (nothing waits on a condition here)
    try:
        return fetch_status(url, args.timeout), None
    except StatusError as exc:
        return doc, str(exc)


def _watch_live(console, doc: dict, url: str, args: argparse.Namespace) -> None:
    from rich.live import Live

    with Live(render(doc, url), console=console, auto_refresh=False, screen=False) as live:
        while True:
            doc, error = _poll(url, args, doc)
            live.update(render(doc, url, error), refresh=True)


def _watch_lines(console, doc: dict, url: str, args: argparse.Namespace) -> None:
    """--watch off a terminal: one full view per refresh, each headed by a
    rule with the time (no cursor movement in a log)."""
    error = None
    while True:
        console.rule(time.strftime("%H:%M:%S"))
        console.print(render(doc, url, error))
        console.file.flush()
        doc, error = _poll(url, args, doc)


def _watch_json(doc: dict, url: str, args: argparse.Namespace) -> None:
    """--watch --json: one status document a line (JSON Lines)."""
    while True:
        print(json.dumps(doc, sort_keys=True), flush=True)
        doc, error = _poll(url, args, doc)
        if error:
            print(f"pccl status: {error}", file=sys.stderr, flush=True)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be in (0, 3600] seconds: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pccl",
        description="Operate a pccl run: read a master's status, run a master.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    st = sub.add_parser(
        "status",
        help="show a master's status (peers, rings, counters, events)",
        description=(
            "Read the /status document of a pccl-master started with --status HOST:PORT and "
            "show it as tables: counters (collectives per second, aborted operations), peer "
            "groups with their ring in send order, peers (state, heartbeat age), pending "
            "joiners and recent events. The same view is served as a web page at "
            "http://HOST:PORT/. Exit code 1 (one line on stderr) when the endpoint cannot be "
            "read."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    st.add_argument("endpoint", metavar="HOST:PORT",
                    help="the master's --status address (or an http:// URL)")
    st.add_argument("--watch", "-w", action="store_true",
                    help="keep refreshing until Ctrl-C (a live view on a terminal, one view "
                    "per refresh otherwise; with --json one document per line)")
    st.add_argument("--interval", "-n", type=_positive, default=DEFAULT_INTERVAL,
                    metavar="SECONDS", help="refresh period of --watch")
    st.add_argument("--json", action="store_true", help="print the raw /status JSON")
    st.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                    help="give up on a request after this long")
    st.set_defaults(func=cmd_status)
    sub.add_parser(
        "master",
        help="run a pccl-master (same flags as pccl-master; see pccl master --help)",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "master":
        from .master.__main__ import main as master_main

        return master_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
