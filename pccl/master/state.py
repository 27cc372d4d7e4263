"""The master's membership state machine: plain Python, no I/O, no clock.

The server feeds it events (a verified hello, a validated message, a closed
connection, the passing of time) and carries out what each call returns: an
:class:`Actions` with the messages to send, the connections to close and the
membership events to log.  ``now`` is always a monotonic time in seconds.

Invariants (see docs/protocol.md for the wire side):

* A peer is *pending* from its welcome until a vote round (or an empty run)
  admits it; then *admitted* until it leaves, is lost or is evicted.
* ``epoch`` changes only when a round completes with a change: membership
  changed since the last epoch or some voter reported a broken ring.  The
  ring of each group is fixed for an epoch.
* A group whose ring lost a member (or whose operation failed) is *broken*
  for the rest of the epoch: its open operations and every later one at that
  epoch are decided not ok, so every member learns the same verdict.
* An operation ``(group, epoch, tag, seq)`` is decided at most once.
"""

from __future__ import annotations

import itertools
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from . import probing, sync

PENDING = "pending"
ADMITTED = "admitted"

OpKey = tuple[int, int, int, int]  # (group, epoch, tag, seq)


@dataclass
class Peer:
    peer_id: str
    remote: str  # the address the master sees, for logs
    p2p_address: str  # the address the peer advertises to its ring neighbours
    group: int
    p2p_connections: int
    joined_at: float
    last_seen: float
    serial: int  # join order
    state: str = PENDING
    admitted_epoch: int | None = None
    name: str | None = None  # Communicator(name=...): logs, status, peers()

    @property
    def label(self) -> str:
        """``p3 (trainer-a)`` for messages, or the bare id without a name."""
        return f"{self.peer_id} ({self.name})" if self.name else self.peer_id


@dataclass(frozen=True)
class Event:
    """One membership change, logged and kept for /status."""

    kind: str  # joined | admitted | evicted | lost | left | epoch
    at: float
    epoch: int
    peer_id: str | None = None
    name: str | None = None
    remote: str | None = None
    p2p_address: str | None = None
    group: int | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Actions:
    """What the server must do after a state-machine call, in order."""

    sends: list[tuple[str, dict]] = field(default_factory=list)
    closes: list[tuple[str, str]] = field(default_factory=list)  # (peer_id, reason)
    events: list[Event] = field(default_factory=list)
    # Ring solves to run off the event loop (topology: probing.py).
    solves: list[probing.SolveRequest] = field(default_factory=list)

    def send(self, peer_id: str, msg: dict) -> None:
        self.sends.append((peer_id, msg))

    def close(self, peer_id: str, reason: str) -> None:
        self.closes.append((peer_id, reason))

    def messages_for(self, peer_id: str) -> list[dict]:
        """The messages queued for one peer (a test convenience)."""
        return [m for p, m in self.sends if p == peer_id]


@dataclass
class Op:
    expected: frozenset[str]  # the group's ring at the op's epoch (shared, not copied)
    reporters: dict[str, None] = field(default_factory=dict)  # in report order
    reported_ok: set[str] = field(default_factory=set)  # always a subset of expected
    outcome: bool | None = None


class MasterState:
    """Membership, rings, epochs, votes and operation outcomes."""

    def __init__(
        self,
        *,
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 3.0,
        vote_timeout: float = 30.0,
        max_open_ops: int = 1024,
        max_decided_ops: int = 65536,
        max_events: int = 100,
        sync_timeout: float = 600.0,
        probe_seconds: float = 0.2,
        topology_max_age: float = 300.0,
        topology_improvement: float = 0.2,
    ):
        if not 0 < heartbeat_interval < heartbeat_timeout:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")
        if vote_timeout <= 0:
            raise ValueError("vote_timeout must be positive")
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.vote_timeout = vote_timeout
        self.max_open_ops = max_open_ops
        self.max_decided_ops = max_decided_ops
        if sync_timeout <= 0:
            raise ValueError("sync_timeout must be positive")
        self.sync_timeout = sync_timeout
        # Shared state, per group: the round in progress and the last
        # completed revision (forgotten when the group empties).
        self.sync_rounds: dict[int, sync.SyncRound] = {}
        self.sync_revisions: dict[int, int] = {}
        self._sync_holders: dict[int, set[str]] = {}  # peers that took part in a sync

        self._topology_init(probe_seconds, topology_max_age, topology_improvement)

        self.peers: dict[str, Peer] = {}  # insertion order is join order
        self.epoch = 0
        self.rings: dict[int, list[str]] = {}  # group -> ring at this epoch
        # Derived from rings, so a message never scans a ring: the members of
        # each group's ring and every ring member's rank in it.
        self._ring_sets: dict[int, frozenset[str]] = {}
        self._ring_rank: dict[str, int] = {}
        # Peers by state, and admitted peers per group (kept with every
        # change of state, so no per-message handler counts peers).
        self._n_pending = 0
        self._n_admitted = 0
        self._group_admitted: dict[int, int] = {}
        self.broken: set[int] = set()  # groups whose ring broke during this epoch
        self._membership_changed = False
        self._serial = itertools.count(1)
        # The run's token: point-to-point handshakes carry it, so peers of
        # another run (another master) sharing the secret are refused.
        self.run_token = secrets.randbits(63)

        # The open vote round: admitted voter -> (req, ring_ok, admit).
        self.votes: dict[str, tuple[int, bool, bool]] = {}
        self.vote_deadline: float | None = None

        # The ring-ready phase after a changed topology.
        self.ring_phase_epoch: int | None = None
        self.ring_waiting: set[str] = set()
        self.ring_phase_ok = True
        self.ring_deadline: float | None = None

        self.ops: OrderedDict[OpKey, Op] = OrderedDict()
        self._open_ops: dict[int, int] = {}  # group -> undecided ops
        self._undecided: dict[int, dict[OpKey, Op]] = {}  # group -> its undecided ops
        self._decided: deque[OpKey] = deque()

        self.events: deque[Event] = deque(maxlen=max_events)
        self.counters = {
            "ops_ok": 0,
            "ops_aborted": 0,
            "peers_joined": 0,
            "peers_admitted": 0,
            "peers_lost": 0,
            "peers_evicted": 0,
            "peers_left": 0,
            "syncs": 0,
            "syncs_transferred": 0,
        }

    # ------------------------------------------------------------------
    # Queries.

    def admitted(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.state == ADMITTED]

    def pending(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.state == PENDING]

    def peers_pending(self) -> bool:
        return self._n_pending > 0

    def snapshot(self, now: float) -> dict[str, Any]:
        """A JSON-ready view for /status."""
        return {
            "epoch": self.epoch,
            "world_size": len(self.admitted()),
            "peers": [
                {
                    "peer_id": p.peer_id,
                    **({"name": p.name} if p.name else {}),
                    "state": p.state,
                    "group": p.group,
                    "address": p.remote,
                    "p2p_address": p.p2p_address,
                    "p2p_connections": p.p2p_connections,
                    "last_heartbeat_age": round(max(0.0, now - p.last_seen), 3),
                    "connected_for": round(max(0.0, now - p.joined_at), 3),
                }
                for p in self.peers.values()
            ],
            "groups": [
                dict(
                    {"group": g, "ring": list(ring), "broken": g in self.broken},
                    **self._topology_snapshot(g, ring, now),
                )
                for g, ring in sorted(self.rings.items())
            ],
            "vote": {
                "open": self.vote_deadline is not None,
                "voted": sorted(self.votes),
                "deadline_in": None
                if self.vote_deadline is None
                else round(self.vote_deadline - now, 3),
            },
            "ring_phase": None
            if self.ring_phase_epoch is None
            else {"epoch": self.ring_phase_epoch, "waiting": sorted(self.ring_waiting)},
            "open_ops": sum(self._open_ops.values()),
            "counters": dict(self.counters),
            "events": [dict(e.as_dict(), age=round(now - e.at, 3)) for e in self.events],
        }

    # ------------------------------------------------------------------
    # Events in.

    def hello(
        self,
        *,
        remote: str,
        p2p_address: str,
        peer_group: int,
        p2p_connections: int,
        welcome_mac: bytes,
        now: float,
        name: str | None = None,
    ) -> tuple[str, Actions]:
        """A peer passed the handshake: welcome it as pending (admitted at
        once when the run has no admitted peer)."""
        acts = Actions()
        serial = next(self._serial)
        peer_id = f"p{serial}"
        peer = Peer(
            peer_id=peer_id,
            remote=remote,
            p2p_address=p2p_address,
            group=peer_group,
            p2p_connections=p2p_connections,
            joined_at=now,
            last_seen=now,
            serial=serial,
            name=name,
        )
        self.peers[peer_id] = peer
        self._n_pending += 1
        self.counters["peers_joined"] += 1
        acts.send(
            peer_id,
            {
                "type": "welcome",
                "peer_id": peer_id,
                "mac": welcome_mac,
                "heartbeat_interval": float(self.heartbeat_interval),
                "heartbeat_timeout": float(self.heartbeat_timeout),
            },
        )
        self._event(acts, "joined", now, peer)
        self._maybe_complete_round(now, acts)
        return peer_id, acts

    def handle(self, peer_id: str, msg: dict, now: float) -> Actions:
        """A validated message from a welcomed peer."""
        acts = Actions()
        peer = self.peers.get(peer_id)
        if peer is None:  # already removed; its connection is closing
            return acts
        peer.last_seen = now
        kind = msg["type"]
        if kind == "heartbeat":
            acts.send(peer_id, {"type": "heartbeat_ack"})
        elif kind == "pending_query":
            acts.send(
                peer_id,
                {"type": "pending_reply", "req": msg["req"], "pending": self.peers_pending()},
            )
        elif kind == "update_topology":
            self._vote(peer, msg["req"], msg["ring_ok"], msg["admit"], now, acts)
        elif kind == "ring_ready":
            self._ring_ready(peer, msg["epoch"], msg["ok"], now, acts)
        elif kind == "op_done":
            self._op_done(peer, msg["epoch"], msg["tag"], msg["seq"], msg["ok"], now, acts)
            if "link_bytes" in msg and peer.peer_id in self.peers:
                self._passive_sample(peer, msg, now, acts)
        elif kind == "leave":
            self._remove(peer, "left", "peer left", now, acts)
        elif kind == "sync_state":
            self._sync_state(peer, msg, now, acts)
        elif kind == "sync_done":
            self._sync_done(peer, msg["revision"], msg["ok"], now, acts)
        elif kind == "optimize_topology":
            self._optimize_call(peer, msg["req"], now, acts)
        elif kind == "probe_result":
            self._probe_result(peer, msg, now, acts)
        else:  # hello after welcome, or a type validate() let through by mistake
            self._remove(peer, "lost", f"unexpected {kind!r} message", now, acts)
        return acts

    def disconnect(self, peer_id: str, reason: str, now: float) -> Actions:
        """The connection of a welcomed peer closed or broke the protocol."""
        acts = Actions()
        peer = self.peers.get(peer_id)
        if peer is not None:
            self._remove(peer, "lost", reason, now, acts)
        return acts

    def tick(self, now: float) -> Actions:
        """Time passed: silent peers are lost, overdue votes and ring
        reports are evicted."""
        acts = Actions()
        deadline = now - self.heartbeat_timeout
        for peer in [p for p in self.peers.values() if p.last_seen < deadline]:
            if peer.peer_id in self.peers:
                silent = now - peer.last_seen
                self._remove(peer, "lost", f"silent for {silent:.2f} s", now, acts)
        if self.ring_deadline is not None and now >= self.ring_deadline:
            for pid in sorted(self.ring_waiting):
                peer = self.peers.get(pid)
                if peer is not None:
                    reason = "no ring_ready within the vote timeout"
                    self._remove(peer, "evicted", reason, now, acts, settle=False)
            self._finish_ring_phase(False, now, acts)
        if (
            self.vote_deadline is not None
            and now >= self.vote_deadline
            and self.ring_phase_epoch is None
        ):
            # The voters are idle, waiting for their topology: no abort needed.
            for peer in self.admitted():
                if peer.peer_id not in self.votes:
                    reason = "did not vote within the vote timeout"
                    self._remove(peer, "evicted", reason, now, acts, settle=False, abort=False)
            self._maybe_complete_round(now, acts)
        self._sync_tick(now, acts)
        self._optimize_tick(now, acts)
        return acts

    # ------------------------------------------------------------------
    # Votes and topology.

    def _vote(
        self, peer: Peer, req: int, ring_ok: bool, admit: bool, now: float, acts: Actions
    ) -> None:
        if peer.state != ADMITTED:
            # A pending peer has no vote; it waits for its topology.
            return
        self.votes[peer.peer_id] = (req, ring_ok, admit)
        if self.vote_deadline is None:
            self.vote_deadline = now + self.vote_timeout
        self._maybe_complete_round(now, acts)

    def _maybe_complete_round(self, now: float, acts: Actions) -> None:
        if self.ring_phase_epoch is not None:
            return  # votes wait until the current ring is ready
        if self._n_admitted:
            if not self.votes:
                self.vote_deadline = None  # every voter is gone: no round is open
            elif len(self.votes) >= self._n_admitted and all(
                p.peer_id in self.votes for p in self.admitted()
            ):
                # (votes come from admitted peers only, so the count decides;
                # the scan runs once per round, not once per vote)
                self._complete_round(now, acts)
        elif self._n_pending:
            self._complete_round(now, acts)  # nobody to ask: admit at once
        else:
            self.votes.clear()
            self.vote_deadline = None

    def _complete_round(self, now: float, acts: Actions) -> None:
        votes, self.votes, self.vote_deadline = self.votes, {}, None
        # One voter saying admit=False (a retry after a loss) defers the
        # newcomers to a later round, so they never land in a retried step.
        newcomers = (
            self.pending() if self._n_pending and all(v[2] for v in votes.values()) else []
        )
        changed = (
            bool(newcomers)
            or self._membership_changed
            or any(not v[1] for v in votes.values())
            or self.epoch == 0
            or bool(self.proposed_rings)
        )
        if changed:
            self.epoch += 1
            self._membership_changed = False
            self.broken.clear()
            for peer in newcomers:
                peer.state = ADMITTED
                self._n_pending -= 1
                self._n_admitted += 1
                self._group_admitted[peer.group] = self._group_admitted.get(peer.group, 0) + 1
                peer.admitted_epoch = self.epoch
                self.counters["peers_admitted"] += 1
                self._event(acts, "admitted", now, peer)
            self.rings = {}
            for peer in sorted(self.admitted(), key=lambda p: p.serial):  # join order
                self.rings.setdefault(peer.group, []).append(peer.peer_id)
            self._apply_ring_orders()
            self._ring_sets = {g: frozenset(r) for g, r in self.rings.items()}
            self._ring_rank = {pid: i for r in self.rings.values() for i, pid in enumerate(r)}
            self._event(
                acts,
                "epoch",
                now,
                None,
                reason="rings "
                + "; ".join(f"group {g}: {' '.join(r)}" for g, r in sorted(self.rings.items())),
            )
            self._prune_ops()
            self.ring_phase_epoch = self.epoch
            self.ring_waiting = {p.peer_id for p in self.admitted()}
            self.ring_phase_ok = True
            self.ring_deadline = now + self.vote_timeout
        world_size = self._n_admitted
        # One copy of each ring, shared by the messages of all its members
        # (the server validates and encodes a shared ring once per round).
        shared = {g: list(r) for g, r in self.rings.items()}
        peers = self._peer_list()
        for peer in self.admitted():
            vote = votes.get(peer.peer_id)
            ring = self.rings[peer.group]
            rank = self._ring_rank[peer.peer_id]
            successor = self.peers.get(ring[(rank + 1) % len(ring)])
            acts.send(
                peer.peer_id,
                {
                    "type": "topology",
                    "req": None if vote is None else vote[0],
                    "epoch": self.epoch,
                    "changed": changed,
                    "rank": rank,
                    "world_size": world_size,
                    "group_world_size": len(ring),
                    "next": successor.p2p_address if len(ring) > 1 and successor else None,
                    "ring": shared[peer.group],
                    "run": self.run_token,
                    "peers": peers,
                },
            )

    def _peer_list(self) -> list[dict[str, Any]]:
        """Every admitted peer as peers() shows it (point-to-point)."""
        rank = self._ring_rank  # an index: ring.index() per peer made a vote O(n^2)
        return [
            {"peer_id": p.peer_id, "num": p.serial, "name": p.name or "", "group": p.group,
             "rank": rank.get(p.peer_id, 0), "address": p.p2p_address}
            for p in self.admitted()
        ]

    def _ring_ready(self, peer: Peer, epoch: int, ok: bool, now: float, acts: Actions) -> None:
        if epoch != self.ring_phase_epoch or peer.peer_id not in self.ring_waiting:
            return  # stale or duplicate report
        self.ring_waiting.discard(peer.peer_id)
        if not ok:
            self.ring_phase_ok = False
            self.broken.add(peer.group)
        if not self.ring_waiting:
            self._finish_ring_phase(self.ring_phase_ok, now, acts)

    def _finish_ring_phase(self, ok: bool, now: float, acts: Actions) -> None:
        epoch = self.ring_phase_epoch
        if epoch is None:
            return
        self.ring_phase_epoch = None
        self.ring_waiting = set()
        self.ring_deadline = None
        if not ok:
            self.broken.update(self.rings)
        for peer in self.admitted():
            acts.send(peer.peer_id, {"type": "topology_ready", "epoch": epoch, "ok": ok})
        self._maybe_complete_round(now, acts)

    # ------------------------------------------------------------------
    # Operation outcomes.

    def _op_done(
        self, peer: Peer, epoch: int, tag: int, seq: int, ok: bool, now: float, acts: Actions
    ) -> None:
        key = (peer.group, epoch, tag, seq)
        op = self.ops.get(key)
        if op is not None and op.outcome is not None:
            self._reply_outcome(peer.peer_id, key, op.outcome, acts)
            return
        ring = self._ring_sets.get(peer.group, frozenset())
        if peer.state != ADMITTED or epoch != self.epoch or peer.peer_id not in ring:
            # Not a member of that ring at that epoch: nothing to agree on.
            self._reply_outcome(peer.peer_id, key, False, acts)
            return
        if op is None:
            if peer.group in self.broken:
                # The ring broke earlier in this epoch: this operation cannot
                # have completed everywhere.  Record it so everyone agrees.
                op = Op(expected=ring, reporters={peer.peer_id: None})
                self._open(key, op)
                self._decide(key, op, False, acts)
                return
            if self._open_ops.get(peer.group, 0) >= self.max_open_ops:
                self._remove(peer, "lost", "too many open operations", now, acts)
                return
            op = Op(expected=ring)
            self._open(key, op)
        op.reporters[peer.peer_id] = None  # a repeated report keeps its place
        if not ok:
            self._decide(key, op, False, acts)
            reason = f"operation tag={tag} seq={seq} failed on {peer.label}"
            self._break_group(peer.group, reason, acts)
        else:
            op.reported_ok.add(peer.peer_id)
            # reported_ok is a subset of expected: equal sizes mean equal sets.
            if len(op.reported_ok) >= len(op.expected):
                self._decide(key, op, True, acts)

    def _open(self, key: OpKey, op: Op) -> None:
        self.ops[key] = op
        self._open_ops[key[0]] = self._open_ops.get(key[0], 0) + 1
        self._undecided.setdefault(key[0], {})[key] = op

    @staticmethod
    def _outcome_msg(key: OpKey, ok: bool) -> dict:
        _, epoch, tag, seq = key
        return {"type": "op_outcome", "epoch": epoch, "tag": tag, "seq": seq, "ok": ok}

    def _reply_outcome(self, peer_id: str, key: OpKey, ok: bool, acts: Actions) -> None:
        acts.send(peer_id, self._outcome_msg(key, ok))

    def _decide(self, key: OpKey, op: Op, ok: bool, acts: Actions) -> None:
        op.outcome = ok
        self._open_ops[key[0]] -= 1
        self._undecided[key[0]].pop(key, None)
        self.counters["ops_ok" if ok else "ops_aborted"] += 1
        # One message object for every reporter: the server encodes it once.
        msg = self._outcome_msg(key, ok)
        for pid in op.reporters:
            if pid in self.peers:
                acts.send(pid, msg)
        self._decided.append(key)
        while len(self._decided) > self.max_decided_ops:
            self.ops.pop(self._decided.popleft(), None)

    def _break_group(
        self,
        group: int,
        reason: str,
        acts: Actions,
        only_unreported: str = "",
        abort: bool = True,
    ) -> bool:
        """Mark the group's ring broken for this epoch and decide its open
        operations not ok (with ``only_unreported``, only those that peer had
        not reported ok).  Returns whether any operation was decided."""
        self.broken.add(group)
        decided = False
        for key, op in list(self._undecided.get(group, {}).items()):
            if key[1] != self.epoch:
                continue
            if only_unreported and only_unreported in op.reported_ok:
                continue
            self._decide(key, op, False, acts)
            decided = True
        if abort and not only_unreported:
            self._send_abort(group, reason, acts)
        return decided

    def _send_abort(self, group: int, reason: str, acts: Actions) -> None:
        msg = {"type": "abort", "epoch": self.epoch, "reason": reason}
        for peer in self.admitted():
            if peer.group == group:
                acts.send(peer.peer_id, msg)

    def _prune_ops(self) -> None:
        # Outcomes are kept for the current and the previous epoch only.
        for key in [k for k in self.ops if k[1] < self.epoch - 1]:
            op = self.ops.pop(key)
            if op.outcome is None:
                self._open_ops[key[0]] -= 1
                self._undecided[key[0]].pop(key, None)
        self._decided = deque(k for k in self._decided if k in self.ops)

    # ------------------------------------------------------------------
    # Removal.

    def _remove(
        self,
        peer: Peer,
        kind: str,
        reason: str,
        now: float,
        acts: Actions,
        *,
        settle: bool = True,
        abort: bool = True,
    ) -> None:
        """Take a peer out of the run: ``kind`` is lost, evicted or left.
        With ``settle`` false the caller finishes the ring phase and the vote
        round itself (it is removing several peers at once)."""
        del self.peers[peer.peer_id]
        if peer.state == ADMITTED:
            self._n_admitted -= 1
            left_in_group = self._group_admitted[peer.group] - 1
            if left_in_group:
                self._group_admitted[peer.group] = left_in_group
            else:
                del self._group_admitted[peer.group]
        else:
            self._n_pending -= 1
        self.votes.pop(peer.peer_id, None)
        if peer.state == ADMITTED:
            # point-to-point: the others' sends/recvs with it fail now
            for other in self.admitted():
                acts.send(other.peer_id,
                          {"type": "peer_lost", "peer_id": peer.peer_id, "reason": reason})
        self.counters[f"peers_{kind}"] += 1
        if kind == "evicted":
            acts.send(peer.peer_id, {"type": "evicted", "reason": reason})
        acts.close(peer.peer_id, reason)
        self._event(acts, kind, now, peer, reason=reason)
        if peer.state == ADMITTED:
            self._membership_changed = True
            if peer.peer_id in self._ring_sets.get(peer.group, ()):
                if kind == "left":
                    # A clean leave fails only the operations it walked out of.
                    if self._break_group(peer.group, reason, acts, only_unreported=peer.peer_id):
                        self._send_abort(peer.group, f"{peer.label} left mid-operation", acts)
                else:
                    self._break_group(
                        peer.group, f"{peer.label} {kind}: {reason}", acts, abort=abort
                    )
            # A ring that lost a member cannot be ready, reported or not.
            if settle and self.ring_phase_epoch is not None:
                self._finish_ring_phase(False, now, acts)
        if settle:
            self._maybe_complete_round(now, acts)
        self._sync_forget(peer, now, acts)
        self._topology_forget(peer, now, acts)

    # ------------------------------------------------------------------
    # Shared state (election rules in sync.py).

    def _sync_state(self, peer: Peer, msg: dict, now: float, acts: Actions) -> None:
        if peer.state != ADMITTED:
            acts.send(peer.peer_id, self._plan_msg(msg["req"], 0, sync.Plan(
                sync.STATE, "not admitted yet: sync_shared_state() needs connect() to return")))
            return
        report = sync.SyncReport(
            peer_id=peer.peer_id,
            serial=peer.serial,
            p2p_address=peer.p2p_address,
            req=msg["req"],
            revision=msg["revision"],
            strategy=msg["strategy"],
            tensors=msg["tensors"],
        )
        report.prepare()  # per-report work now, not all at once in the election
        rnd = self.sync_rounds.get(peer.group)
        if rnd is None:
            rnd = sync.SyncRound(group=peer.group, deadline=now + self.vote_timeout)
            self.sync_rounds[peer.group] = rnd
        if rnd.phase == "transfer":
            rnd.queued[peer.peer_id] = report  # its next sync, after this transfer
            return
        rnd.reports[peer.peer_id] = report
        self._sync_maybe_elect(rnd, now, acts)

    def _sync_maybe_elect(self, rnd: sync.SyncRound, now: float, acts: Actions) -> None:
        if rnd.phase != "collect" or len(rnd.reports) < self._group_admitted.get(rnd.group, 0):
            return  # (reports come from admitted members: the count decides per report)
        members = [p.peer_id for p in self.admitted() if p.group == rnd.group]
        if not all(pid in rnd.reports for pid in members):
            return
        reports = [r for pid, r in rnd.reports.items() if pid in self.peers]
        if not reports:
            del self.sync_rounds[rnd.group]
            return
        revision, plans, _ = sync.elect(reports, self.sync_revisions.get(rnd.group))
        if any(p.ok for p in plans.values()):
            self.sync_revisions[rnd.group] = revision
            holders = self._sync_holders.setdefault(rnd.group, set())
            holders.update(pid for pid, p in plans.items() if p.ok)
        self.counters["syncs"] += 1
        rnd.revision = revision
        rnd.receivers = {pid for pid, p in plans.items() if p.ok and p.fetch}
        rnd.distributors = {pid for pid, p in plans.items() if p.ok and p.serve}
        for r in reports:
            acts.send(r.peer_id, self._plan_msg(r.req, revision, plans[r.peer_id]))
        if rnd.receivers:
            self.counters["syncs_transferred"] += 1
            rnd.phase = "transfer"
            rnd.deadline = now + self.sync_timeout
        else:
            self._sync_finish(rnd, now, acts)

    @staticmethod
    def _plan_msg(req: int, revision: int, plan: sync.Plan) -> dict:
        return {
            "type": "sync_plan",
            "req": req,
            "revision": revision,
            "error": plan.error_kind,
            "reason": plan.reason[:1024],
            "fetch": plan.fetch,
            "serve": plan.serve,
        }

    def _sync_done(self, peer: Peer, revision: int, ok: bool, now: float, acts: Actions) -> None:
        rnd = self.sync_rounds.get(peer.group)
        if rnd is None or rnd.phase != "transfer" or revision != rnd.revision:
            return  # stale: that transfer is over
        if peer.peer_id in rnd.receivers:
            rnd.receivers.discard(peer.peer_id)
            rnd.all_ok = rnd.all_ok and ok
            if not rnd.receivers:
                self._sync_finish(rnd, now, acts)

    def _sync_finish(self, rnd: sync.SyncRound, now: float, acts: Actions) -> None:
        """Release the distributors; start the next round with what queued."""
        for pid in sorted(rnd.distributors):
            if pid in self.peers:
                acts.send(pid, {"type": "sync_end", "revision": rnd.revision, "ok": rnd.all_ok})
        del self.sync_rounds[rnd.group]
        queued = {pid: r for pid, r in rnd.queued.items() if pid in self.peers}
        if queued:
            nxt = sync.SyncRound(group=rnd.group, deadline=now + self.vote_timeout, reports=queued)
            self.sync_rounds[rnd.group] = nxt
            self._sync_maybe_elect(nxt, now, acts)

    def _sync_forget(self, peer: Peer, now: float, acts: Actions) -> None:
        """A peer left the run: its report no longer counts and it no longer
        owes a ``sync_done``; a group with no member forgets its revision."""
        rnd = self.sync_rounds.get(peer.group)
        if rnd is not None:
            rnd.reports.pop(peer.peer_id, None)
            rnd.queued.pop(peer.peer_id, None)
            rnd.distributors.discard(peer.peer_id)
            if rnd.phase == "transfer":
                if peer.peer_id in rnd.receivers:
                    rnd.receivers.discard(peer.peer_id)
                    rnd.all_ok = False
                    if not rnd.receivers:
                        self._sync_finish(rnd, now, acts)
            else:
                self._sync_maybe_elect(rnd, now, acts)
        holders = self._sync_holders.get(peer.group, set())
        holders.discard(peer.peer_id)
        if not holders:
            # Nobody who ever held this group's state is left: forget its
            # revision, so peers restarting from a checkpoint can sync again.
            self._sync_holders.pop(peer.group, None)
            self.sync_revisions.pop(peer.group, None)
        if not self._group_admitted.get(peer.group):
            rnd = self.sync_rounds.pop(peer.group, None)
            if rnd is not None:
                for pid in rnd.distributors:
                    acts.send(pid, {"type": "sync_end", "revision": rnd.revision, "ok": False})

    def _sync_tick(self, now: float, acts: Actions) -> None:
        for rnd in list(self.sync_rounds.values()):
            if now < rnd.deadline or self.sync_rounds.get(rnd.group) is not rnd:
                continue
            if rnd.phase == "collect":
                # Members that never reported are evicted, as in a vote.
                for peer in self.admitted():
                    if peer.group == rnd.group and peer.peer_id not in rnd.reports:
                        reason = "did not call sync_shared_state within the vote timeout"
                        self._remove(peer, "evicted", reason, now, acts)
                if self.sync_rounds.get(rnd.group) is rnd:
                    self._sync_maybe_elect(rnd, now, acts)
            else:
                rnd.all_ok = False
                rnd.receivers.clear()
                self._sync_finish(rnd, now, acts)

    def _event(
        self, acts: Actions, kind: str, now: float, peer: Peer | None, reason: str | None = None
    ) -> None:
        event = Event(
            kind=kind,
            at=now,
            epoch=self.epoch,
            peer_id=peer.peer_id if peer else None,
            name=peer.name if peer else None,
            remote=peer.remote if peer else None,
            p2p_address=peer.p2p_address if peer else None,
            group=peer.group if peer else None,
            reason=reason,
        )
        self.events.append(event)
        acts.events.append(event)

    # ------------------------------------------------------------------
    # Topology: measured edges, optimize_topology() rounds, the ring order
    # (bookkeeping in probing.py, the solver in topology.py,
    # docs/topology.md).

    def _topology_init(self, probe_seconds: float, max_age: float, improvement: float) -> None:
        if probe_seconds <= 0:
            raise ValueError("probe_seconds must be positive")
        if improvement < 0:
            raise ValueError("topology_improvement must be >= 0")
        self.probe_seconds = probe_seconds
        # A probe that reports nothing this long after it was sent counts
        # as failed (its edge unreachable); the fetches themselves give up
        # after a few seconds without progress.
        self.probe_timeout = probe_seconds * 8 + 10.0
        self.topology_improvement = improvement
        self.topology = probing.EdgeStore(max_age=max_age)
        self.optimize_rounds: dict[int, probing.OptimizeRound] = {}
        self.proposed_rings: dict[int, list[str]] = {}  # installed at the next epoch
        self.ring_orders: dict[int, list[str]] = {}  # the installed optimised orders
        self.topology_results: dict[int, dict[str, Any]] = {}  # last solve per group
        self._solve_tokens = itertools.count(1)
        self._passive_pending = False  # a passive re-solve is running
        self._last_passive: dict[int, float] = {}
        self.passive_min_busy = 0.05  # seconds of link-limited time a sample needs
        self.passive_interval = 1.0  # seconds between re-solves of one group

    def _apply_ring_orders(self) -> None:
        """At a new epoch: install proposed rings, and keep earlier
        optimised orders across membership changes (survivors keep their
        order, newcomers join at the end)."""
        self.ring_orders.update(self.proposed_rings)
        self.proposed_rings.clear()
        for g, joined in self.rings.items():
            order = self.ring_orders.get(g)
            if not order:
                continue
            members = set(joined)
            kept = [p for p in order if p in members]
            self.rings[g] = kept + [p for p in joined if p not in set(kept)]
            self.ring_orders[g] = list(self.rings[g])

    def _topology_snapshot(self, group: int, ring: list[str], now: float) -> dict[str, Any]:
        members = [p.peer_id for p in self.admitted() if p.group == group]
        doc: dict[str, Any] = {
            "matrix": self.topology.as_list(members, now),
            "proposed_ring": self.proposed_rings.get(group),
        }
        result = self.topology_results.get(group)
        if result is not None:
            doc["topology"] = dict(result, age_s=round(now - result["at"], 3))
            del doc["topology"]["at"]
        rnd = self.optimize_rounds.get(group)
        if rnd is not None:
            doc["optimizing"] = {
                "phase": rnd.phase,
                "called": sorted(rnd.reqs),
                "rounds_left": len(rnd.rounds),
                "probing": sorted(f"{s}->{d}" for d, s in rnd.outstanding.items()),
            }
        return doc

    @staticmethod
    def _ring_edges(ring: list[str]) -> set[tuple[str, str]]:
        if len(ring) < 2:
            return set()
        return {(a, ring[(i + 1) % len(ring)]) for i, a in enumerate(ring)}

    def _optimize_call(self, peer: Peer, req: int, now: float, acts: Actions) -> None:
        rnd = self.optimize_rounds.get(peer.group)
        if peer.state != ADMITTED or (rnd is not None and rnd.phase != "collect"):
            why = ("not admitted yet: optimize_topology() needs connect() to return"
                   if peer.state != ADMITTED else "an optimize_topology() of this group is "
                   "already running (every peer of the group must call it once)")
            acts.send(peer.peer_id, self._topology_info_msg(req, 0, None, why, [], now))
            return
        if rnd is None:
            rnd = probing.OptimizeRound(group=peer.group, deadline=now + self.vote_timeout,
                                        started_at=now, token=next(self._solve_tokens))
            self.optimize_rounds[peer.group] = rnd
        rnd.reqs[peer.peer_id] = req
        rnd.steps[peer.peer_id] = 0
        self._optimize_maybe_start(rnd, now, acts)

    def _optimize_maybe_start(self, rnd: probing.OptimizeRound, now: float, acts: Actions) -> None:
        members = [p.peer_id for p in self.admitted() if p.group == rnd.group]
        if rnd.phase != "collect" or not all(m in rnd.reqs for m in members):
            return
        if not members:
            del self.optimize_rounds[rnd.group]
            return
        ring = self.rings.get(rnd.group, [])
        rnd.members = [p for p in ring if p in members] + [p for p in members if p not in ring]
        wanted = {
            (a, b)
            for a in rnd.members
            for b in rnd.members
            if a != b and self.topology.needs_probe(a, b, now)
        }
        rnd.rounds = probing.probe_rounds(rnd.members, wanted)
        rnd.phase = "probe"
        rnd.probe_started_at = now
        self._optimize_next_round(rnd, now, acts)

    def _optimize_next_round(self, rnd: probing.OptimizeRound, now: float, acts: Actions) -> None:
        while rnd.rounds and not rnd.outstanding:
            for src, dst in rnd.rounds.pop(0):
                if src not in self.peers or dst not in rnd.reqs or dst not in self.peers:
                    continue  # a peer lost meanwhile: its edges are not measured
                rnd.outstanding[dst] = src
                acts.send(dst, {
                    "type": "probe",
                    "req": rnd.reqs[dst],
                    "step": rnd.next_step(dst),
                    "src": src,
                    "address": self.peers[src].p2p_address,
                    "seconds": float(self.probe_seconds),
                    "connections": max(1, self.peers[dst].p2p_connections),
                })
            rnd.deadline = now + self.probe_timeout
        if not rnd.outstanding and not rnd.rounds and rnd.phase == "probe":
            rnd.phase = "solve"
            rnd.members = [m for m in rnd.members if m in self.peers]
            rnd.deadline = now + self.vote_timeout
            acts.solves.append(probing.SolveRequest(
                group=rnd.group,
                token=rnd.token,
                peers=tuple(rnd.members),
                matrix=self.topology.matrix(rnd.members),
                current_ring=tuple(self.rings.get(rnd.group, ())),
            ))

    def _probe_result(self, peer: Peer, msg: dict, now: float, acts: Actions) -> None:
        rnd = self.optimize_rounds.get(peer.group)
        src = msg["src"]
        if (rnd is None or rnd.phase != "probe" or rnd.outstanding.get(peer.peer_id) != src
                or rnd.reqs.get(peer.peer_id) != msg["req"]):
            return  # stale: that probe timed out or its round is over
        del rnd.outstanding[peer.peer_id]
        rnd.probes += 1
        if src in self.peers:
            if msg["ok"] and msg["bytes_per_s"] > 0:
                self.topology.probed(src, peer.peer_id, msg["bytes_per_s"], msg["rtt_s"], now)
            else:
                self.topology.unreachable(src, peer.peer_id, now)
                self._event(acts, "unreachable", now, peer,
                            reason=f"probe {src}->{peer.peer_id} failed: {msg['reason']}")
        self._optimize_next_round(rnd, now, acts)

    def topology_solved(self, request: probing.SolveRequest, solution: Any, now: float) -> Actions:
        """The server ran ``request`` (a :class:`pccl.master.topology.RingSolution`,
        or None when the solver raised)."""
        acts = Actions()
        if request.passive:
            self._passive_solved(request, solution, now, acts)
            return acts
        rnd = self.optimize_rounds.get(request.group)
        if rnd is None or rnd.token != request.token or rnd.phase != "solve":
            return acts
        del self.optimize_rounds[request.group]
        members = [m for m in rnd.members if m in self.peers]
        ring = None if solution is None else solution.ring
        reason = "the solver failed (see the master's log)" if solution is None else ""
        if solution is not None and ring is None:
            reason = ("no ring avoids the unreachable or unmeasured edges: "
                      + (solution.reason or "every Hamiltonian cycle uses one"))
        elif ring is not None and set(ring) != set(members):
            ring, reason = None, "membership changed while solving"
        install = False
        bottleneck = 0.0 if ring is None else _finite(solution.bottleneck)
        predicted = 0.0 if ring is None else _finite(solution.predicted_bus_bandwidth)
        if ring is not None:
            current = self.rings.get(request.group, [])
            if set(current) == set(ring) and len(ring) > 1:
                # The current ring as good as the solution (a tie): keep it,
                # rewiring would only cost its connections.
                cur = min(request.matrix.get(e, 0.0) for e in self._ring_edges(current))
                if cur > 0 and cur >= bottleneck * (1 - 1e-9):
                    ring, bottleneck, predicted = list(current), cur, cur
            if self._ring_edges(ring) != self._ring_edges(current):
                self.proposed_rings[request.group] = list(ring)
                install = True
            else:
                self.proposed_rings.pop(request.group, None)
        self.topology_results[request.group] = {
            "at": now,
            "ring": list(ring or []),
            "feasible": ring is not None,
            "reason": reason,
            "bottleneck": bottleneck,
            "predicted_bus_bandwidth": predicted,
            "probes": rnd.probes,
            "probe_seconds": round(max(0.0, now - rnd.probe_started_at), 4),
            "install": install,
            "source": "optimize_topology",
        }
        for m in members:
            acts.send(m, self._topology_info_msg(
                rnd.reqs[m], rnd.next_step(m), self.topology_results[request.group], reason,
                members, now))
        return acts

    def _topology_info_msg(self, req: int, step: int, result: dict | None, reason: str,
                           members: list[str], now: float) -> dict:
        result = result or {}
        return {
            "type": "topology_info",
            "req": req,
            "step": step,
            "ring": list(result.get("ring", [])),
            "feasible": bool(result.get("feasible", False)),
            "reason": reason[:1024],
            "bottleneck": float(result.get("bottleneck", 0.0)),
            "predicted_bus_bandwidth": float(result.get("predicted_bus_bandwidth", 0.0)),
            "edges": self.topology.as_list(members, now),
            "probes": int(result.get("probes", 0)),
            "probe_seconds": float(result.get("probe_seconds", 0.0)),
            "install": bool(result.get("install", False)),
        }

    def _passive_solved(self, request: probing.SolveRequest, solution: Any, now: float,
                        acts: Actions) -> None:
        """Hook for re-solves from live estimates (passive measurement)."""
        self._passive_pending = False
        if solution is None or solution.ring is None:
            return
        if tuple(self.rings.get(request.group, ())) != request.current_ring:
            return  # the ring changed meanwhile: the decision is about an old ring
        self.proposed_rings[request.group] = list(solution.ring)
        self.topology_results[request.group] = {
            "at": now,
            "ring": list(solution.ring),
            "feasible": True,
            "reason": "",
            "bottleneck": _finite(solution.bottleneck),
            "predicted_bus_bandwidth": _finite(solution.predicted_bus_bandwidth),
            "probes": 0,
            "probe_seconds": 0.0,
            "install": True,
            "source": "passive",
        }
        self._event(acts, "reroute", now, None,
                    reason=f"group {request.group}: live estimates propose ring "
                    + " ".join(solution.ring))

    def _passive_sample(self, peer: Peer, msg: dict, now: float, acts: Actions) -> None:
        """A completed collective's link sample: the sender's outbound
        edge (to its ring successor) carried ``link_bytes`` in
        ``link_busy_ns`` while it was the limit."""
        ring = self.rings.get(peer.group, [])
        if msg["epoch"] != self.epoch or peer.peer_id not in ring or len(ring) < 2:
            return
        busy = msg["link_busy_ns"] / 1e9
        if busy < self.passive_min_busy:
            return  # too short to say anything (a burst into an empty socket buffer)
        succ = ring[(ring.index(peer.peer_id) + 1) % len(ring)]
        self.topology.passive(peer.peer_id, succ, msg["link_bytes"] / busy, now)
        self.counters["passive_samples"] = self.counters.get("passive_samples", 0) + 1
        g = peer.group
        if (self._passive_pending or g in self.optimize_rounds or g in self.proposed_rings
                or now - self._last_passive.get(g, -1e18) < self.passive_interval):
            return
        self._last_passive[g] = now
        self._passive_pending = True
        acts.solves.append(probing.SolveRequest(
            group=g, token=0, peers=tuple(ring), matrix=self.topology.matrix(ring),
            current_ring=tuple(ring), passive=True))

    def _topology_forget(self, peer: Peer, now: float, acts: Actions) -> None:
        """A peer left the run: its edges go; an optimize round goes on
        without it (costing only its own edges)."""
        self.topology.forget_peer(peer.peer_id)
        rnd = self.optimize_rounds.get(peer.group)
        if rnd is None:
            return
        rnd.reqs.pop(peer.peer_id, None)
        if rnd.phase == "collect":
            self._optimize_maybe_start(rnd, now, acts)
        elif rnd.phase == "probe":
            rnd.outstanding.pop(peer.peer_id, None)
            for dst in [d for d, s in rnd.outstanding.items() if s == peer.peer_id]:
                # Its receiver's fetch fails on its own; do not wait for it.
                del rnd.outstanding[dst]
            self._optimize_next_round(rnd, now, acts)
        if not any(p.group == peer.group for p in self.admitted()):
            self.optimize_rounds.pop(peer.group, None)

    def _optimize_tick(self, now: float, acts: Actions) -> None:
        for rnd in list(self.optimize_rounds.values()):
            if now < rnd.deadline or self.optimize_rounds.get(rnd.group) is not rnd:
                continue
            if rnd.phase == "collect":
                for peer in self.admitted():
                    if peer.group == rnd.group and peer.peer_id not in rnd.reqs:
                        reason = "did not call optimize_topology within the vote timeout"
                        self._remove(peer, "evicted", reason, now, acts)
            elif rnd.phase == "probe":
                for dst, src in sorted(rnd.outstanding.items()):
                    self.topology.unreachable(src, dst, now)
                    peer = self.peers.get(dst)
                    if peer is not None:
                        self._event(acts, "unreachable", now, peer,
                                    reason=f"probe {src}->{dst}: no result in time")
                rnd.outstanding.clear()
                self._optimize_next_round(rnd, now, acts)
            else:  # the solver never answered: a bug, logged by the server
                rnd.deadline = now + self.vote_timeout


def _finite(x: float) -> float:
    """A bandwidth for the wire: a single peer's infinite bottleneck is 0."""
    return float(x) if x == x and x not in (float("inf"), float("-inf")) else 0.0
