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


def _schema_difference(
    report: SyncReport, mine: dict[str, dict[str, Any]], ref: dict[str, dict[str, Any]]
) -> str:
    """Why ``report``'s tensors (``mine``: indexed by name) do not fit the
    group's, naming a tensor."""
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


Index = dict[str, dict[str, dict[str, Any]]]  # peer id -> tensor name -> tensor entry


def elect(
    reports: list[SyncReport], last_revision: int | None
) -> tuple[int, dict[str, Plan], dict[str, bytes]]:
    """``(revision, plan per peer id, elected hash per tensor)``; an empty
    hash map when nobody could be elected (every plan is then an error).

    Five phases, each a function below: refuse the peers ahead of the run,
    pick the candidates that vote, elect the schema, elect the content per
    tensor, plan the fetches.  Each report's tensors are indexed by name
    once, so the election is linear in peers x tensors (it runs on the
    master's only event loop, which also answers heartbeats)."""
    revision = next_revision(reports, last_revision)
    plans: dict[str, Plan] = {}
    index: Index = {r.peer_id: r.by_name() for r in reports}
    live = _refuse_ahead(sorted(reports, key=lambda r: r.serial), revision, plans)
    current = _candidates(live, revision, plans)
    if current is None:
        return revision, plans, {}
    ref = _elect_schema(live, current, index, plans)
    live = [r for r in live if r.peer_id not in plans]
    current = [r for r in current if r.peer_id not in plans]
    elected = _elect_content(ref, current, index)
    differing = _refuse_diverged_senders(live, ref, elected, index, plans)
    live = [r for r in live if r.peer_id not in plans]
    _plan_fetches(live, ref, elected, differing, index, plans)
    return revision, plans, elected


def _refuse_ahead(
    reports: list[SyncReport], revision: int, plans: dict[str, Plan]
) -> list[SyncReport]:
    """Phase 1: refuse the peers whose revision is ahead of the run; the
    others, in join order."""
    live: list[SyncReport] = []
    for r in reports:
        if r.revision > revision:
            plans[r.peer_id] = Plan(
                STATE,
                f"shared-state revision {r.revision} is ahead of the run: the group expects "
                f"{revision} (the previous sync was {revision - 1}); advance the revision by "
                "exactly one per sync",
            )
        else:
            live.append(r)
    return live


def _candidates(
    live: list[SyncReport], revision: int, plans: dict[str, Plan]
) -> list[SyncReport] | None:
    """Phase 2: the peers whose content votes; None (every live peer
    refused) when no peer may send."""
    senders = [r for r in live if r.strategy != RECEIVE_ONLY]
    if not senders:
        reason = "no peer of the group may send: every peer asked for RECEIVE_ONLY"
        for r in live:
            plans[r.peer_id] = Plan(STATE, reason)
        return None
    # Nobody at the expected revision (every peer repeated or skipped a
    # revision): the most recent content present votes, as in PCCL, rather
    # than leaving the group stuck.
    newest = revision if any(r.revision == revision for r in senders) else max(
        r.revision for r in senders
    )
    current = [r for r in senders if r.revision == newest]
    if any(r.strategy == SEND_ONLY for r in current):
        current = [r for r in current if r.strategy == SEND_ONLY]
    return current


def _elect_schema(
    live: list[SyncReport], current: list[SyncReport], index: Index, plans: dict[str, Plan]
) -> dict[str, dict[str, Any]]:
    """Phase 3: the schema most candidates share (ties: the earliest
    candidate's); every live peer with another schema is refused."""
    schemas = {r.peer_id: _schema(r) for r in current}
    counts = Counter(schemas.values())
    best = max(counts.values())
    ref_report = next(r for r in current if counts[schemas[r.peer_id]] == best)
    ref = index[ref_report.peer_id]
    for r in live:
        why = _schema_difference(r, index[r.peer_id], ref)
        if why:
            plans[r.peer_id] = Plan(INVALID, why)
    return ref


def _elect_content(
    ref: dict[str, dict[str, Any]], current: list[SyncReport], index: Index
) -> dict[str, bytes]:
    """Phase 4: per tensor, the most popular hash among the candidates;
    ties to the earliest candidate's."""
    elected: dict[str, bytes] = {}
    tables = [index[r.peer_id] for r in current]
    for name in ref:
        hashes = [t[name]["hash"] for t in tables]
        votes = Counter(hashes)
        top = max(votes.values())
        elected[name] = next(h for h in hashes if votes[h] == top)
    return elected


def _refuse_diverged_senders(
    live: list[SyncReport],
    ref: dict[str, dict[str, Any]],
    elected: dict[str, bytes],
    index: Index,
    plans: dict[str, Plan],
) -> dict[str, list[str]]:
    """Phase 5a: the tensors each live peer lacks; a SEND_ONLY peer that
    lacks any is refused (it never receives)."""
    names = sorted(ref)
    differing: dict[str, list[str]] = {}
    for r in live:
        mine = index[r.peer_id]
        differing[r.peer_id] = [n for n in names if mine[n]["hash"] != elected[n]]
        if differing[r.peer_id] and r.strategy == SEND_ONLY:
            plans[r.peer_id] = Plan(
                STATE,
                f"SEND_ONLY peers disagree: tensor {differing[r.peer_id][0]!r} here differs "
                "from the content the other SEND_ONLY peers hold, and a SEND_ONLY peer never "
                "receives",
            )
    return differing


def _plan_fetches(
    live: list[SyncReport],
    ref: dict[str, dict[str, Any]],
    elected: dict[str, bytes],
    differing: dict[str, list[str]],
    index: Index,
    plans: dict[str, Plan],
) -> None:
    """Phase 5b: each live peer's plan (what to fetch from whom), and the
    ``serve`` flag of every distributor some receiver was sent to."""
    senders = [r for r in live if r.strategy != RECEIVE_ONLY]
    # The senders holding the elected content, per tensor: computed once,
    # only for the tensors somebody lacks.
    wanted = {n for r in live for n in differing[r.peer_id]}
    holders_of = {
        n: [s for s in senders if index[s.peer_id][n]["hash"] == elected[n]] for n in wanted
    }
    serving: set[str] = set()
    for i, r in enumerate(live):
        fetch = []
        used: list[SyncReport] = []
        for name in differing[r.peer_id]:
            holders = [s for s in holders_of[name] if s is not r]
            if not holders:  # only when SEND_ONLY peers were refused above
                plans[r.peer_id] = Plan(
                    STATE, f"no peer that may send holds the elected content of tensor {name!r}"
                )
                break
            # Rotate per receiver, so receivers start on different distributors.
            k = i % len(holders)
            holders = (holders[k:] + holders[:k])[:MAX_SOURCES]
            used.extend(holders)
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
            serving.update(s.peer_id for s in used)
    for pid in serving:
        if plans[pid].ok:
            plans[pid].serve = True


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
