"""The cost model: predicted seconds per training iteration of one layout.

A *layout* is a list of pipeline stages, each a list of whole nodes, plus the
tensor-parallel size.  Given the layer count of every stage, :class:`Layout`
predicts one iteration of Megatron's 1F1B schedule.  The model, step by step
(docs/holmes.md has the same with the formulas):

1. **Sizes.**  Every stage has the same number of GPUs, ``tp · dp``.  There
   are ``m = global_batch / (micro_batch · dp)`` micro-batches per pipeline
   per iteration.  Tensor parallelism stays inside a node (NVLink) and is
   counted as free.

2. **Compute.**  Stage *s* with ``l`` layers does ``l · F_layer`` FLOPs per
   iteration (plus the logit layer on the last stage), spread over its
   ``tp · dp`` GPUs at the slowest member's sustained TFLOPS.  Per
   micro-batch that is ``c_s = FLOPs_s / (tp · dp · tflops_s · m)``.

3. **Pipeline communication.**  Per micro-batch, every boundary carries one
   activation forward and one activation gradient backward, each
   ``micro_batch · seq · hidden · bytes`` per pipeline (a tensor-parallel
   rank sends ``1/tp`` of it, Megatron's scatter-gather).  A node carries
   the traffic of all its GPUs' pipelines, so a boundary costs
   ``max over its nodes of (gpus/tp · activation) / bandwidth`` on the
   network of the node's pipeline groups, per direction.  The two
   directions of one boundary overlap (full duplex, Megatron's
   send-forward/receive-backward pairs), but a stage waits for its
   exchanges: ``p_s`` = the sum of its (one or two) boundaries' times.
   A stage's per-micro-batch time is ``t_s = c_s + p_s``.

4. **1F1B.**  The pipeline takes ``Σ_s t_s + (m − 1) · max_s t_s``: the
   bottleneck stage runs all ``m`` micro-batches back to back and the others
   add their fill and drain.  For equal stages the fill and drain is
   ``(pp − 1)/m`` of the rest, the familiar 1F1B bubble.

5. **Data-parallel gradient synchronisation.**  After the last micro-batch,
   each stage's data-parallel group reduces its gradients
   (``params_s · bytes_per_param``; the first stage also holds the word
   embedding, the last the untied output layer).  It is hierarchical: the
   node's GPUs reduce over NVLink (free), then the stage's ``n`` nodes run a
   ring over the group's network at the slowest member's bandwidth, a
   reduce-scatter then an all-gather of ``(n − 1)/n · bytes`` each (so
   ``2(n − 1)/n · bytes / bandwidth`` in all).  As in Megatron-LLaMA's
   overlapped distributed optimizer, which Holmes uses, the reduce-scatter
   overlaps the backward pass of the last micro-batch (``3/4`` of ``c_s``
   with recomputation, ``2/3`` without); the all-gather after the
   optimizer step is exposed.  With ``overlap=False`` all of it is exposed.
   The iteration ends when the slowest stage has finished its sync.

Which network a group uses: :func:`select_network` per group (Holmes's
automatic NIC selection), or, with ``nic_selection=False``, the one network
every node shares for every group (one global NCCL profile).

Not modelled: the optimizer step's compute, latency per message, the
tied-embedding all-reduce (embeddings are untied, as in LLaMA), stragglers
and congestion from other jobs.  All times are per iteration unless the
name says per micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidArgumentError
from .model import KINDS, ModelSpec, Node

#: Keys of ``Plan.breakdown``; they add up to the predicted iteration time.
BREAKDOWN_KEYS = ("compute", "dp_exposed", "pp_comm", "bubble")


def select_network(nodes: Sequence[Node]) -> tuple[str, float] | None:
    """The network a group of nodes communicates over, and its bandwidth
    (bytes/s, the slowest member's): of the kinds every member has, the one
    whose slowest member is fastest (ties go to ib, then roce, then
    ethernet).  In practice: all members on one RDMA fabric → that fabric,
    otherwise the Ethernet they share.  None when they share no kind."""
    shared = set(KINDS)
    for node in nodes:
        shared &= node.kinds
    if not shared:
        return None
    best = max(
        shared,
        key=lambda k: (min(n.nic(k).bytes_per_s for n in nodes), -KINDS.index(k)),
    )
    return best, min(n.nic(best).bytes_per_s for n in nodes)


@dataclass(frozen=True)
class StageCost:
    """Predicted costs of one stage (seconds)."""

    compute_s: float          # all micro-batches, per GPU
    per_microbatch_s: float   # c_s + p_s
    p2p_per_microbatch_s: float
    dp_s: float               # the whole gradient sync (reduce-scatter + all-gather)
    dp_exposed_s: float


@dataclass(frozen=True)
class Cost:
    total_s: float
    breakdown: dict[str, float]
    stages: tuple[StageCost, ...]


class Layout:
    """Stages of whole nodes, with everything about them that does not depend
    on the layer split precomputed, so that :meth:`evaluate` is cheap enough
    for a partition search."""

    def __init__(self, stages: Sequence[Sequence[Node]], model: ModelSpec, tp: int,
                 overlap: bool = True, nic_selection: bool = True):
        if not stages or any(not s for s in stages):
            raise InvalidArgumentError("every pipeline stage needs at least one node")
        self.stages = [list(s) for s in stages]
        self.model = model
        self.tp = tp
        self.overlap = overlap
        self.nic_selection = nic_selection
        self.pp = len(self.stages)
        gpus = [sum(n.gpus for n in s) for s in self.stages]
        if len(set(gpus)) != 1:
            raise InvalidArgumentError(f"stages hold different GPU counts: {gpus}")
        for s in self.stages:
            for n in s:
                if n.gpus % tp:
                    raise InvalidArgumentError(
                        f"tp={tp} does not divide the {n.gpus} GPUs of node {n.name!r} "
                        "(tensor parallelism stays inside a node)"
                    )
        self.stage_gpus = gpus[0]
        self.dp = self.stage_gpus // tp
        per_step = model.micro_batch * self.dp
        if model.global_batch % per_step:
            raise InvalidArgumentError(
                f"global_batch {model.global_batch} is not a multiple of micro_batch × dp = "
                f"{model.micro_batch} × {self.dp}"
            )
        self.micro_batches = model.global_batch // per_step

        # Without per-group selection every group uses the one network all
        # nodes share (one global NCCL profile, as Megatron without Holmes).
        everyone = [n for s in self.stages for n in s]
        common = None
        if not nic_selection:
            common = select_network(everyone)
            if common is None:
                raise InvalidArgumentError("the nodes share no network")

        def network(group: Sequence[Node]) -> tuple[str, float] | None:
            if common is None:
                return select_network(group)
            return common[0], min(n.nic(common[0]).bytes_per_s for n in group)

        # Data-parallel groups: one per stage, its nodes.
        self.dp_network: list[tuple[str, float]] = []
        for i, s in enumerate(self.stages):
            net = network(s)
            if net is None:
                raise InvalidArgumentError(
                    f"the nodes of stage {i} ({', '.join(n.name for n in s)}) share no network"
                )
            self.dp_network.append(net)

        # Pipeline groups: one GPU position per stage; as node tuples.
        self.pp_groups: list[tuple[Node, ...]] = []
        seen: set[tuple[str, ...]] = set()
        owners = [self._gpu_owners(s) for s in self.stages]
        for pos in range(0, self.stage_gpus, tp):
            group = tuple(o[pos] for o in owners)
            key = tuple(n.name for n in group)
            if key not in seen:
                seen.add(key)
                self.pp_groups.append(group)
        self.pp_network: list[tuple[str, float]] = []
        for g in self.pp_groups:
            net = network(g)
            if net is None:
                raise InvalidArgumentError(
                    f"pipeline group {', '.join(n.name for n in g)} shares no network"
                )
            self.pp_network.append(net)
        # Each node's pipeline traffic goes over its pipeline groups' network;
        # when it is in several, the slowest of them bounds it.
        self.pp_node_network: dict[str, tuple[str, float]] = {}
        for g, (kind, _) in zip(self.pp_groups, self.pp_network, strict=True):
            for n in g:
                bw = n.nic(kind).bytes_per_s
                old = self.pp_node_network.get(n.name)
                if old is None or bw < old[1]:
                    self.pp_node_network[n.name] = (kind, bw)

        act = model.activation_bytes()
        self.boundary_s = []  # per micro-batch, per direction, boundary k -> k+1
        for k in range(self.pp - 1):
            self.boundary_s.append(max(
                (n.gpus // tp) * act / self.pp_node_network[n.name][1]
                for n in (*self.stages[k], *self.stages[k + 1])
            ))
        self.p2p_s = []
        for s in range(self.pp):
            left = self.boundary_s[s - 1] if s > 0 else 0.0
            right = self.boundary_s[s] if s < self.pp - 1 else 0.0
            self.p2p_s.append(left + right)

        self.tflops = [min(n.tflops for n in s) for s in self.stages]
        self.bwd_fraction = 3 / 4 if model.recompute else 2 / 3
        self._layer_flops = model.layer_flops_per_iteration()
        self._logit_flops = model.logit_flops_per_iteration()

    @staticmethod
    def _gpu_owners(stage: Sequence[Node]) -> list[Node]:
        owners: list[Node] = []
        for n in stage:
            owners.extend([n] * n.gpus)
        return owners

    # -- per stage -----------------------------------------------------------

    def stage_compute_s(self, s: int, layers: int) -> float:
        """Compute of stage ``s`` over all micro-batches of one iteration."""
        flops = layers * self._layer_flops
        if s == self.pp - 1:
            flops += self._logit_flops
        return flops / (self.stage_gpus * self.tflops[s] * 1e12)

    def stage_grad_bytes(self, s: int, layers: int) -> int:
        params = layers * self.model.params_per_layer()
        if s == 0:
            params += self.model.embedding_params()
        if s == self.pp - 1:
            params += self.model.embedding_params()
        return params * self.model.bytes_per_param

    def stage_dp_s(self, s: int, layers: int) -> tuple[float, float]:
        """(reduce-scatter, all-gather) seconds of stage ``s``'s gradient sync."""
        n = len(self.stages[s])
        if n == 1:
            return 0.0, 0.0
        half = (n - 1) / n * self.stage_grad_bytes(s, layers) / self.dp_network[s][1]
        return half, half

    def stage_cost(self, s: int, layers: int) -> StageCost:
        compute = self.stage_compute_s(s, layers)
        c = compute / self.micro_batches
        rs, ag = self.stage_dp_s(s, layers)
        window = self.bwd_fraction * c if self.overlap else 0.0
        exposed = max(0.0, rs - window) + ag
        return StageCost(compute, c + self.p2p_s[s], self.p2p_s[s], rs + ag, exposed)

    # -- the whole iteration ---------------------------------------------------

    def evaluate(self, layers: Sequence[int]) -> Cost:
        if len(layers) != self.pp:
            raise InvalidArgumentError(f"{len(layers)} layer counts for {self.pp} stages")
        stages = tuple(self.stage_cost(s, layer) for s, layer in enumerate(layers))
        return combine(stages, self.micro_batches)

    def tx_bytes(self, layers: Sequence[int]) -> dict[str, dict[str, float]]:
        """Bytes each node sends per iteration, per network kind (the ring
        all-reduce and the pipeline sends; NVLink traffic excluded)."""
        out: dict[str, dict[str, float]] = {}
        for s, stage in enumerate(self.stages):
            n = len(stage)
            kind = self.dp_network[s][0]
            dp_bytes = 2 * (n - 1) / n * self.stage_grad_bytes(s, layers[s]) if n > 1 else 0.0
            for node in stage:
                row = out.setdefault(node.name, {})
                if dp_bytes:
                    row[kind] = row.get(kind, 0.0) + dp_bytes
                sends = (s > 0) + (s < self.pp - 1)
                if sends:
                    pkind = self.pp_node_network[node.name][0]
                    pp_bytes = (sends * self.micro_batches * (node.gpus // self.tp)
                                * self.model.activation_bytes())
                    row[pkind] = row.get(pkind, 0.0) + pp_bytes
        return out


def combine(stages: Sequence[StageCost], micro_batches: int) -> Cost:
    """Steps 4 and 5 of the model: 1F1B over the stages, then the slowest
    exposed gradient sync."""
    times = [st.per_microbatch_s for st in stages]
    b = max(range(len(times)), key=times.__getitem__)
    dp = max(st.dp_exposed_s for st in stages)
    bottleneck = stages[b]
    compute = micro_batches * (bottleneck.per_microbatch_s - bottleneck.p2p_per_microbatch_s)
    pp_comm = micro_batches * bottleneck.p2p_per_microbatch_s
    bubble = sum(times) - times[b]
    breakdown = {"compute": compute, "dp_exposed": dp, "pp_comm": pp_comm, "bubble": bubble}
    return Cost(sum(breakdown.values()), breakdown, tuple(stages))
