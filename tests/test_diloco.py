"""pccl.diloco: the outer update against hand-computed values, AsyncDiLoCo's
one-step delay, a world of one against the same computation done by hand,
misuse errors, and bit-identical outer state across real peers (a real
``pccl-master``, peers as processes) through a SIGKILL between outer steps,
one mid-reduction, and a join (the join needs shared state: issue 4).

The peer processes are :mod:`pccl.testing.diloco_worker` workers, driven by
JSON lines on stdin: one ``go`` = H inner steps and the outer step; each
outer step is answered with a hash of the shared state (outer parameters,
momentum, counter).  Every wait is bounded and every process is killed at
the end.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
import torch

import pccl
from pccl.diloco import AsyncDiLoCo, DiLoCo
from pccl.testing.diloco_worker import WAIT, DiLoCoPeer, TinyLM, batches, inner_step
from pccl.testing.procs import MasterProcess

# --------------------------------------------------------------------------
# Single-process checks.


class ConstGrad(torch.nn.Module):
    """loss = sum(w * c): the gradient is always c, so H inner SGD steps of
    learning rate a move w by exactly -H*a*c (powers of two: no rounding)."""

    def __init__(self, w, dtype=torch.float64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=dtype))

    def loss(self, c) -> torch.Tensor:
        return (self.w * torch.tensor(c, dtype=self.w.dtype)).sum()


class FakeComm:
    """Stands in for a Communicator whose group has one other peer that
    always contributes ``other`` (per tensor) and ``other_share`` as its
    contributor flag (AsyncDiLoCo)."""

    def __init__(self, other, other_share=1.0):
        self.other = [torch.tensor(o, dtype=torch.float64) for o in other]
        self.other_share = other_share
        self.calls: list[tuple] = []
        self.votes = 0
        self.synced: list[tuple[int, list[str]]] = []
        self.group_world_size = 2

    def all_reduce_many(self, tensors, op=pccl.ReduceOp.SUM, quantization=None, max_in_flight=8):
        self.calls.append((len(tensors), op, quantization))
        assert op == pccl.ReduceOp.AVG
        others = (
            [torch.tensor([self.other_share], dtype=torch.float64)]
            if len(tensors) == 1 and tensors[0].dtype == torch.float64 and tensors[0].numel() == 1
            else self.other
        )
        for t, o in zip(tensors, others, strict=True):
            t.copy_((t + o) / 2)
        return [pccl.ReduceInfo(world_size=2, tx_bytes=10, rx_bytes=10) for _ in tensors]

    def update_topology(self):
        self.votes += 1

    def sync_shared_state(self, state, strategy=None):
        self.synced.append((state.revision, sorted(state.tensors)))
        return pccl.SyncInfo(tx_bytes=0, rx_bytes=0, revision=state.revision)


def run_inner(model, opt, diloco, c, steps):
    """``steps`` inner SGD steps on the ConstGrad loss; returns the infos."""
    infos = []
    for _ in range(steps):
        opt.zero_grad()
        model.loss(c).backward()
        opt.step()
        info = diloco.step()
        if info is not None:
            infos.append(info)
    return infos


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_update_equals_hand_computation(nesterov):
    # theta0 = [1, 2, -1]; the gradient is c = [1, -2, 0.5]; H = 2 steps of
    # lr 1/4 give this peer's pseudo-gradient 0.5*c = [0.5, -1, 0.25]; the
    # other peer contributes [1.5, 1, -0.25]: the average is [1, 0, 0].
    # Outer lr 1/2, momentum 1/2:
    #   step 1: buf = [1,0,0];   nesterov d = [1.5,0,0]  (else [1,0,0])
    #   step 2: buf = [1.5,0,0]; nesterov d = [1.75,0,0] (else [1.5,0,0])
    model = ConstGrad([1.0, 2.0, -1.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    comm = FakeComm([[1.5, 1.0, -0.25]])
    diloco = DiLoCo(
        model, comm, opt, outer_lr=0.5, outer_momentum=0.5, nesterov=nesterov, sync_every=2
    )
    c = [1.0, -2.0, 0.5]
    expected = (
        [[0.25, 2.0, -1.0], [-0.625, 2.0, -1.0]]
        if nesterov
        else [[0.5, 2.0, -1.0], [-0.25, 2.0, -1.0]]
    )
    for step in (1, 2):
        (info,) = run_inner(model, opt, diloco, c, 2)
        assert info.outer_step == step and info.applied and info.world_size == 2
        assert info.tx_bytes == 10
        assert diloco.outer_parameters[0].tolist() == expected[step - 1]
        assert model.w.tolist() == expected[step - 1]  # the model restarts from the outer copy
    assert diloco.shared_state()["momentum/w"].tolist() == [1.5, 0.0, 0.0]
    assert comm.votes == 2  # one update_topology() per outer step
    # The shared state is synced at construction and after every vote, its
    # revision advancing by one per sync.
    assert comm.synced == [(r, ["momentum/w", "outer/w", "outer_step"]) for r in (0, 1, 2)]
    assert comm.calls == [(1, pccl.ReduceOp.AVG, pccl.Quantization.NONE)] * 2


def test_outer_update_is_torch_sgd():
    """Random pseudo-gradients: bit for bit what torch.optim.SGD does."""
    torch.manual_seed(0)
    for nesterov, mu in ((True, 0.9), (False, 0.9), (False, 0.0)):
        model = torch.nn.Linear(5, 3)
        diloco = DiLoCo(
            model,
            None,
            torch.optim.SGD(model.parameters(), lr=0.1),
            outer_lr=0.7,
            outer_momentum=mu,
            nesterov=nesterov,
            sync_every=1,
        )
        ref = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        ref_opt = torch.optim.SGD(ref, lr=0.7, momentum=mu, nesterov=nesterov, foreach=False)
        for _ in range(5):
            grads = [torch.randn_like(p) for p in ref]
            diloco._apply_outer([g.clone() for g in grads])
            for p, g in zip(ref, grads, strict=True):
                p.grad = g
            ref_opt.step()
            for mine, theirs in zip(diloco.outer_parameters, ref, strict=True):
                assert torch.equal(mine, theirs.detach())


def diloco_run(comm, H=4, outer_steps=3, quantization=pccl.Quantization.NONE):
    torch.manual_seed(1)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    diloco = DiLoCo(model, comm, opt, sync_every=H, quantization=quantization)
    history = []
    for x in batches(2, H * outer_steps):
        inner_step(model, opt, x)
        if diloco.step() is not None:
            history.append([t.clone() for t in diloco.outer_parameters])
    return history


def by_hand_run(H=4, outer_steps=3):
    """Plain training with an outer torch.optim.SGD(nesterov) by hand."""
    torch.manual_seed(1)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    outer = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    outer_opt = torch.optim.SGD(outer, lr=0.7, momentum=0.9, nesterov=True, foreach=False)
    history = []
    for i, x in enumerate(batches(2, H * outer_steps)):
        inner_step(model, opt, x)
        if (i + 1) % H == 0:
            with torch.no_grad():
                for o, p in zip(outer, model.parameters(), strict=True):
                    o.grad = o.detach() - p.detach()
                outer_opt.step()
                for o, p in zip(outer, model.parameters(), strict=True):
                    p.copy_(o)
            history.append([o.detach().clone() for o in outer])
    return history


def assert_histories_equal(a, b):
    assert len(a) == len(b)
    for step, (xs, ys) in enumerate(zip(a, b, strict=True)):
        for x, y in zip(xs, ys, strict=True):
            assert torch.equal(x, y), f"outer step {step + 1} differs"


def test_world_of_one_matches_by_hand():
    assert_histories_equal(diloco_run(None), by_hand_run())


def test_world_of_one_with_identity_outer_step_is_plain_training():
    # outer_lr 1, no momentum: theta - 1*(theta - x) = x (up to rounding), so
    # DiLoCo alone is plain training with the inner optimizer.
    def run(use_diloco: bool) -> list[torch.Tensor]:
        torch.manual_seed(3)
        model = TinyLM().double()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        diloco = (DiLoCo(model, None, opt, outer_lr=1.0, outer_momentum=0.0, sync_every=3)
                  if use_diloco else None)
        for x in batches(4, 12):
            inner_step(model, opt, x)
            if diloco is not None:
                diloco.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_async_world_of_one_with_identity_outer_step_is_plain_training():
    # The one-step delay and the rebase (x <- theta - g) lose nothing alone:
    # with outer lr 1 and no momentum, after finish() the model is where
    # plain inner training ends (up to rounding).
    def run(use_diloco: bool) -> list[torch.Tensor]:
        torch.manual_seed(3)
        model = TinyLM().double()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        diloco = (AsyncDiLoCo(model, None, opt, outer_lr=1.0, outer_momentum=0.0,
                              sync_every=3) if use_diloco else None)
        for x in batches(4, 12):
            inner_step(model, opt, x)
            if diloco is not None:
                diloco.step()
        if diloco is not None:
            assert diloco.finish().applied
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kappa", [-0.1, 1.0, 2.0])
def test_async_deviation_feedback_out_of_range(kappa):
    model = ConstGrad([0.0, 0.0, 0.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    with pytest.raises(pccl.InvalidArgumentError, match="deviation_feedback"):
        AsyncDiLoCo(model, None, opt, sync_every=2, deviation_feedback=kappa)


def test_world_of_one_through_a_real_communicator():
    """A communicator alone in its run: the same bits as no communicator."""
    with pccl.MasterNode(listen="127.0.0.1:0") as master:
        with pccl.Communicator(master.address, p2p_connections=1) as comm:
            comm.connect(timeout=30)
            assert comm.world_size == 1
            assert_histories_equal(diloco_run(comm), by_hand_run())


@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_async_applies_updates_exactly_one_step_late(kappa):
    # One peer, the ConstGrad model: every round's own progress is
    # -H*a*c = -[1, 2, 0.5] (H = 2, a = 1/4, c = [2, 4, 1]), so every
    # pseudo-gradient is g = [1, 2, 0.5].  Outer lr 1/2, no momentum: an
    # applied update moves the outer parameters by -[0.5, 1, 0.25].
    # deviation_feedback changes nothing alone: a peer's deviation from
    # the peers' mean start is then exactly 0.
    model = ConstGrad([0.0, 0.0, 0.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    diloco = AsyncDiLoCo(model, None, opt, outer_lr=0.5, outer_momentum=0.0, sync_every=2,
                         deviation_feedback=kappa)
    c = [2.0, 4.0, 1.0]
    g = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    step = torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64)

    (info,) = run_inner(model, opt, diloco, c, 2)  # outer step 1: nothing to apply yet
    assert not info.applied and info.outer_step == 1
    assert torch.equal(diloco.outer_parameters[0], torch.zeros(3, dtype=torch.float64))
    # The local model keeps its own progress: outer - g.
    assert torch.equal(model.w.detach(), -g)
    for t in (2, 3, 4):
        (info,) = run_inner(model, opt, diloco, c, 2)
        # At outer step t the update of step t-1 is applied: t-1 updates in all.
        assert info.applied and info.outer_step == t
        assert torch.equal(diloco.outer_parameters[0], -(t - 1) * step)
        assert torch.equal(model.w.detach(), -(t - 1) * step - g)
    info = diloco.finish()  # applies step 4's reduction; the model = outer
    assert info.applied
    assert torch.equal(diloco.outer_parameters[0], -4 * step)
    assert torch.equal(model.w.detach(), -4 * step)
    assert diloco.finish() is None
    with pytest.raises(pccl.StateError):
        diloco.step()


def test_async_rescales_when_a_newcomer_contributes_nothing():
    # The other peer joined at this outer step: its pseudo-gradient is zero
    # and its contributor flag 0, so the average over both (g/2) is rescaled
    # by the share of contributors (1/2) back to this peer's own g.
    model = ConstGrad([0.0, 0.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    comm = FakeComm([[0.0, 0.0]], other_share=0.0)
    diloco = AsyncDiLoCo(model, comm, opt, outer_lr=1.0, outer_momentum=0.0, sync_every=1)
    run_inner(model, opt, diloco, [1.0, -2.0], 1)  # g = [0.5, -1], launched
    info = diloco.finish()
    assert info.applied and info.world_size == 2
    assert diloco.outer_parameters[0].tolist() == [-0.5, 1.0]
    # The constructor's reduction had no contributor at all: nothing applied.
    assert [n for n, _, _ in comm.calls] == [1, 1, 1, 1]


def test_frozen_parameters_are_shared_but_not_reduced():
    model = TinyLM()
    model.emb.weight.requires_grad_(False)
    frozen_before = model.emb.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    comm = FakeComm([torch.zeros_like(p).tolist() for p in model.parameters() if p.requires_grad])
    diloco = DiLoCo(model, comm, opt, sync_every=1)
    state = diloco.shared_state()
    assert "frozen/emb.weight" in state and "outer/emb.weight" not in state
    assert state["frozen/emb.weight"].data_ptr() == model.emb.weight.data_ptr()
    assert set(state) >= {"outer/hidden.weight", "momentum/out.bias", "outer_step"}
    inner_step(model, opt, batches(0, 1)[0])
    diloco.step()
    assert comm.calls[0][0] == 4  # hidden and out, weight and bias
    assert torch.equal(model.emb.weight, frozen_before)
    assert diloco.outer_step == 1 and int(state["outer_step"][0]) == 1


def test_misuse_is_refused_clearly():
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for h in (0, -1, 1.5, True):
        with pytest.raises(pccl.InvalidArgumentError, match="sync_every"):
            DiLoCo(model, None, opt, sync_every=h)
    with pytest.raises(ValueError, match="outer_lr"):
        DiLoCo(model, None, opt, outer_lr=0)
    with pytest.raises(ValueError, match="outer_momentum"):
        DiLoCo(model, None, opt, outer_momentum=1.0)

    meta = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(pccl.InvalidArgumentError, match="on meta"):
        DiLoCo(meta, None, torch.optim.SGD(meta.parameters(), lr=0.1))

    ints = TinyLM()
    ints.counter = torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    with pytest.raises(pccl.InvalidArgumentError, match="int64"):
        DiLoCo(ints, None, torch.optim.SGD(TinyLM().parameters(), lr=0.1))

    all_frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(pccl.InvalidArgumentError, match="no trainable"):
        DiLoCo(all_frozen, None, opt)

    partly = TinyLM()
    partly.emb.weight.requires_grad_(False)
    with pytest.raises(pccl.InvalidArgumentError, match="frozen parameter 'emb.weight'"):
        DiLoCo(partly, None, torch.optim.SGD(partly.parameters(), lr=0.1))

    with pytest.raises(pccl.InvalidArgumentError, match="not a parameter of model"):
        DiLoCo(TinyLM(), None, opt)  # opt belongs to another model

    unfrozen_later = TinyLM()
    diloco = DiLoCo(
        unfrozen_later, None, torch.optim.SGD(unfrozen_later.parameters(), lr=0.1), sync_every=1
    )
    unfrozen_later.emb.weight.requires_grad_(False)
    with pytest.raises(pccl.StateError, match="requires_grad"):
        diloco.step()


# --------------------------------------------------------------------------
# Real peers: a pccl-master subprocess and one process per peer.

H = 3


class Run:
    def __init__(self, workdir: str, async_: bool):
        self.workdir = workdir
        self.async_ = async_
        self.master = MasterProcess(
            workdir, heartbeat_timeout=2.0, heartbeat_interval=0.25, vote_timeout=20.0
        )
        self.peers: list[DiLoCoPeer] = []

    def start(self, index: int, world: int, seed: int = 7) -> DiLoCoPeer:
        peer = DiLoCoPeer(
            self.workdir, self.master.address, index, world=world, seed=seed,
            sync_every=H, async_=self.async_,
        )
        self.peers.append(peer)
        return peer

    def close(self) -> None:
        for p in self.peers:
            p.kill()
        self.master.kill()


@pytest.fixture(params=["sync", "async"])
def run(request, tmp_path) -> Iterator[Run]:
    r = Run(str(tmp_path), async_=request.param == "async")
    try:
        yield r
    finally:
        r.close()


def outer_steps(peers: list[DiLoCoPeer], **go) -> list[dict]:
    """One outer step on every peer; checks the shared state is bit-identical."""
    for p in peers:
        p.send("go", **go)
    replies = [p.expect("outer") for p in peers]
    hashes = {r["hash"] for r in replies}
    assert len(hashes) == 1, f"outer state differs between peers: {replies}"
    assert len({r["outer_step"] for r in replies}) == 1
    return replies


def start_peers(run: Run, n: int) -> list[DiLoCoPeer]:
    peers = [run.start(i, world=n) for i in range(n)]
    for p in peers:
        p.expect("hello")
    ready = [p.expect("ready") for p in peers]
    assert len({r["hash"] for r in ready}) == 1  # same seed: identical start
    return peers


def test_peers_stay_bit_identical_through_kills(run):
    peers = start_peers(run, 4)
    for _ in range(2):
        replies = outer_steps(peers)
    assert {r["world"] for r in replies} == {4}

    # SIGKILL between outer steps: the next reduction fails once, is
    # retried among the survivors, who stay bit-identical.
    victim = peers.pop(1)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=10)
    replies = outer_steps(peers)
    if not run.async_:  # async: this step applies the reduction started with 4
        assert {r["world"] for r in replies} == {3}
    assert {r["group"] for r in replies} == {3}
    outer_steps(peers)

    # A peer dies in the middle of its all_reduce_many (after 2 of its 5
    # tensors): the reductions that finished keep its contribution, the
    # others are retried without it; everybody agrees bit for bit.
    victim = peers.pop(0)
    victim.send("go", die_mid_reduce=True)
    replies = outer_steps(peers)
    assert victim.proc.wait(timeout=WAIT) == -signal.SIGKILL
    for _ in range(2):
        replies = outer_steps(peers)
    assert {r["world"] for r in replies} == {2}
    for p in peers:
        p.send("finish")
    finals = [p.expect("finished") for p in peers]
    assert len({f["hash"] for f in finals}) == 1
    assert len({f["model_hash"] for f in finals}) == 1  # the model = final outer params


def test_newcomer_catches_up_bit_identical(run):
    peers = start_peers(run, 3)
    outer_steps(peers)
    # The newcomer starts from other weights (another seed): it has to
    # receive the run's outer state.
    newcomer = run.start(3, world=0, seed=99)
    newcomer.expect("hello")  # it is connecting; admitted at the next vote
    deadline = time.monotonic() + WAIT
    while True:
        replies = outer_steps(peers)
        if replies[0]["group"] == 4:
            break
        assert time.monotonic() < deadline, "the newcomer was never admitted"
    ready = newcomer.expect("ready")
    assert ready["hash"] == replies[0]["hash"], "the newcomer did not receive the shared state"
    peers.append(newcomer)
    for _ in range(3):
        replies = outer_steps(peers)
    assert {r["world"] for r in replies} == {4}
