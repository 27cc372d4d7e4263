"""Holmes placement: which nodes form which pipeline stage, how many layers
each stage holds, and which network every group communicates over.

``holmes`` (Yang et al., "Holmes: Towards Distributed Training Across
Clusters with Heterogeneous NIC Environment", ICPP 2024) follows four rules:

1. **Order nodes by NIC type.**  Nodes are grouped into blocks by their fast
   (RDMA) kind, keeping the caller's order inside a block, and the blocks are
   laid out one after another.  Every order of the blocks is tried (the
   fastest first on a tie, Holmes's "IB as master"); so is the caller's own
   order when it already satisfies rule 2.
2. **Every pipeline stage inside one NIC-homogeneous block**, so each
   data-parallel group, the heavy traffic, reduces on its own cluster's fast
   network; only pipeline activations cross between clusters.
3. **Per-group NIC selection**: a group whose members all have the same fast
   kind uses that network; any other group uses the Ethernet they share
   (:func:`pccl.holmes.cost.select_network`).
4. **Self-adapting partition**: the integer layer counts (at least one per
   stage, summing to the model's layers) that minimise the predicted
   iteration time (:mod:`pccl.holmes.cost`); the stage on the faster network
   ends up with more layers because its gradient sync is cheaper.

``naive`` is what Megatron does when it ignores NICs: the same parallel
sizes with the nodes in the caller's order, an even layer split (the first
``layers % pp`` stages get one more), and one network for every group: the
one all nodes share (a single NCCL profile; in practice Ethernet, since IB
and RoCE cannot reach each other).  ``nic_selection=`` turns rule 3 on or
off for either strategy, to tell placement apart from NIC selection.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import InvalidArgumentError
from .cost import Cost, Layout, combine
from .model import KINDS, NIC, ModelSpec, Node

STRATEGIES = ("holmes", "naive")

# Branch-and-bound visits before the partition search settles for the best
# split found so far (then ``Plan.partition_exact`` is False).
_SEARCH_BUDGET = 400_000
_EPS = 1e-9


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its nodes (names, in rank order), its layer count,
    the NIC kind its data-parallel group reduces over, and its predicted
    costs in seconds per iteration (``p2p_per_microbatch_s`` per
    micro-batch)."""

    index: int
    nodes: list[str]
    layers: int
    nic_kind: str
    gpus: int
    compute_s: float
    dp_s: float
    dp_exposed_s: float
    p2p_per_microbatch_s: float


@dataclass(frozen=True)
class Plan:
    """The outcome of :func:`plan`.

    ``dp_groups[i]`` are the nodes of stage ``i`` (its data-parallel group;
    with ``tp > 1`` each of its ``tp`` shards forms such a group over the same
    nodes).  ``pp_groups`` list the nodes of each pipeline (one node per
    stage), ``pp_group_kinds`` the network each one uses.
    ``predicted_iteration_s`` is the sum of ``breakdown``
    (``compute``, ``dp_exposed``, ``pp_comm``, ``bubble``).  ``tx_bytes``
    maps node → NIC kind → bytes it sends per iteration."""

    strategy: str
    tp: int
    pp: int
    dp: int
    micro_batches: int
    stages: list[Stage]
    dp_groups: list[list[str]]
    pp_groups: list[list[str]]
    pp_group_kinds: list[str]
    predicted_iteration_s: float
    breakdown: dict[str, float]
    flops_per_iteration: float
    world_gpus: int
    global_batch: int
    partition_exact: bool
    tx_bytes: dict[str, dict[str, float]]
    _nodes: dict[str, Node] = field(repr=False)
    _stage_of: dict[str, int] = field(repr=False)
    _pp_kind_of: dict[str, str] = field(repr=False)

    @property
    def layers(self) -> list[int]:
        return [s.layers for s in self.stages]

    @property
    def samples_per_s(self) -> float:
        return self.global_batch / self.predicted_iteration_s

    @property
    def tflops_per_gpu(self) -> float:
        """Model TFLOPS per GPU, as Megatron and Holmes report it."""
        return self.flops_per_iteration / (self.predicted_iteration_s * self.world_gpus * 1e12)

    def peer_group_for(self, node_name: str) -> int:
        """The pccl peer group of ``node_name``: the index of its stage, i.e.
        one peer group per data-parallel group."""
        try:
            return self._stage_of[node_name]
        except KeyError:
            raise InvalidArgumentError(f"no node {node_name!r} in this plan") from None

    def nic_for(self, node_name: str, group: str | int) -> NIC:
        """The NIC ``node_name`` uses for ``group``: ``"dp"`` (its
        data-parallel group; its peer-group number works too) or ``"pp"``
        (its pipeline sends and receives)."""
        stage = self.peer_group_for(node_name)
        node = self._nodes[node_name]
        if group == "pp":
            kind = self._pp_kind_of[node_name]
        elif group == "dp" or (isinstance(group, int) and not isinstance(group, bool)
                               and group == stage):
            kind = self.stages[stage].nic_kind
        elif isinstance(group, int) and not isinstance(group, bool):
            raise InvalidArgumentError(
                f"node {node_name!r} is in peer group {stage}, not {group}"
            )
        else:
            raise InvalidArgumentError(f"group must be 'dp', 'pp' or a peer group, got {group!r}")
        nic = node.nic(kind)
        assert nic is not None  # the planner only picks kinds every member has
        return nic

    def address_for(self, node_name: str, group: str | int) -> str | None:
        """The address (from :class:`NIC`) ``node_name`` listens on and
        advertises for ``group`` (see :meth:`nic_for`); None when that NIC
        was described without one."""
        return self.nic_for(node_name, group).address


def plan(
    nodes: Sequence[Node],
    model: ModelSpec,
    tp: int = 1,
    pp: int = 2,
    strategy: str = "holmes",
    *,
    layers: Sequence[int] | None = None,
    overlap: bool = True,
    nic_selection: bool | None = None,
) -> Plan:
    """Place ``model`` on ``nodes`` with tensor-parallel size ``tp`` and
    ``pp`` pipeline stages (data-parallel size: the rest).

    ``strategy``: ``"holmes"`` or ``"naive"`` (module docstring).
    ``layers``: force this split instead of choosing one (a sweep, or a
    check against a split measured elsewhere).  ``overlap``: whether the
    gradient reduce-scatter overlaps the last backward pass (the overlapped
    distributed optimizer); with False every byte of it is exposed.
    ``nic_selection``: per-group network choice (rule 3); by default on for
    holmes and off for naive (every group on the network all nodes share).

    Raises :class:`ValueError` (:class:`pccl.InvalidArgumentError`) for an
    impossible request, saying why."""
    nodes = _check_nodes(nodes)
    if not isinstance(model, ModelSpec):
        raise InvalidArgumentError(f"model must be a holmes.ModelSpec, got {type(model).__name__}")
    for name, value in (("tp", tp), ("pp", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
    if strategy not in STRATEGIES:
        raise InvalidArgumentError(
            f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}"
        )
    if model.layers < pp:
        raise InvalidArgumentError(f"{model.layers} layers cannot fill {pp} pipeline stages")
    world = sum(n.gpus for n in nodes)
    if world % (tp * pp):
        raise InvalidArgumentError(
            f"tp × pp = {tp} × {pp} = {tp * pp} does not divide the {world} GPUs"
        )
    if layers is not None:
        layers = _check_layers(layers, model.layers, pp)
    stage_gpus = world // pp
    for n in nodes:
        if n.gpus % tp:
            raise InvalidArgumentError(
                f"tp={tp} does not divide the {n.gpus} GPUs of node {n.name!r} "
                "(tensor parallelism stays inside a node)"
            )
    dp = stage_gpus // tp
    if model.global_batch % (model.micro_batch * dp):
        raise InvalidArgumentError(
            f"global_batch {model.global_batch} is not a multiple of micro_batch × dp = "
            f"{model.micro_batch} × {dp}"
        )
    if nic_selection is None:
        nic_selection = strategy == "holmes"

    if strategy == "naive":
        stages = _cut(nodes, stage_gpus)
        if isinstance(stages, str):
            raise InvalidArgumentError(f"naive: {stages}")
        layout = Layout(stages, model, tp, overlap, nic_selection)
        split = list(layers) if layers is not None else _even(model.layers, pp)
        return _make_plan("naive", layout, split, layout.evaluate(split), True, world)

    best: tuple[Layout, list[int], Cost, bool] | None = None
    reasons: list[str] = []
    for order in _holmes_orders(nodes):
        stages = _cut(order, stage_gpus)
        if isinstance(stages, str):
            reasons.append(stages)
            continue
        mixed = [i for i, s in enumerate(stages) if len({n.block_kind for n in s}) > 1]
        if mixed:
            reasons.append(f"stage {mixed[0]} would mix NIC blocks")
            continue
        try:
            layout = Layout(stages, model, tp, overlap, nic_selection)
        except InvalidArgumentError as exc:  # e.g. a pipeline group sharing no network
            reasons.append(str(exc))
            continue
        if layers is not None:
            split, exact = list(layers), True
        else:
            split, exact = best_partition(layout, model.layers)
        cost = layout.evaluate(split)
        if best is None or cost.total_s < best[2].total_s * (1 - _EPS):
            best = (layout, split, cost, exact)
    if best is None:
        blocks: dict[str, int] = {}
        for n in nodes:
            blocks[n.block_kind] = blocks.get(n.block_kind, 0) + n.gpus
        have = ", ".join(f"{k}: {g} GPUs" for k, g in blocks.items())
        raise InvalidArgumentError(
            f"holmes: no usable layout: every pipeline stage must be {stage_gpus} GPUs of whole "
            f"nodes (tp={tp} × dp={dp}) inside one NIC block, and the blocks hold {have} "
            f"({'; '.join(dict.fromkeys(reasons))}). strategy='naive' ignores NICs."
        )
    layout, split, cost, exact = best
    return _make_plan("holmes", layout, split, cost, exact, world)


# -- layouts -------------------------------------------------------------------


def _check_nodes(nodes: Sequence[Node]) -> list[Node]:
    nodes = list(nodes)
    if not nodes:
        raise InvalidArgumentError("no nodes")
    names: set[str] = set()
    for n in nodes:
        if not isinstance(n, Node):
            raise InvalidArgumentError(f"{n!r} is not a holmes.Node")
        if n.name in names:
            raise InvalidArgumentError(f"duplicate node name {n.name!r}")
        names.add(n.name)
    return nodes


def _check_layers(layers: Sequence[int], total: int, pp: int) -> list[int]:
    out = list(layers)
    if len(out) != pp:
        raise InvalidArgumentError(f"{len(out)} layer counts for {pp} stages")
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in out):
        raise InvalidArgumentError(f"every stage needs an int >= 1 layers, got {out}")
    if sum(out) != total:
        raise InvalidArgumentError(f"layer counts {out} sum to {sum(out)}, not {total}")
    return out


def _even(total: int, pp: int) -> list[int]:
    base, extra = divmod(total, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def _cut(order: Sequence[Node], stage_gpus: int) -> list[list[Node]] | str:
    """Split ``order`` into consecutive stages of ``stage_gpus`` GPUs each,
    at node boundaries; a reason string when a boundary falls inside a node."""
    stages: list[list[Node]] = [[]]
    filled = 0
    for n in order:
        if filled + n.gpus > stage_gpus:
            return (f"a stage boundary (every {stage_gpus} GPUs) falls inside node {n.name!r}; "
                    "stages are made of whole nodes")
        stages[-1].append(n)
        filled += n.gpus
        if filled == stage_gpus:
            stages.append([])
            filled = 0
    stages.pop()
    return stages


def _holmes_orders(nodes: Sequence[Node]) -> list[list[Node]]:
    """Rule 1: the nodes grouped into NIC blocks (caller's order inside a
    block), every order of the blocks, fastest block first; then the
    caller's order (used only if it keeps stages pure)."""
    blocks: dict[str, list[Node]] = {}
    for n in nodes:
        blocks.setdefault(n.block_kind, []).append(n)

    def speed(kind: str) -> tuple[float, int]:
        return (min(n.nic(kind).gbps for n in blocks[kind]), -KINDS.index(kind))

    kinds = sorted(blocks, key=speed, reverse=True)
    orders = [[n for k in perm for n in blocks[k]] for perm in itertools.permutations(kinds)]
    if list(nodes) not in orders:
        orders.append(list(nodes))
    return orders


# -- the self-adapting partition ------------------------------------------------


def best_partition(layout: Layout, total: int) -> tuple[list[int], bool]:
    """Integer layers per stage (each >= 1, summing to ``total``) that
    minimise the predicted iteration time of ``layout``.  Ties go to less
    exposed gradient sync summed over stages (layers on faster networks),
    then to the more even split.  Exact (branch and bound from a greedy
    start); returns ``(split, exact)``, ``exact`` False only when the search
    budget ran out first."""
    pp, m = layout.pp, layout.micro_batches
    top = total - pp + 1
    table = [[layout.stage_cost(s, layer) if layer else None for layer in range(top + 1)]
             for s in range(pp)]

    def key(split: Sequence[int]) -> tuple[float, float, int]:
        cost = combine([table[s][x] for s, x in enumerate(split)], m)
        return (cost.total_s, sum(c.dp_exposed_s for c in cost.stages), max(split) - min(split))

    def better(a: tuple[float, float, int], b: tuple[float, float, int]) -> bool:
        if a[0] < b[0] * (1 - _EPS):
            return True
        if a[0] > b[0] * (1 + _EPS):
            return False
        return a[1:] < b[1:]

    # Greedy start: every next layer where it hurts least, then single-layer
    # moves while they help.
    split = [1] * pp
    for _ in range(total - pp):
        options = []
        for s in range(pp):
            split[s] += 1
            options.append((key(split), s))
            split[s] -= 1
        chosen = options[0]
        for opt in options[1:]:
            if better(opt[0], chosen[0]):
                chosen = opt
        split[chosen[1]] += 1
    best, best_key = list(split), key(split)
    improved = True
    while improved:
        improved = False
        for i, j in itertools.permutations(range(pp), 2):
            if best[i] > 1:
                cand = list(best)
                cand[i] -= 1
                cand[j] += 1
                k = key(cand)
                if better(k, best_key):
                    best, best_key, improved = cand, k, True

    # Branch and bound over all splits.  Lower bound of a prefix: every
    # remaining stage costs at least its one-layer time plus the cheapest
    # per-layer slope for the layers beyond one each (per-micro-batch time
    # is linear in the layers); one of them holds at least ceil(left/k)
    # layers, so the bottleneck is at least the cheapest stage at that
    # count; and each remaining stage's exposed sync is at least its
    # minimum over all counts.
    t = [[c.per_microbatch_s if c else 0.0 for c in row] for row in table]
    slope = [t[s][2] - t[s][1] if top >= 2 else 0.0 for s in range(pp)]
    first = [t[s][1] for s in range(pp)]
    min_e = [min(table[s][x].dp_exposed_s for x in range(1, top + 1)) for s in range(pp)]
    suffix_first = [sum(first[s:]) for s in range(pp + 1)]
    suffix_slope = [min(slope[s:], default=0.0) for s in range(pp + 1)]
    suffix_e = [max(min_e[s:], default=0.0) for s in range(pp + 1)]
    # Consecutive stages with identical cost tables are interchangeable; only
    # splits that do not increase along such a run are searched.
    same_as_previous = [
        s > 0 and all(
            (table[s][x].per_microbatch_s, table[s][x].dp_exposed_s)
            == (table[s - 1][x].per_microbatch_s, table[s - 1][x].dp_exposed_s)
            for x in range(1, top + 1))
        for s in range(pp)
    ]
    visits = 0
    exact = True
    prefix: list[int] = []

    def bound(s: int, left: int, sum_t: float, max_t: float, max_dp: float) -> float:
        k = pp - s
        rest = suffix_first[s] + (left - k) * suffix_slope[s]
        biggest = -(-left // k)
        floor_t = min(t[r][min(biggest, top)] for r in range(s, pp))
        return (sum_t + rest + (m - 1) * max(max_t, floor_t)
                + max(max_dp, suffix_e[s]))

    def search(s: int, left: int, sum_t: float, max_t: float, max_dp: float) -> None:
        nonlocal best, best_key, visits, exact
        visits += 1
        if visits > _SEARCH_BUDGET:
            exact = False
            return
        if bound(s, left, sum_t, max_t, max_dp) > best_key[0] * (1 + _EPS):
            return
        if s == pp - 1:
            if same_as_previous[s] and left > prefix[-1]:
                return
            cand = [*prefix, left]
            k = key(cand)
            if better(k, best_key):
                best, best_key = cand, k
            return
        hi = left - (pp - s - 1)
        if same_as_previous[s]:
            hi = min(hi, prefix[-1])
        for x in range(1, hi + 1):
            c = table[s][x]
            prefix.append(x)
            search(s + 1, left - x, sum_t + c.per_microbatch_s, max(max_t, c.per_microbatch_s),
                   max(max_dp, c.dp_exposed_s))
            prefix.pop()
            if not exact:
                return

    search(0, total, 0.0, 0.0, 0.0)
    return best, exact


def _make_plan(strategy: str, layout: Layout, split: list[int], cost: Cost, exact: bool,
               world: int) -> Plan:
    stages = [
        Stage(
            index=i,
            nodes=[n.name for n in layout.stages[i]],
            layers=split[i],
            nic_kind=layout.dp_network[i][0],
            gpus=layout.stage_gpus,
            compute_s=sc.compute_s,
            dp_s=sc.dp_s,
            dp_exposed_s=sc.dp_exposed_s,
            p2p_per_microbatch_s=sc.p2p_per_microbatch_s,
        )
        for i, sc in enumerate(cost.stages)
    ]
    return Plan(
        strategy=strategy,
        tp=layout.tp,
        pp=layout.pp,
        dp=layout.dp,
        micro_batches=layout.micro_batches,
        stages=stages,
        dp_groups=[list(s.nodes) for s in stages],
        pp_groups=[[n.name for n in g] for g in layout.pp_groups],
        pp_group_kinds=[k for k, _ in layout.pp_network],
        predicted_iteration_s=cost.total_s,
        breakdown=dict(cost.breakdown),
        flops_per_iteration=layout.model.flops_per_iteration(),
        world_gpus=world,
        global_batch=layout.model.global_batch,
        partition_exact=exact,
        tx_bytes=layout.tx_bytes(split),
        _nodes={n.name: n for s in layout.stages for n in s},
        _stage_of={n.name: i for i, s in enumerate(layout.stages) for n in s},
        _pp_kind_of={name: kind for name, (kind, _) in layout.pp_node_network.items()},
    )
