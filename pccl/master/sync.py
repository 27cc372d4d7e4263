"""The shared-state election: pure functions, no I/O, no clock.

Every admitted member of a peer group reports its shared state for one
sync: revision, strategy and, per tensor, name, dtype, shape, byte size and
content hash.  :func:`elect` turns the reports into one plan per peer:
either an error (the peer takes no further part) or the list of tensors it
must fetch, each with the peers that hold the elected content, and whether
it must serve others.  docs/shared-state.md is the prose version.

Rules (PCCL's, refined where PCCL gets stuck):

* **Revision.**  The group's next revision ``E`` is the last completed one
  plus one; for a group that never synced (or that emptied since), the
  highest revision reported by a peer that may send.  A peer reporting more
  than ``E`` is refused ("ahead of the run").  A peer below ``E`` is
  *outdated*: its content does not vote and it receives every tensor that
  differs.  Every peer that succeeds ends at ``E``.  If no peer reports
  ``E`` (all repeated or skipped a revision), the peers with the newest
  revision reported vote instead, so a group never gets stuck.
* **Candidates** (whose content votes): peers at ``E`` that may send
  (ENFORCE_POPULAR, SEND_ONLY).  When some are SEND_ONLY, only those vote,
  and a SEND_ONLY peer whose content differs from the elected one is
  refused (it must never receive).  RECEIVE_ONLY peers never vote and never
  serve; when every peer asked for RECEIVE_ONLY, every peer is refused.
* **Schema.**  The tensor names, dtypes and shapes most candidates share
  (ties: the earliest-joined candidate's) are the group's; a peer with any
  other schema is refused with a message that names the tensor.
* **Content**, per tensor: the hash most candidates hold; ties go to the
  hash of the earliest-joined candidate among the tied ones, so that a tie
  between two diverged halves of a group never mixes their tensors.
* **Distributors** of a tensor: every peer that may send and holds the
  elected hash (outdated ones too: the hash is what counts).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ENFORCE_POPULAR = "enforce_popular"
RECEIVE_ONLY = "receive_only"
SEND_ONLY = "send_only"
STRATEGIES = (ENFORCE_POPULAR, RECEIVE_ONLY, SEND_ONLY)

# Error kinds in a refused plan; the peer maps them to exception classes.
INVALID = "invalid"  # the peer's tensors do not fit the group's (ValueError)
STATE = "state"  # revision or strategy conflict (RuntimeError)

MAX_SOURCES = 16  # distributors listed per tensor


@dataclass
class SyncReport:
    """One peer's ``sync_state``, as the state machine keeps it."""

    peer_id: str
    serial: int  # join order: the deterministic tie-breaker
    p2p_address: str
    req: int
    revision: int
    strategy: str
    tensors: list[dict[str, Any]]  # name, dtype, shape, nbytes, hash

    def by_name(self) -> dict[str, dict[str, Any]]:
        return {t["name"]: t for t in self.tensors}


@dataclass
class Plan:
    """The master's answer to one peer."""

    error_kind: str = ""
    reason: str = ""
    fetch: list[dict[str, Any]] = field(default_factory=list)  # name, hash, nbytes, from
    serve: bool = False

    @property
    def ok(self) -> bool:
        return not self.error_kind


def _schema(report: SyncReport) -> tuple:
    return tuple(
        sorted((t["name"], t["dtype"], tuple(t["shape"]), t["nbytes"]) for t in report.tensors)
    )


def _schema_difference(report: SyncReport, ref: dict[str, dict[str, Any]]) -> str:
    """Why ``report``'s tensors do not fit the group's, naming a tensor."""
    mine = report.by_name()
    if len(mine) != len(report.tensors):
        dup = Counter(t["name"] for t in report.tensors).most_common(1)[0][0]
        return f"tensor {dup!r} appears twice in this peer's shared state"
    for name in sorted(ref):
        if name not in mine:
            return f"tensor {name!r} is missing from this peer's shared state (the group has it)"
    for name in sorted(mine):
        if name not in ref:
            return f"tensor {name!r} is not part of the group's shared state"
    for name in sorted(ref):
        a, b = mine[name], ref[name]
        if a["dtype"] != b["dtype"]:
            return f"tensor {name!r}: dtype {a['dtype']} here, {b['dtype']} in the group"
        if list(a["shape"]) != list(b["shape"]):
            return (
                f"tensor {name!r}: shape {list(a['shape'])} here, "
                f"{list(b['shape'])} in the group"
            )
        if a["nbytes"] != b["nbytes"]:
            return f"tensor {name!r}: {a['nbytes']} bytes here, {b['nbytes']} in the group"
    return ""


def next_revision(reports: list[SyncReport], last_revision: int | None) -> int:
    """The revision this sync produces (see the module doc)."""
    if last_revision is not None:
        return last_revision + 1
    senders = [r.revision for r in reports if r.strategy != RECEIVE_ONLY]
    return max(senders or [r.revision for r in reports])


def elect(
    reports: list[SyncReport], last_revision: int | None
) -> tuple[int, dict[str, Plan], dict[str, bytes]]:
    """``(revision, plan per peer id, elected hash per tensor)``; an empty
    hash map when nobody could be elected (every plan is then an error)."""
    revision = next_revision(reports, last_revision)
    plans: dict[str, Plan] = {}
    live: list[SyncReport] = []
    for r in sorted(reports, key=lambda r: r.serial):
        if r.revision > revision:
            plans[r.peer_id] = Plan(
                STATE,
                f"shared-state revision {r.revision} is ahead of the run: the group expects "
                f"{revision} (the previous sync was {revision - 1}); advance the revision by "
                "exactly one per sync",
            )
        else:
            live.append(r)

    senders = [r for r in live if r.strategy != RECEIVE_ONLY]
    if not senders:
        reason = "no peer of the group may send: every peer asked for RECEIVE_ONLY"
        for r in live:
            plans[r.peer_id] = Plan(STATE, reason)
        return revision, plans, {}
    # Nobody at the expected revision (every peer repeated or skipped a
    # revision): the most recent content present votes, as in PCCL, rather
    # than leaving the group stuck.
    newest = revision if any(r.revision == revision for r in senders) else max(
        r.revision for r in senders
    )
    current = [r for r in senders if r.revision == newest]
    if any(r.strategy == SEND_ONLY for r in current):
        current = [r for r in current if r.strategy == SEND_ONLY]

    # The schema most candidates share; ties go to the earliest candidate.
    counts = Counter(_schema(r) for r in current)
    best = max(counts.values())
    ref_report = next(r for r in current if counts[_schema(r)] == best)
    ref = ref_report.by_name()
    for r in live:
        why = _schema_difference(r, ref)
        if why:
            plans[r.peer_id] = Plan(INVALID, why)
    live = [r for r in live if r.peer_id not in plans]
    current = [r for r in current if r.peer_id not in plans]

    # Per tensor, the most popular hash; ties to the earliest candidate's.
    elected: dict[str, bytes] = {}
    for name in ref:
        votes = Counter(r.by_name()[name]["hash"] for r in current)
        top = max(votes.values())
        elected[name] = next(
            r.by_name()[name]["hash"] for r in current if votes[r.by_name()[name]["hash"]] == top
        )

    differing: dict[str, list[str]] = {}
    for r in live:
        mine = r.by_name()
        differing[r.peer_id] = [n for n in sorted(ref) if mine[n]["hash"] != elected[n]]
        if differing[r.peer_id] and r.strategy == SEND_ONLY:
            plans[r.peer_id] = Plan(
                STATE,
                f"SEND_ONLY peers disagree: tensor {differing[r.peer_id][0]!r} here differs "
                "from the content the other SEND_ONLY peers hold, and a SEND_ONLY peer never "
                "receives",
            )
    live = [r for r in live if r.peer_id not in plans]
    senders = [r for r in live if r.strategy != RECEIVE_ONLY]
    serving: set[str] = set()
    for i, r in enumerate(live):
        fetch = []
        for name in differing[r.peer_id]:
            holders = [
                s for s in senders if s is not r and s.by_name()[name]["hash"] == elected[name]
            ]
            if not holders:  # only when SEND_ONLY peers were refused above
                plans[r.peer_id] = Plan(
                    STATE, f"no peer that may send holds the elected content of tensor {name!r}"
                )
                break
            # Rotate per receiver, so receivers start on different distributors.
            k = i % len(holders)
            holders = (holders[k:] + holders[:k])[:MAX_SOURCES]
            fetch.append(
                {
                    "name": name,
                    "hash": elected[name],
                    "nbytes": ref[name]["nbytes"],
                    "from": [s.p2p_address for s in holders],
                }
            )
        else:
            plans[r.peer_id] = Plan(fetch=fetch)
            for f in fetch:
                serving.update(s.peer_id for s in senders if s.p2p_address in f["from"])
    for pid in serving:
        if plans[pid].ok:
            plans[pid].serve = True
    return revision, plans, elected


@dataclass
class SyncRound:
    """One group's sync in progress at the master.

    ``collect``: waiting for every admitted member's report (bounded by the
    vote timeout).  ``transfer``: plans sent; waiting for every receiver's
    ``sync_done`` (bounded by the sync timeout) before the distributors are
    released with ``sync_end``.  Reports that arrive during a transfer
    (a receiver that finished and synced again) wait in ``queued`` for the
    next round.
    """

    group: int
    deadline: float
    phase: str = "collect"
    reports: dict[str, SyncReport] = field(default_factory=dict)
    revision: int = 0
    receivers: set[str] = field(default_factory=set)
    distributors: set[str] = field(default_factory=set)
    all_ok: bool = True
    queued: dict[str, SyncReport] = field(default_factory=dict)
