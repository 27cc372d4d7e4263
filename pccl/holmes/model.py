"""What the Holmes planner is told: NICs, nodes, and the model to train.

These are plain, validated value objects.  ``ModelSpec`` also carries the
standard Megatron arithmetic (Narayanan et al. 2021, "Efficient Large-Scale
Language Model Training on GPU Clusters Using Megatron-LM", §5.1): FLOPs per
iteration, parameters per transformer layer, activation bytes per
micro-batch.  The cost model (:mod:`pccl.holmes.cost`) builds on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import InvalidArgumentError

#: The NIC kinds the planner knows.  ``ib`` and ``roce`` are the two RDMA
#: fabrics Holmes targets (they cannot talk RDMA to each other); ``ethernet``
#: is the ordinary TCP network every node is expected to share.
KINDS = ("ib", "roce", "ethernet")


@dataclass(frozen=True)
class NIC:
    """One network of a node: its kind, its bandwidth in Gbit/s (per
    direction) and, optionally, the ``host:port`` (or host) a pccl peer
    listens on and advertises on that network.

    Describe several HCAs of one kind on one node (Holmes's IB nodes have 4)
    as one NIC with their summed bandwidth."""

    kind: str
    gbps: float
    address: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgumentError(
                f"unknown NIC kind {self.kind!r}; expected one of {', '.join(KINDS)}"
            )
        if not isinstance(self.gbps, (int, float)) or not self.gbps > 0:
            raise InvalidArgumentError(f"NIC bandwidth must be > 0 Gbit/s, got {self.gbps!r}")
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise InvalidArgumentError(
                f"NIC address must be a non-empty string, got {self.address!r}"
            )

    @property
    def bytes_per_s(self) -> float:
        return self.gbps * 1e9 / 8


@dataclass(frozen=True)
class Node:
    """A machine: a unique name, its NICs (at most one per kind), the number
    of GPUs it holds, and the sustained TFLOPS of each GPU (what a real
    training step achieves, not the datasheet peak)."""

    name: str
    nics: Sequence[NIC]
    gpus: int = 1
    tflops: float = 100.0
    _by_kind: dict[str, NIC] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidArgumentError(f"node name must be a non-empty string, got {self.name!r}")
        nics = tuple(self.nics)
        if not nics:
            raise InvalidArgumentError(f"node {self.name!r} has no NIC")
        by_kind: dict[str, NIC] = {}
        for nic in nics:
            if not isinstance(nic, NIC):
                raise InvalidArgumentError(f"node {self.name!r}: {nic!r} is not a holmes.NIC")
            if nic.kind in by_kind:
                raise InvalidArgumentError(
                    f"node {self.name!r} has two {nic.kind} NICs; describe them as one NIC "
                    "with their summed bandwidth"
                )
            by_kind[nic.kind] = nic
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 1:
            raise InvalidArgumentError(f"node {self.name!r}: gpus must be an int >= 1")
        if not isinstance(self.tflops, (int, float)) or not self.tflops > 0:
            raise InvalidArgumentError(f"node {self.name!r}: tflops must be > 0")
        object.__setattr__(self, "nics", nics)
        object.__setattr__(self, "_by_kind", by_kind)

    def nic(self, kind: str) -> NIC | None:
        """This node's NIC of ``kind``, or None."""
        return self._by_kind.get(kind)

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self._by_kind)

    @property
    def block_kind(self) -> str:
        """The NIC block this node belongs to: its fastest RDMA kind, or
        ``ethernet`` when it has none.  Holmes orders nodes by this."""
        fast = [n for n in self.nics if n.kind != "ethernet"]
        if not fast:
            return "ethernet"
        return max(fast, key=lambda n: (n.gbps, -KINDS.index(n.kind))).kind


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """A GPT-style decoder: ``layers`` transformer layers of width
    ``hidden``, sequence length ``seq``, vocabulary ``vocab``; ``micro_batch``
    and ``global_batch`` in samples (sequences); ``bytes_per_param`` is the
    width of a gradient element as data-parallel groups reduce it (2 for
    fp16/bf16 gradients); ``recompute`` says whether activations are
    recomputed in the backward pass (full recomputation, Megatron's factor
    4 instead of 3)."""

    layers: int
    hidden: int
    seq: int
    vocab: int
    micro_batch: int
    global_batch: int
    bytes_per_param: int = 2
    recompute: bool = True

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "seq", "vocab", "micro_batch", "global_batch",
                     "bytes_per_param"):
            _positive_int(name, getattr(self, name))
        if self.global_batch % self.micro_batch:
            raise InvalidArgumentError(
                f"global_batch {self.global_batch} is not a multiple of micro_batch "
                f"{self.micro_batch}"
            )

    # -- FLOPs (Narayanan et al. 2021, eq. 3) --------------------------------
    #
    # One transformer layer's forward pass over B samples of s tokens costs
    # 24·B·s·h² + 4·B·s²·h FLOPs (GEMMs of attention and MLP, plus the
    # attention scores).  Backward costs twice the forward; recomputation
    # adds one more forward: factor 4 (96 = 4·24) with it, 3 (72) without.
    # The logit layer costs 2·B·s·h·V forward and is never recomputed (×3).
    # Summed: with recomputation 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)),
    # without 72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h)).

    @property
    def _passes(self) -> int:
        return 4 if self.recompute else 3

    def layer_flops_per_iteration(self) -> float:
        """FLOPs of one transformer layer over one global batch (forward,
        backward and, if enabled, recomputation)."""
        b, s, h = self.global_batch, self.seq, self.hidden
        return self._passes * (24.0 * b * s * h * h + 4.0 * b * s * s * h)

    def logit_flops_per_iteration(self) -> float:
        """FLOPs of the output (logit) layer over one global batch."""
        return 6.0 * self.global_batch * self.seq * self.hidden * self.vocab

    def flops_per_iteration(self) -> float:
        """Megatron's model FLOPs per iteration (the formula Holmes logs
        TFLOPS with)."""
        return self.layers * self.layer_flops_per_iteration() + self.logit_flops_per_iteration()

    # -- bytes ---------------------------------------------------------------

    def params_per_layer(self) -> int:
        """Parameters of one transformer layer: 12·h² + 13·h (QKV, projection,
        the two MLP matrices, their biases and two layer norms)."""
        return 12 * self.hidden * self.hidden + 13 * self.hidden

    def embedding_params(self) -> int:
        """Parameters of the word embedding (first stage) and, the same
        count, of the untied output layer (last stage)."""
        return self.vocab * self.hidden

    def params(self) -> int:
        """All parameters, with untied input and output embeddings."""
        return self.layers * self.params_per_layer() + 2 * self.embedding_params()

    def activation_bytes(self) -> int:
        """Bytes of one micro-batch's activation (and of its gradient) at a
        pipeline boundary: micro_batch · seq · hidden · bytes_per_param."""
        return self.micro_batch * self.seq * self.hidden * self.bytes_per_param
