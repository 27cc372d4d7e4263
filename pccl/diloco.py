"""DiLoCo and one-step-delayed (async) DiLoCo for PyTorch over a pccl run.

DiLoCo (Douillard et al., 2023) trains with two optimizers.  Every peer
runs ``sync_every`` (H) steps of its own *inner* optimizer (say AdamW) on
its own data, starting from the shared *outer* parameters.  Then, at the
*outer step*:

1. pseudo-gradient ``g = outer - local`` for every trainable parameter;
2. ``g`` is averaged over the peer group (``Communicator.all_reduce_many``
   with ``ReduceOp.AVG``, which retries among the survivors when a peer is
   lost);
3. the outer optimizer, SGD with (Nesterov) momentum, updates the outer
   parameters with the average; every peer computes bit-identical values;
4. the peers vote (``update_topology()``: newcomers are admitted here),
   synchronise the shared state (outer parameters, outer momentum, the
   outer-step counter: this is how a newcomer gets them), and copy the
   outer parameters into the model.

:class:`AsyncDiLoCo` overlaps step 2 with the next H inner steps and applies
each averaged pseudo-gradient one outer step late.  The exact rules,
every knob, and what happens on joins and failures are in docs/diloco.md.

Usage (the same for both classes)::

    diloco = DiLoCo(model, comm, inner_opt, sync_every=50)
    for batch in data:
        loss = model(batch); loss.backward()
        inner_opt.step(); inner_opt.zero_grad()
        info = diloco.step()          # an OuterStepInfo every H steps, else None
    diloco.finish()                   # async: apply the last reduction
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import errors
from .types import Quantization, ReduceInfo, ReduceOp

__all__ = ["AsyncDiLoCo", "DiLoCo", "OuterStepInfo"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class OuterStepInfo:
    """What one outer step did (returned by ``step()`` every H inner steps).

    * ``outer_step`` - the shared outer-step counter after this step.
    * ``world_size`` - peers whose pseudo-gradients were averaged (the
      survivors if a peer was lost during the reduction; 1 without a
      communicator).  For :class:`AsyncDiLoCo`: of the reduction applied
      now, i.e. the one started at the previous outer step (0 when none
      was applied).
    * ``group_world_size`` - peers in this group after the vote.
    * ``tx_bytes`` / ``rx_bytes`` - bytes this peer sent and received for
      that reduction (and the shared-state sync).
    * ``comm_seconds`` - time this step spent blocked in communication
      (reduction, vote, sync; async: waiting for the background reduction).
    * ``applied`` - whether an outer update was applied (async: False at
      the first outer step).
    """

    outer_step: int
    world_size: int
    group_world_size: int
    tx_bytes: int
    rx_bytes: int
    comm_seconds: float
    applied: bool


class DiLoCo:
    """Synchronous DiLoCo; see the module docstring and docs/diloco.md.

    ``model`` - a ``torch.nn.Module`` whose parameters are dense CPU
    tensors of a floating dtype (float32, float64, float16, bfloat16).
    Parameters with ``requires_grad=False`` are *frozen*: they are not
    averaged or updated, but they are part of the shared state (so a
    newcomer gets them too).  ``comm`` - a connected
    :class:`pccl.Communicator`, or None to train alone (the outer step then
    runs on this peer's pseudo-gradient alone).  ``inner_optimizer`` - the
    optimizer the caller steps; it may only update trainable parameters
    of ``model``.

    ``outer_lr``, ``outer_momentum``, ``nesterov`` - the outer SGD, with
    exactly the update of ``torch.optim.SGD(lr, momentum, nesterov,
    dampening=0)``.  ``sync_every`` - H, inner steps per outer step.
    ``quantization`` - wire compression of the pseudo-gradients
    (:class:`pccl.Quantization`; results stay bit-identical on every peer).
    ``max_in_flight`` - concurrent all-reduces (one per parameter tensor).

    Constructing it with a communicator synchronises the shared state, so
    every peer of the run must construct it at the same point: peers that
    start together right after they are admitted, a newcomer right after
    its ``connect()`` returns (which happens while the others are inside an
    outer step, exactly where they synchronise).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        comm: Any,
        inner_optimizer: torch.optim.Optimizer,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        sync_every: int = 50,
        quantization: Quantization = Quantization.NONE,
        *,
        max_in_flight: int = 8,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise errors.InvalidArgumentError(f"model must be a torch.nn.Module, got {model!r}")
        errors.check_int(sync_every, "sync_every (H, inner steps per outer step)", 1)
        if not outer_lr > 0:
            raise errors.InvalidArgumentError(f"outer_lr must be > 0, got {outer_lr!r}")
        if not 0 <= outer_momentum < 1:
            raise errors.InvalidArgumentError(
                f"outer_momentum must be in [0, 1), got {outer_momentum!r}"
            )
        if max_in_flight < 1:
            raise errors.InvalidArgumentError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.model = model
        self.comm = comm
        self.inner_optimizer = inner_optimizer
        self.outer_lr = float(outer_lr)
        self.outer_momentum = float(outer_momentum)
        self.nesterov = bool(nesterov)
        self.sync_every = sync_every
        self.quantization = Quantization(quantization)
        self.max_in_flight = max_in_flight

        self._names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        self._frozen_names: list[str] = []
        self._frozen: list[torch.nn.Parameter] = []
        for name, p in model.named_parameters():
            _check_param(name, p)
            if p.requires_grad:
                self._names.append(name)
                self._params.append(p)
            else:
                if not p.is_contiguous():
                    raise errors.InvalidArgumentError(
                        f"frozen parameter {name!r} is not contiguous; it is part of the shared "
                        "state, which needs contiguous tensors"
                    )
                self._frozen_names.append(name)
                self._frozen.append(p)
        if not self._params:
            raise errors.InvalidArgumentError(
                "model has no trainable parameter (every parameter has requires_grad=False)"
            )
        self._check_optimizer(inner_optimizer)

        with torch.no_grad():
            self._outer = [
                p.detach().clone(memory_format=torch.contiguous_format) for p in self._params
            ]
            self._momentum = [torch.zeros_like(t) for t in self._outer]
        # The outer-step counter is a tensor so that it travels with the
        # shared state (a newcomer learns it from the others).
        self._counter = torch.zeros(1, dtype=torch.int64)
        self._inner_steps = 0
        self._finished = False
        # The pccl.SyncInfo of the latest shared-state sync (the first one,
        # in the constructor, is how a newcomer catches up); None alone.
        self.last_sync: Any = None

        self._init_shared()

    # ------------------------------------------------------------------
    # Public API.

    @property
    def outer_step(self) -> int:
        """Outer steps completed by the run (shared; a newcomer learns it)."""
        return int(self._counter[0])

    @property
    def inner_step(self) -> int:
        """Inner steps since the last outer step (0 <= inner_step < H)."""
        return self._inner_steps

    @property
    def outer_parameters(self) -> list[torch.Tensor]:
        """The outer parameters (bit-identical on every peer after each
        outer step), in the order of ``model.named_parameters()``."""
        return list(self._outer)

    def step(self) -> OuterStepInfo | None:
        """Count one inner step; every ``sync_every``-th call runs the outer
        step and returns its :class:`OuterStepInfo` (else None)."""
        if self._finished:
            raise errors.StateError("step() after finish()")
        self._inner_steps += 1
        if self._inner_steps < self.sync_every:
            return None
        self._inner_steps = 0
        self._check_unchanged()
        return self._outer_step()

    def finish(self) -> OuterStepInfo | None:
        """End training: :class:`AsyncDiLoCo` waits for the reduction in
        flight and applies it (the model then holds the final outer
        parameters).  For :class:`DiLoCo` a no-op returning None (the model
        holds the outer parameters right after each outer step).
        Idempotent; ``step()`` is refused afterwards."""
        self._finished = True
        return None

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The tensors every peer holds identically: ``outer/<name>`` and
        ``momentum/<name>`` per trainable parameter, ``frozen/<name>`` per
        frozen parameter (the model's own tensor) and ``outer_step`` (int64,
        one element).  The tensors themselves, not copies: a sync writes
        into them."""
        state: dict[str, torch.Tensor] = {}
        for name, outer, buf in zip(self._names, self._outer, self._momentum, strict=True):
            state[f"outer/{name}"] = outer
            state[f"momentum/{name}"] = buf
        for name, p in zip(self._frozen_names, self._frozen, strict=True):
            state[f"frozen/{name}"] = p.detach()
        state["outer_step"] = self._counter
        return state

    # ------------------------------------------------------------------
    # The outer step (synchronous).

    def _init_shared(self) -> None:
        self._sync_shared_state()
        self._load_outer_into_model()

    def _outer_step(self) -> OuterStepInfo:
        t0 = time.perf_counter()
        grads = self._pseudo_gradients(self._outer)
        infos = self._average(grads)
        self._apply_outer(grads)
        self._counter += 1
        tx, rx = _bytes(infos)
        sync_tx, sync_rx, group = self._vote_and_sync()
        self._load_outer_into_model()
        return OuterStepInfo(
            outer_step=self.outer_step,
            world_size=_world(infos),
            group_world_size=group,
            tx_bytes=tx + sync_tx,
            rx_bytes=rx + sync_rx,
            comm_seconds=time.perf_counter() - t0,
            applied=True,
        )

    def _pseudo_gradients(self, reference: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``reference - local`` per trainable parameter, fresh contiguous tensors."""
        with torch.no_grad():
            return [
                torch.sub(ref, p.detach()).contiguous()
                for ref, p in zip(reference, self._params, strict=True)
            ]

    def _average(self, tensors: list[torch.Tensor]) -> list[ReduceInfo]:
        """Average ``tensors`` in place over the group (no-op alone)."""
        if self.comm is None:
            return [ReduceInfo(world_size=1, tx_bytes=0, rx_bytes=0)]
        return self.comm.all_reduce_many(
            tensors,
            op=ReduceOp.AVG,
            quantization=self.quantization,
            max_in_flight=self.max_in_flight,
        )

    def _apply_outer(self, grads: Sequence[torch.Tensor]) -> None:
        """One step of SGD with momentum on the outer parameters, written
        out so that it is exactly ``torch.optim.SGD(..., dampening=0)``:
        ``buf = mu*buf + g``; ``d = g + mu*buf`` (Nesterov) or ``buf``;
        ``outer -= lr*d``.  (torch starts ``buf`` at ``g``; ours starts at 0,
        and ``mu*0 + g == g``.)"""
        lr, mu = self.outer_lr, self.outer_momentum
        with torch.no_grad():
            for outer, buf, g in zip(self._outer, self._momentum, grads, strict=True):
                if mu != 0:
                    buf.mul_(mu).add_(g)
                    d = g.add(buf, alpha=mu) if self.nesterov else buf
                else:
                    d = g
                outer.add_(d, alpha=-lr)

    def _vote_and_sync(self) -> tuple[int, int, int]:
        """Admit newcomers and bring everybody's shared state in line.
        Returns (tx_bytes, rx_bytes, group_world_size)."""
        if self.comm is None:
            return 0, 0, 1
        self.comm.update_topology()
        tx, rx = self._sync_shared_state()
        return tx, rx, int(self.comm.group_world_size)

    def _sync_shared_state(self) -> tuple[int, int]:
        """The one place the shared state is synchronised.  Returns the
        bytes it moved (tx, rx)."""
        if self.comm is None:
            return 0, 0
        import pccl

        info = self.comm.sync_shared_state(
            pccl.SharedState(self.shared_state(), revision=self.outer_step),
            strategy=pccl.SyncStrategy.ENFORCE_POPULAR,
        )
        self.last_sync = info
        return info.tx_bytes, info.rx_bytes

    def _load_outer_into_model(self) -> None:
        with torch.no_grad():
            for p, outer in zip(self._params, self._outer, strict=True):
                p.copy_(outer)

    # ------------------------------------------------------------------
    # Checks.

    def _check_optimizer(self, optimizer: Any) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if groups is None:
            raise errors.InvalidArgumentError(
                f"inner_optimizer must be a torch.optim.Optimizer, got {optimizer!r}"
            )
        trainable = {id(p) for p in self._params}
        frozen = {id(p): n for n, p in zip(self._frozen_names, self._frozen, strict=True)}
        for group in groups:
            for p in group["params"]:
                if id(p) in frozen:
                    # Harmless for torch (no grad, no update), but it says the
                    # caller expects this tensor to train.
                    raise errors.InvalidArgumentError(
                        f"inner_optimizer holds frozen parameter {frozen[id(p)]!r} "
                        "(requires_grad=False); DiLoCo neither averages nor updates frozen "
                        "parameters"
                    )
                if id(p) not in trainable:
                    raise errors.InvalidArgumentError(
                        "inner_optimizer updates a tensor that is not a parameter of model; "
                        "DiLoCo would never average it"
                    )

    def _check_unchanged(self) -> None:
        """The parameter set must not change after construction (a tensor
        unfrozen mid-run would silently never be averaged)."""
        current = [(n, p) for n, p in self.model.named_parameters()]
        expected = sorted(
            [*zip(self._names, self._params, strict=True),
             *zip(self._frozen_names, self._frozen, strict=True)],
            key=lambda np_: np_[0],
        )
        if sorted((n for n, _ in current)) != [n for n, _ in expected]:
            raise errors.StateError(
                "the model's parameters changed after DiLoCo was constructed; "
                "construct a new DiLoCo"
            )
        trainable = {id(p) for p in self._params}
        for name, p in current:
            if p.requires_grad != (id(p) in trainable):
                raise errors.StateError(
                    f"parameter {name!r} changed requires_grad after DiLoCo was constructed; "
                    "construct a new DiLoCo for a new set of trainable parameters"
                )
            if p.device.type != "cpu":
                raise errors.StateError(f"parameter {name!r} moved to {p.device}")


class AsyncDiLoCo(DiLoCo):
    """DiLoCo with the reduction hidden behind the next H inner steps.

    At outer step ``t`` this peer computes its pseudo-gradient
    ``g_t = start_t - local`` (``start_t``: where its local model began
    this round), waits for the reduction started at ``t-1`` and applies it
    to the outer parameters (one step late), votes and synchronises, starts
    reducing ``g_t`` on a background thread, and continues from
    ``outer - g_t``: the newest outer parameters plus its own progress of
    the round that is still being averaged (which the averaged version
    replaces at ``t+1``).  ``finish()`` applies the last reduction and
    leaves the model at the final outer parameters.  Arguments as for
    :class:`DiLoCo`; docs/diloco.md has the derivation.

    ``deviation_feedback`` (keyword only, κ in [0, 1), default 0: the rule
    above) changes only where this peer continues:
    ``outer - g_t + κ·d_t``, where ``d_t`` is how far this round's start
    was from the mean start of the peers, tracked as
    ``d_t = (Δ_{t-1} - g_{t-1}) + κ·d_{t-1}`` (``Δ_{t-1}`` the average
    applied now, ``g_{t-1}`` this peer's own share of it; ``d_1 = 0``).
    Why: with κ = 0 a peer's deviation from the mean follows
    ``d_{t+1} = -c·d_t + noise``, where ``c`` is the fraction of a
    deviation the inner steps undo in one round; along stiff directions
    (``c`` near 1) the peers' deviations flip sign every outer step and
    grow like a random walk instead of being averaged away, so the peers
    train ever further from the outer parameters (docs/diloco.md,
    Convergence).  With κ it is ``(κ - c)·d_t + noise``, bounded for every
    ``c`` in [0, 1] (κ = 0.5: at most 4/3 of one round's noise variance).
    ``d`` averages to 0 over the peers, so the outer parameters and their
    updates are the same functions of the averaged pseudo-gradients as
    with κ = 0, and alone (a world of one) ``d`` is exactly 0.  Costs two
    more copies of the trainable parameters.

    The background reduction uses the communicator while ``step()`` is not
    running an outer step; do not call the communicator yourself between
    outer steps.
    """

    def __init__(self, *args: Any, deviation_feedback: float = 0.0, **kwargs: Any) -> None:
        if not 0 <= deviation_feedback < 1:
            raise errors.InvalidArgumentError(
                f"deviation_feedback must be in [0, 1), got {deviation_feedback!r}"
            )
        self.deviation_feedback = float(deviation_feedback)
        self._pending: _Reduction | None = None
        self._start: list[torch.Tensor] = []
        # With deviation_feedback: this peer's own pseudo-gradient in the
        # reduction in flight (the reduction averages its tensors in place),
        # and d, this round's start minus the peers' mean start.
        self._own_in_flight: list[torch.Tensor] | None = None
        self._deviation: list[torch.Tensor] = []
        super().__init__(*args, **kwargs)

    def _init_shared(self) -> None:
        self._sync_shared_state()
        self._load_outer_into_model()
        with torch.no_grad():
            self._start = [t.clone() for t in self._outer]
            if self.deviation_feedback:
                self._deviation = [torch.zeros_like(t) for t in self._outer]
        # Every peer starts a reduction right after every sync.  Peers that
        # start together reduce nothing (no contributors); a newcomer takes
        # part in the reduction the others start at this outer step, without
        # a contribution, so it receives the same average they do.
        self._launch([torch.zeros_like(t) for t in self._outer], contributes=False)

    def _outer_step(self) -> OuterStepInfo:
        t0 = time.perf_counter()
        grads = self._pseudo_gradients(self._start)
        pending, own = self._pending, self._own_in_flight
        applied, infos = self._apply_pending()
        kappa = self.deviation_feedback
        if kappa and applied and own is not None:
            # d <- (average - own share) + kappa*d: where this round started
            # relative to the peers' mean start.
            with torch.no_grad():
                for d, avg, g_own in zip(self._deviation, pending.grads, own, strict=True):
                    d.mul_(kappa).add_(avg).sub_(g_own)
        self._counter += 1
        tx, rx = _bytes(infos)
        sync_tx, sync_rx, group = self._vote_and_sync()
        comm_seconds = time.perf_counter() - t0
        # Continue from the newest outer parameters plus this round's own
        # progress (plus kappa*d).  (Before the launch: the reduction then
        # owns ``grads``.)
        with torch.no_grad():
            for i, (p, outer, g, start) in enumerate(zip(self._params, self._outer, grads,
                                                         self._start, strict=True)):
                torch.sub(outer, g, out=start)
                if kappa:
                    start.add_(self._deviation[i], alpha=kappa)
                p.copy_(start)
            self._own_in_flight = [g.clone() for g in grads] if kappa else None
        self._launch(grads, contributes=True)
        return OuterStepInfo(
            outer_step=self.outer_step,
            world_size=_world(infos) if applied else 0,
            group_world_size=group,
            tx_bytes=tx + sync_tx,
            rx_bytes=rx + sync_rx,
            comm_seconds=comm_seconds,
            applied=applied,
        )

    def finish(self) -> OuterStepInfo | None:
        if self._finished:
            return None
        self._finished = True
        t0 = time.perf_counter()
        applied, infos = self._apply_pending()
        self._counter += 1
        self._load_outer_into_model()
        tx, rx = _bytes(infos)
        return OuterStepInfo(
            outer_step=self.outer_step,
            world_size=_world(infos) if applied else 0,
            group_world_size=1 if self.comm is None else int(self.comm.group_world_size),
            tx_bytes=tx,
            rx_bytes=rx,
            comm_seconds=time.perf_counter() - t0,
            applied=applied,
        )

    def _launch(self, grads: list[torch.Tensor], contributes: bool) -> None:
        assert self._pending is None
        # The share of peers that contributed: 1.0 normally; below 1 when a
        # newcomer (contributing zeros) takes part; 0 when nobody did.
        share = torch.tensor([1.0 if contributes else 0.0], dtype=torch.float64)
        self._pending = _Reduction(self, grads, share)

    def _apply_pending(self) -> tuple[bool, list[ReduceInfo]]:
        pending, self._pending = self._pending, None
        if pending is None:
            return False, []
        infos = pending.wait()
        share = float(pending.share[0])
        if share == 0.0:
            return False, infos
        if share != 1.0:
            # The average counted non-contributing newcomers: rescale to the
            # contributors' mean (the same operation on identical bits on
            # every peer, so the result stays bit-identical).
            for g in pending.grads:
                g.div_(share)
        self._apply_outer(pending.grads)
        return True, infos


class _Reduction:
    """One background reduction: the contributors' share, then the
    pseudo-gradients, averaged in place by ``all_reduce_many`` (which
    retries on peer loss).  ``wait()`` returns its ReduceInfos or raises
    what the reduction raised."""

    def __init__(self, owner: DiLoCo, grads: list[torch.Tensor], share: torch.Tensor):
        self.grads = grads
        self.share = share
        self._owner = owner
        self._infos: list[ReduceInfo] = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if owner.comm is not None:
            # A daemon thread: a process that exits mid-reduction must not
            # hang on it (the communicator's own deadlines end it anyway).
            self._thread = threading.Thread(target=self._run, name="pccl-diloco-reduce",
                                            daemon=True)
            self._thread.start()
        else:
            self._infos = [ReduceInfo(world_size=1, tx_bytes=0, rx_bytes=0)]

    def _run(self) -> None:
        owner = self._owner
        try:
            # Unquantized: a one-element share must come back exact.
            infos = list(owner.comm.all_reduce_many([self.share], op=ReduceOp.AVG))
            infos += owner._average(self.grads)
            self._infos = infos
        except BaseException as exc:  # noqa: B036 - handed to the training thread
            self._error = exc

    def wait(self) -> list[ReduceInfo]:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._infos


def _check_param(name: str, p: torch.Tensor) -> None:
    if p.device.type != "cpu":
        raise errors.InvalidArgumentError(
            f"parameter {name!r} is on {p.device}; pccl reduces CPU tensors (keep the outer "
            "copy on the CPU by training a CPU model)"
        )
    if p.layout != torch.strided:
        raise errors.InvalidArgumentError(f"parameter {name!r} is not dense ({p.layout})")
    if p.dtype not in _FLOAT_DTYPES:
        raise errors.InvalidArgumentError(
            f"parameter {name!r} has dtype {p.dtype}; DiLoCo needs float32, float64, "
            "float16 or bfloat16 parameters"
        )


def _bytes(infos: Sequence[ReduceInfo]) -> tuple[int, int]:
    return sum(i.tx_bytes for i in infos), sum(i.rx_bytes for i in infos)


def _world(infos: Sequence[ReduceInfo]) -> int:
    # After a retry the tensors were reduced among different sets of peers;
    # report the smallest.
    return min((i.world_size for i in infos), default=0)
