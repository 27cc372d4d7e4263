"""pccl's logging set-up: the ``PCCL_LOG`` environment variable.

pccl logs through :mod:`logging` under the ``pccl`` logger (``pccl.master``,
``pccl.communicator``, ``pccl.control``, ``pccl.shared_state``) and, as a
library, configures nothing by default: the application's handlers decide.
``PCCL_LOG=debug|info|warning|error`` makes pccl print its own records at
that level and above to stderr (one handler on the ``pccl`` logger, which
then stops propagating, so no line is printed twice); ``PCCL_LOG=off``
silences it.  ``pccl-master`` takes its default ``--log-level`` from it.
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "PCCL_LOG"
FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "off": logging.CRITICAL + 10,
}

_handler: logging.Handler | None = None


def parse_level(text: str) -> int:
    """The level a ``PCCL_LOG`` value names; ValueError for anything else."""
    try:
        return LEVELS[text.strip().lower()]
    except KeyError:
        raise ValueError(
            f"{ENV}={text!r}: expected one of {', '.join(sorted(LEVELS))}"
        ) from None


def env_level() -> int | None:
    """The level of ``PCCL_LOG``, or None when unset, empty or invalid
    (an invalid value is reported once on stderr, never raised)."""
    text = os.environ.get(ENV, "")
    if not text.strip():
        return None
    try:
        return parse_level(text)
    except ValueError as exc:
        print(f"pccl: {exc}; ignored", file=sys.stderr)
        return None


def install(level: int, fmt: str = FORMAT) -> logging.Handler:
    """Print pccl's records at ``level`` and above to stderr (replacing a
    handler installed before)."""
    global _handler
    logger = logging.getLogger("pccl")
    if _handler is not None:
        logger.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(_handler)
    logger.setLevel(level)
    logger.propagate = False
    return _handler


def configure_from_env() -> None:
    """At import of pccl: install the stderr handler when ``PCCL_LOG`` is set."""
    level = env_level()
    if level is not None:
        install(level)
