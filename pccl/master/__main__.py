"""``pccl-master`` / ``python -m pccl.master``: run the master of a pccl run."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from .._wire import parse_hostport

DEFAULT_LISTEN = "0.0.0.0:48148"


def _hostport(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text, allow_port_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"must be positive seconds: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pccl-master",
        description=(
            "The master of a pccl run: membership, peer groups, ring order, epochs and "
            "the outcome of every collective (it never carries tensor data). Prints "
            "'pccl-master listening on HOST:PORT' once bound; SIGINT/SIGTERM stop it "
            "cleanly. See docs/operations.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--listen",
        type=_hostport,
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help="address peers connect to; port 0 picks a free port (IPv6: [::]:PORT)",
    )
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        help="file holding the run's shared secret (its bytes, trailing newline "
        "stripped); peers must use the same secret. Without it, anyone who reaches "
        "the port can join",
    )
    parser.add_argument(
        "--status",
        type=_hostport,
        default=None,
        metavar="HOST:PORT",
        help="serve the status page (GET /), /status (JSON) and /metrics (Prometheus text) "
        "here; off by default",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_seconds,
        default=0.5,
        metavar="SECONDS",
        help="how often peers send a heartbeat",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=_seconds,
        default=3.0,
        metavar="SECONDS",
        help="a peer silent this long is lost and its group's collectives are aborted; "
        "must exceed --heartbeat-interval",
    )
    parser.add_argument(
        "--vote-timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="a peer that does not join an update_topology vote (or report its ring "
        "ready) this long after the round started is evicted",
    )
    parser.add_argument(
        "--sync-timeout",
        type=_seconds,
        default=600.0,
        metavar="SECONDS",
        help="longest a shared-state transfer may take: distributors are released and "
        "receivers still fetching are counted as failed after this long",
    )
    from .. import _log

    parser.add_argument(
        "--probe-seconds",
        type=_seconds,
        default=0.2,
        metavar="SECONDS",
        help="optimize_topology(): how long each bandwidth measurement of an edge runs "
        "(once on one connection, once on the peer's p2p_connections)",
    )
    parser.add_argument(
        "--topology-max-age",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="optimize_topology() probes an edge again once its estimate is this old",
    )
    parser.add_argument(
        "--log-level",
        default="INFO" if _log.env_level() is None else os.environ[_log.ENV].strip().upper(),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "OFF"],
        help="log verbosity, on stderr; the PCCL_LOG environment variable sets the default",
    )
    return parser


def read_secret(path: str) -> bytes:
    with open(path, "rb") as f:
        secret = f.read(1 << 20)
    secret = secret.rstrip(b"\r\n")
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    return secret


async def _serve(args: argparse.Namespace, secret: bytes | None) -> None:
    from .server import MasterServer

    server = MasterServer(
        host=args.listen[0],
        port=args.listen[1],
        secret=secret,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        vote_timeout=args.vote_timeout,
        sync_timeout=args.sync_timeout,
        status=args.status,
        probe_seconds=args.probe_seconds,
        topology_max_age=args.topology_max_age,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_stop)
    try:
        await server.start()
        print(f"pccl-master listening on {server.address}", flush=True)
        if server.status_address:
            print(f"pccl-master status on {server.status_address}", flush=True)
        await server.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.heartbeat_timeout <= args.heartbeat_interval:
        parser.error("--heartbeat-timeout must be greater than --heartbeat-interval")
    from .. import _log

    _log.install(_log.parse_level(args.log_level))  # pccl.* records, one stderr handler
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=_log.FORMAT)
    secret = None
    if args.secret_file:
        try:
            secret = read_secret(args.secret_file)
        except (OSError, ValueError) as exc:
            parser.error(f"--secret-file: {exc}")

    from .._aio import new_event_loop

    loop = new_event_loop()
    try:
        loop.run_until_complete(_serve(args, secret))
    except OSError as exc:
        print(f"pccl-master: cannot listen: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
