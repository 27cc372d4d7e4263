"""Flow-splitting plans executed by pccl on the namespace leaf-spine
(issue 16): 8 hosts on leaf_spine(2 leaves x 4 hosts, 4 spines), a pccl
ring all-reduce over random ring placements with K = 4 connections per
edge, under ``minimal`` (pinned, weighted by the plan), ``ecmp`` (the same
K connections unpinned, L4 hash) and ``spray`` (nftables per-packet
spraying).

Strict: every all-reduce is correct, every pinned connection bound a port
of its planned spine, and under ``minimal`` each leaf's uplinks (both
directions) carry bytes within 5 % of equal.  The times are reported per
run (predicted vs measured); only coarse bounds are asserted, because the
machine is shared.

CI form: 3 placements, 16 MiB, 50/25 Mbit/s (about 2 minutes).  The long
form (10 placements, 64 MiB):

    sudo .venv/bin/python benchmarks/flowsplit.py --testbed --placements 10 --mib 64

Root only; skipped with the reason otherwise."""

from __future__ import annotations

import os
import statistics

import pytest

from pccl.testing.netns import ensure_nft, unavailable_reason

_REASON = unavailable_reason()
if _REASON is None:
    _REASON = ensure_nft()
pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
    pytest.mark.timeout(400),
]

PLACEMENTS = int(os.environ.get("PCCL_FLOWSPLIT_PLACEMENTS", "3"))
MIB = int(os.environ.get("PCCL_FLOWSPLIT_MIB", "16"))


def test_minimal_vs_ecmp_vs_spray_on_the_leaf_spine():
    from pccl.testing.flowsplit_bed import SCHEMES, FlowsplitBed, placements, table

    runs = []
    with FlowsplitBed(host_mbit=50, uplink_mbit=25, conns=4) as bed:
        for pl in placements(bed.topo, PLACEMENTS, seed=0):
            for s in SCHEMES:
                r = bed.run(pl, s, MIB << 20)
                load = os.getloadavg()[0]
                print(f"{s:8s} {pl} cross={r.cross}: measured {r.seconds:.2f} s, "
                      f"ideal {r.ideal:.2f} s (x{r.ratio:.2f}), model for {s} "
                      f"{r.predicted:.2f} s; worker CPU {r.cpu / r.seconds:.2f} cores, "
                      f"load {load:.1f}")
                runs.append(r)
                # Strict: the data are right and the plan reached the sockets.
                assert r.ok, f"wrong all-reduce result under {s}"
                if s == "minimal":
                    assert bed.pins_ok(r), f"a connection left its planned spine: {r.conns}"
                    for leaf in range(bed.leaves):
                        for down in (False, True):
                            spread = r.uplink_spread(leaf, bed.spines, down)
                            assert spread < 0.05, (
                                f"leaf {leaf} {'down' if down else 'up'}links not equal "
                                f"under minimal: spread {spread:.3f}, bytes "
                                f"{r.down_bytes if down else r.up_bytes}")
                # The CPU is not the bottleneck: the peers use little.
                assert r.cpu / r.seconds < 1.0
    print()
    print(table(runs, bed.spines))

    by = {s: [r for r in runs if r.scheme == s] for s in SCHEMES}
    m_ideal = statistics.mean(r.ratio for r in by["minimal"])
    m_spray = statistics.mean(m.seconds / s.seconds
                              for m, s in zip(by["minimal"], by["spray"], strict=True))
    coll = [r for r in by["ecmp"] if r.predicted / r.ideal > 1.05]
    e_ideal = statistics.mean(r.ratio for r in coll) if coll else float("nan")
    print(f"minimal / ideal {m_ideal:.2f} (target <= 1.15), minimal / spray {m_spray:.2f} "
          f"(target <= 1.10), ecmp / ideal where the model predicts collisions "
          f"{e_ideal:.2f} over {len(coll)} runs (target >= 1.25)")
    # Coarse bounds only (shared machine): minimal is not far from
    # spraying, nor from the model's ideal.
    assert m_spray < 1.3
    assert m_ideal < 1.6
