"""Properties of the flow-splitting model and planner (pccl.flowsplit)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pccl
from pccl import flowsplit
from pccl.flowsplit import FatTree, Flow, LeafSpine, traffic

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def leaf_spines(draw, max_leaves=6, max_spines=8, max_hpl=6):
    leaves = draw(st.integers(1, max_leaves))
    hpl = draw(st.integers(1 if leaves > 1 else 2, max_hpl))
    spines = draw(st.integers(1, max_spines))
    host = draw(st.sampled_from([0.2, 1.0, 10.0]))
    up = draw(st.sampled_from([0.1, 0.2, 1.0, 10.0]))
    return LeafSpine(leaves, spines, hpl, host, up)


@st.composite
def fabrics_pow2(draw):
    """Leaf-spines with a power-of-two host count (for halving-doubling)."""
    leaves = 2 ** draw(st.integers(0, 3))
    hpl = 2 ** draw(st.integers(0 if leaves > 1 else 1, 3))
    return LeafSpine(leaves, draw(st.integers(1, 8)), hpl, 1.0, 1.0)


@st.composite
def fat_trees(draw):
    return FatTree(
        pods=draw(st.integers(1, 3)),
        tors_per_pod=draw(st.integers(1, 3)),
        aggs_per_pod=draw(st.integers(1, 3)),
        cores_per_agg=draw(st.integers(1, 3)),
        hosts_per_tor=draw(st.integers(2, 3)),
        host_gbps=1.0,
        tor_gbps=draw(st.sampled_from([1.0, 2.0])),
        core_gbps=draw(st.sampled_from([1.0, 4.0])),
    )


def _patterns(topo, nbytes, seed):
    out = {
        "ring-contiguous": traffic.ring(topo, nbytes, "contiguous"),
        "ring-random": traffic.ring(topo, nbytes, "random", seed),
        "all-to-all": traffic.all_to_all(topo, nbytes),
        "permutation": traffic.permutation(topo, nbytes, seed),
    }
    n = topo.hosts
    if n >= 2 and n & (n - 1) == 0:
        for k in range(n.bit_length() - 1):
            out[f"hd-{k}"] = traffic.halving_doubling(topo, nbytes, k, "contiguous")
            out[f"hd-{k}-random"] = traffic.halving_doubling(topo, nbytes, k, "random", seed)
    return out


def _paths_lcm(topo):
    if isinstance(topo, LeafSpine):
        return topo.spines
    return math.lcm(topo.aggs_per_pod, topo.aggs_per_pod * topo.cores_per_agg)


# -- the theorem ---------------------------------------------------------------


def _check_minimal_is_spray(topo, nbytes, seed):
    for name, flows in _patterns(topo, nbytes, seed).items():
        mini = flowsplit.link_load_array(topo, flows, "minimal")
        spray = flowsplit.link_load_array(topo, flows, "spray")
        # every link, not only the most loaded one
        np.testing.assert_allclose(mini, spray, rtol=1e-12, atol=1e-9, err_msg=name)
        assert math.isclose(
            flowsplit.max_link_load(topo, flows, "minimal"),
            flowsplit.max_link_load(topo, flows, "spray"),
            rel_tol=1e-12,
            abs_tol=1e-9,
        ), name
        assert math.isclose(
            flowsplit.step_time(topo, flows, "minimal"),
            flowsplit.step_time(topo, flows, "spray"),
            rel_tol=1e-12,
        ), name


@FAST
@given(topo=leaf_spines(), mult=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_minimal_equals_spray_on_random_leaf_spines(topo, mult, seed):
    _check_minimal_is_spray(topo, topo.spines * mult, seed)


@FAST
@given(topo=fabrics_pow2(), mult=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_minimal_equals_spray_halving_doubling(topo, mult, seed):
    _check_minimal_is_spray(topo, topo.spines * mult, seed)


@settings(max_examples=20, deadline=None)
@given(topo=fat_trees(), mult=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_minimal_equals_spray_on_fat_trees(topo, mult, seed):
    _check_minimal_is_spray(topo, _paths_lcm(topo) * mult, seed)


@FAST
@given(
    topo=leaf_spines(),
    data=st.data(),
)
def test_minimal_equals_spray_with_unequal_sizes(topo, data):
    """Sizes differ between flows: minimal runs the construction per size
    class, so it still matches spraying on every link."""
    flows = traffic.ring(topo, 0, "random", data.draw(st.integers(0, 100)))
    flows += traffic.permutation(topo, 0, data.draw(st.integers(0, 100)))
    sizes = st.sampled_from([1, 2, 3, 7]).map(lambda k: k * topo.spines)
    flows = [Flow(f.src, f.dst, data.draw(sizes)) for f in flows]
    np.testing.assert_allclose(
        flowsplit.link_load_array(topo, flows, "minimal"),
        flowsplit.link_load_array(topo, flows, "spray"),
        rtol=1e-12,
        atol=1e-9,
    )


@FAST
@given(topo=leaf_spines(), nbytes=st.integers(0, 1000), seed=st.integers(0, 100))
def test_minimal_whole_bytes_stay_within_the_bound(topo, nbytes, seed):
    """Sizes not divisible by the split factor: pieces differ by at most one
    byte, so a group puts at most r/g bytes more or less than spraying on
    each of its paths; a link is within the sum of that over its groups."""
    flows = traffic.ring(topo, nbytes, "random", seed) + traffic.all_to_all(topo, nbytes)
    mini = flowsplit.link_load_array(topo, flows, "minimal")
    spray = flowsplit.link_load_array(topo, flows, "spray")
    groups = {}
    for f in flows:
        a, b = topo.leaf_of(f.src), topo.leaf_of(f.dst)
        if a != b:
            groups[(a, b)] = groups.get((a, b), 0) + 1
    index = {name: i for i, name in enumerate(topo.link_names())}
    pieces = np.zeros_like(mini)
    for (a, b), n in groups.items():
        r = n % topo.spines
        for p in range(topo.spines):
            share = r // math.gcd(r, topo.spines) if r else 0
            pieces[index[("up", a, p)]] += share
            pieces[index[("down", p, b)]] += share
    assert np.all(np.abs(mini - spray) <= pieces + 1e-9)
    np.testing.assert_allclose(mini.sum(), spray.sum())


# -- split factor and sub-flow counts ------------------------------------------


@FAST
@given(n=st.integers(0, 60), s=st.integers(1, 16), size_mult=st.integers(1, 5))
def test_split_factor_and_subflow_count(n, s, size_mult):
    topo = LeafSpine(2, s, 4, 1.0, 1.0)
    nbytes = s * size_mult
    # n equal flows from leaf 0 to leaf 1 (host pairs may repeat)
    flows = [Flow(i % 4, 4 + (i * 3) % 4, nbytes) for i in range(n)]
    plan = flowsplit.plan(topo, flows)
    r = n % s
    g = math.gcd(r, s)
    k = s // g if r else 1
    assert flowsplit.split_factor(n, s) == k
    assert flowsplit.group_subflow_count(n, s) == (n - r) + r * s // g
    assert len(plan) == (n - r) + r * k
    per_flow = np.bincount([sf.flow for sf in plan], minlength=n)
    assert sorted(per_flow.tolist()) == sorted([1] * (n - r) + [k] * r)
    assert int(np.sum(per_flow > 1)) == (r if k > 1 else 0)  # only r flows split
    per_path = np.zeros(s)
    for sf in plan:
        per_path[sf.path] += sf.nbytes
    assert np.all(per_path == n * nbytes / s)
    assert flowsplit.subflow_count(topo, flows, "minimal") == len(plan)


def test_subflow_counts_of_other_schemes():
    topo = LeafSpine(2, 4, 4, 1.0, 1.0)
    flows = traffic.ring(topo, 64)  # 6 local edges, 2 cross-leaf
    assert flowsplit.subflow_count(topo, flows, "ecmp") == 8
    assert flowsplit.subflow_count(topo, flows, "single") == 8
    assert flowsplit.subflow_count(topo, flows, "spray") == 8
    assert flowsplit.subflow_count(topo, flows, "mp-4") == 6 + 2 * 4
    assert flowsplit.subflow_count(topo, flows, "minimal") == 6 + 2 * 4  # n=1, s=4


def test_paper_counts():
    """The research note's worked counts on the 16-spine fabric."""
    assert flowsplit.split_factor(16, 16) == 1  # all-to-all: nothing split
    assert flowsplit.split_factor(1, 16) == 16
    assert flowsplit.group_subflow_count(2, 16) == 16
    assert flowsplit.group_subflow_count(3, 16) == 48
    assert flowsplit.group_subflow_count(4, 16) == 16
    assert flowsplit.group_subflow_count(20, 16) == 16 + 4 * 4


# -- ECMP ------------------------------------------------------------------------


@FAST
@given(topo=leaf_spines(), seed=st.integers(0, 2**20), scheme=st.sampled_from(
    ["ecmp", "mp-2", "mp-4", "mp-8", "single"]))
def test_hashed_and_single_never_below_spray(topo, seed, scheme):
    for name, flows in _patterns(topo, topo.spines * 8, seed).items():
        spray = flowsplit.max_link_load(topo, flows, "spray")
        assert flowsplit.max_link_load(topo, flows, scheme, seed=seed) >= spray - 1e-9, name
        assert flowsplit.step_time(topo, flows, scheme, seed=seed) >= (
            flowsplit.step_time(topo, flows, "spray") * (1 - 1e-12)
        ), name


def test_ecmp_is_seeded():
    topo = LeafSpine(4, 8, 4, 1.0, 1.0)
    flows = traffic.permutation(topo, 1 << 20, seed=3)
    a = flowsplit.link_load_array(topo, flows, "ecmp", seed=5)
    assert np.array_equal(a, flowsplit.link_load_array(topo, flows, "ecmp", seed=5))
    draws = {tuple(flowsplit.link_load_array(topo, flows, "ecmp", seed=s)) for s in range(8)}
    assert len(draws) > 1


def test_sixteen_flows_on_sixteen_paths():
    """16 equal flows hashed onto 16 paths: E[max] = 3.078 flows (exact, balls
    into bins), ideal 1; the Monte-Carlo mean of the model agrees."""
    exact = flowsplit.expected_max_bin(16, 16)
    assert exact == pytest.approx(3.0782468, abs=1e-6)
    assert flowsplit.expected_max_bin(4, 4) == pytest.approx(2.125)
    assert flowsplit.expected_max_bin(8, 4) == pytest.approx(3.5380859375)
    # one leaf pair, 16 flows leaf 0 -> leaf 1 (one per host), nothing back
    topo = LeafSpine(2, 16, 16, 1.0, 1.0)
    flows = [Flow(h, 16 + h, 1) for h in range(16)]
    mc = flowsplit.monte_carlo(topo, flows, "ecmp", trials=4000, seed=0)
    assert mc.mean == pytest.approx(3.08, abs=0.05)
    # and within 4 standard errors of the exact value (sd of the max ~ 0.7)
    assert abs(mc.mean - exact) < 4 * 0.75 / math.sqrt(4000)
    assert flowsplit.max_link_load(topo, flows, "spray") == pytest.approx(1.0)
    assert flowsplit.max_link_load(topo, flows, "minimal") == 1.0
    assert mc.p99 in (5.0, 6.0)


def test_ring_contiguous_shows_no_gap_in_time():
    """Contiguous ring: one flow per leaf pair, so the host link is the
    bottleneck under every scheme (the paper's ring result)."""
    topo = LeafSpine(16, 16, 16, 400.0, 400.0)
    flows = traffic.ring(topo, 1 << 20)
    ideal = flowsplit.step_time(topo, flows, "spray")
    for scheme in flowsplit.SCHEMES:
        assert flowsplit.step_time(topo, flows, scheme, seed=1) == pytest.approx(ideal)


def test_halving_doubling_cross_leaf_step_ecmp_about_three_times_ideal():
    topo = LeafSpine(2, 16, 16, 400.0, 400.0)
    flows = traffic.halving_doubling(topo, 1 << 20, 4)  # distance 16: all cross-leaf
    only_up = [f for f in flows if f.src < 16]  # one direction: one balls-into-bins draw
    mc = flowsplit.monte_carlo(topo, only_up, "ecmp", trials=1000)
    ratio = mc.mean / flowsplit.max_link_load(topo, only_up, "spray")
    assert 2.9 < ratio < 3.3
    assert flowsplit.max_link_load(topo, flows, "minimal") == pytest.approx(1 << 20)


# -- planner ------------------------------------------------------------------------


def _check_cover(flows, plan, align=1):
    by_flow = {}
    for sf in plan:
        by_flow.setdefault(sf.flow, []).append(sf)
    assert sorted(by_flow) == list(range(len(flows)))
    for i, f in enumerate(flows):
        pieces = sorted(by_flow[i], key=lambda sf: sf.offset)
        offset = 0
        for sf in pieces:
            assert sf.offset == offset
            assert sf.nbytes % align == 0
            assert sf.nbytes > 0 or f.nbytes == 0
            offset += sf.nbytes
        assert offset == f.nbytes
        paths = [sf.path for sf in pieces]
        assert len(set(paths)) == len(paths)  # pieces of a flow on distinct paths
    assert plan == sorted(plan, key=lambda sf: (sf.flow, sf.offset))


@FAST
@given(topo=leaf_spines(), seed=st.integers(0, 1000), align=st.sampled_from([1, 2, 4, 8]),
       data=st.data())
def test_plan_covers_bytes_exactly_and_is_deterministic(topo, seed, align, data):
    units = st.integers(0, 300)
    flows = traffic.ring(topo, 0, "random", seed) + traffic.permutation(topo, 0, seed)
    flows = [Flow(f.src, f.dst, data.draw(units) * align) for f in flows]
    plan = flowsplit.plan(topo, flows, align=align)
    _check_cover(flows, plan, align)
    assert flowsplit.plan(topo, list(flows), align=align) == plan
    for sf in plan:
        f = flows[sf.flow]
        local = topo.leaf_of(f.src) == topo.leaf_of(f.dst)
        assert (sf.path is None) == local
        assert local or 0 <= sf.path < topo.spines


def test_plan_remainder_goes_to_the_first_pieces():
    topo = LeafSpine(2, 4, 1, 1.0, 1.0)
    plan = flowsplit.plan(topo, [Flow(0, 1, 10)])  # n=1, s=4: 4 pieces of 10 bytes
    assert [(sf.offset, sf.nbytes) for sf in plan] == [(0, 3), (3, 3), (6, 2), (8, 2)]
    plan = flowsplit.plan(topo, [Flow(0, 1, 40)], align=4)  # 10 elements of 4 bytes
    assert [sf.nbytes for sf in plan] == [12, 12, 8, 8]
    plan = flowsplit.plan(topo, [Flow(0, 1, 2)])  # 2 bytes: 2 non-empty pieces
    assert [sf.nbytes for sf in plan] == [1, 1]
    assert flowsplit.plan(topo, [Flow(0, 1, 0)]) == [flowsplit.SubFlow(0, 0, 0, 0)]


_PLAN_SCRIPT = """
import json
from pccl import flowsplit
from pccl.flowsplit import traffic
t = flowsplit.LeafSpine(4, 6, 4, 1.0, 1.0)
flows = traffic.ring(t, 6000, "random", 7) + traffic.permutation(t, 1200, 9)
flows += traffic.halving_doubling(t, 600, 3)
print(json.dumps([[s.flow, s.offset, s.nbytes, s.path] for s in flowsplit.plan(t, flows)]))
"""


def test_plan_is_the_same_in_every_process():
    """Same inputs, same plan, whatever the hash seed of the interpreter."""
    outs = []
    for hashseed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        res = subprocess.run([sys.executable, "-c", _PLAN_SCRIPT], capture_output=True,
                             text=True, timeout=60, env=env, cwd="/")
        assert res.returncode == 0, res.stderr
        outs.append(json.loads(res.stdout))
    assert outs[0] == outs[1] == outs[2]
    assert len(outs[0]) > 48


def test_single_is_one_path_per_flow():
    topo = LeafSpine(4, 4, 4, 1.0, 1.0)
    flows = traffic.all_to_all(topo, 100)
    plan = flowsplit.plan_single(topo, flows)
    assert len(plan) == len(flows)
    _check_cover(flows, plan)
    # 4 x 4 = 16 flows per leaf pair over 4 spines: single is already ideal
    assert flowsplit.max_link_load(topo, flows, "single") == flowsplit.max_link_load(
        topo, flows, "spray")


def test_flow_connections():
    topo = LeafSpine(2, 4, 4, 1.0, 1.0)
    flows = [Flow(3, 4, 1000), Flow(0, 1, 500)]  # cross-leaf (n=1: 4 pieces), local
    plan = flowsplit.plan(topo, flows)
    conns = flowsplit.flow_connections(plan, 0)
    assert conns == [(0, 250), (1, 250), (2, 250), (3, 250)]  # counter starts at leaf 0
    six = flowsplit.flow_connections(plan, 0, 6)
    assert sum(b for _, b in six) == 1000 and len(six) == 6
    assert sorted({p for p, _ in six}) == [0, 1, 2, 3]
    assert flowsplit.flow_connections(plan, 1, 4) == [(None, 125)] * 4
    with pytest.raises(ValueError):
        flowsplit.flow_connections(plan, 0, 3)  # 4 paths cannot share 3 pinned connections
    with pytest.raises(ValueError):
        flowsplit.flow_connections(plan, 7)


def test_flow_connections_weights_follow_bytes():
    topo = LeafSpine(2, 3, 1, 1.0, 1.0)
    flows = [Flow(0, 1, 3000)] * 4  # n=4, s=3: 3 whole, 1 split 3 ways
    plan = flowsplit.plan(topo, flows)
    conns = flowsplit.flow_connections(plan, 3, 5)
    assert sum(b for _, b in conns) == 3000
    assert len({p for p, _ in conns}) == 3


def test_ring_connections():
    topo = LeafSpine(2, 4, 4, 1.0, 1.0)
    ring = [0, 4, 1, 5, 2, 6, 3, 7]  # every edge crosses leaves: n=4 per pair, s=4
    edges = flowsplit.ring_connections(topo, ring, 1 << 20, connections=2, align=4)
    assert len(edges) == 8
    for conns in edges:
        assert len(conns) == 2
        assert len({p for p, _ in conns}) == 1  # n = s: one path per edge, never split
        assert sum(b for _, b in conns) == 1 << 20
    paths_from_leaf0 = [edges[i][0][0] for i in (0, 2, 4, 6)]
    assert sorted(paths_from_leaf0) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        flowsplit.ring_connections(topo, [0, 0, 1], 8)


# -- traffic ------------------------------------------------------------------------


@FAST
@given(topo=leaf_spines(), seed=st.integers(0, 1000))
def test_traffic_shapes(topo, seed):
    n = topo.hosts
    for placement in ("contiguous", "random"):
        flows = traffic.ring(topo, 5, placement, seed)
        assert sorted(f.src for f in flows) == list(range(n))
        assert sorted(f.dst for f in flows) == list(range(n))
    perm = traffic.permutation(topo, 5, seed)
    assert sorted(f.dst for f in perm) == list(range(n))
    assert all(f.src != f.dst for f in perm)
    assert len(traffic.all_to_all(topo, 5)) == n * (n - 1)


def test_halving_doubling_steps():
    topo = LeafSpine(2, 2, 4, 1.0, 1.0)
    steps = traffic.halving_doubling_steps(topo, 1024)
    assert [s[0].nbytes for s in steps] == [512, 256, 128]
    assert [s[0].dst for s in steps] == [4, 2, 1]
    for step in steps:
        pairs = {(f.src, f.dst) for f in step}
        assert all((b, a) in pairs for a, b in pairs)
    with pytest.raises(ValueError):
        traffic.halving_doubling(LeafSpine(3, 2, 1), 8, 0)


# -- model basics and bad input ---------------------------------------------------


def test_link_loads_names_and_host_links():
    topo = LeafSpine(2, 2, 2, 1.0, 2.0)
    assert topo.oversubscription == pytest.approx(0.5)
    flows = traffic.all_to_all(topo, 8)
    loads = flowsplit.link_loads(topo, flows, "minimal")
    assert set(loads) == set(topo.link_names())
    assert loads[("host-up", 0)] == 24 and loads[("host-down", 3)] == 24
    for scheme in flowsplit.SCHEMES:
        other = flowsplit.link_loads(topo, flows, scheme, seed=2)
        assert all(other[k] == loads[k] for k in loads if k[0].startswith("host"))
        total = sum(v for k, v in other.items() if k[0] == "up")
        assert total == pytest.approx(8 * 2 * 2 * 2)  # 8 cross-leaf flows of 8 bytes x2 dirs
    # time: host link carries 24 B at 1 Gbps; fabric at most 16 B... at 2 Gbps
    assert flowsplit.step_time(topo, flows, "spray") == pytest.approx(24 * 8 / 1e9)


def test_bad_input_raises_value_error():
    topo = LeafSpine(2, 2, 2)
    bad_flows = [
        [Flow(0, 4, 1)],  # host out of range
        [Flow(-1, 1, 1)],
        [Flow(0, 1, -5)],  # negative bytes
        [Flow(1, 1, 5)],  # to itself
        [Flow(0, 2, 1.5)],  # fractional bytes
        [(0, 1, 3)],  # not a Flow
    ]
    for flows in bad_flows:
        for call in (
            lambda f=flows: flowsplit.plan(topo, f),
            lambda f=flows: flowsplit.max_link_load(topo, f, "ecmp"),
            lambda f=flows: flowsplit.subflow_count(topo, f, "minimal"),
        ):
            with pytest.raises(ValueError) as exc:
                call()
            assert isinstance(exc.value, pccl.PcclError)
    for kwargs in (
        dict(leaves=2, spines=0, hosts_per_leaf=2),
        dict(leaves=0, spines=2, hosts_per_leaf=2),
        dict(leaves=2, spines=2, hosts_per_leaf=-1),
        dict(leaves=2, spines=2, hosts_per_leaf=2, host_gbps=0),
        dict(leaves=2, spines=2, hosts_per_leaf=2, uplink_gbps=float("nan")),
        dict(leaves=2.5, spines=2, hosts_per_leaf=2),
    ):
        with pytest.raises(ValueError):
            LeafSpine(**kwargs)
    with pytest.raises(ValueError):
        FatTree(1, 1, 0, 1, 1)
    good = [Flow(0, 2, 6)]
    for scheme in ("bogus", "mp-0", "mp-x", 3):
        with pytest.raises(ValueError):
            flowsplit.max_link_load(topo, good, scheme)
    with pytest.raises(ValueError):
        flowsplit.plan(topo, good, align=4)  # 6 bytes is not whole 4-byte elements
    with pytest.raises(ValueError):
        flowsplit.plan(topo, good, align=0)
    with pytest.raises(ValueError):
        flowsplit.monte_carlo(topo, good, trials=0)
    with pytest.raises(ValueError):
        flowsplit.max_link_load(topo, good, "ecmp", seed=-1)
    with pytest.raises(ValueError):
        flowsplit.split_factor(3, 0)
    with pytest.raises(ValueError):
        traffic.ring(topo, 8, "sideways")


def test_empty_step():
    topo = LeafSpine(2, 2, 2)
    assert flowsplit.max_link_load(topo, [], "minimal") == 0.0
    assert flowsplit.plan(topo, []) == []
    assert flowsplit.step_time(topo, [], "ecmp") == 0.0


# -- command line -------------------------------------------------------------------


def test_cli_table_and_help():
    res = subprocess.run([sys.executable, "-m", "pccl.flowsplit", "table", "--help"],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 0 and "--fabric" in res.stdout and "--trials" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "pccl.flowsplit", "table", "--fabric", "testbed",
         "--fabric", "testbed-2spine", "--trials", "5"],
        capture_output=True, text=True, timeout=120, cwd="/",
    )
    assert res.returncode == 0, res.stderr
    for needle in ("max leaf-spine link load", "step time", "sub-flows", "minimal",
                   "halving-doubling", "testbed-2spine"):
        assert needle in res.stdout
    res = subprocess.run([sys.executable, "-m", "pccl.flowsplit", "table", "--trials", "0"],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 2
