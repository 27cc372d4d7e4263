"""Multi-process ring all-reduce on 127.0.0.1 against numpy/torch.

Each rank is a ``pccl.testing.ring_worker`` process; one ring runs a whole
dtype x op x size x quantization x placement matrix, every worker checks
its results against a reference (exact for integers, MIN and MAX; within a
rounding / quantization bound for floating sums and products), and the
parent checks that all ranks hold the same bits (sha256 per case).
"""

from __future__ import annotations

import pytest

from pccl.testing import reference as ref

# (world, K connections, slice bytes; None = the default 1 MiB).  With
# 4 KiB slices the 65537-element cases span many slices per chunk, so every
# connection carries several; the configurations are ordered so that the
# pooled rings are reused by the tests that follow.
MATRIX_CONFIGS = [
    (3, 4, 4096),
    (8, 4, 4096),
    (4, 1, 4096),
    (4, 16, None),
    (2, 16, 4096),
    (3, 1, None),
    (2, 4, None),
]


def _ids(cfg) -> str:
    world, k, sb = cfg
    return f"world{world}-K{k}-slice{sb or 'default'}"


def assert_cases_ok(replies: dict[int, dict], key: str = "results", expect: int | None = None):
    """Every case of every rank passed its reference check, and every case
    has the same hash on every rank."""
    per_rank = {
        r: {name: (digest, err) for name, digest, err in rep[key]} for r, rep in replies.items()
    }
    names = [name for name, _, _ in replies[0][key]]
    if expect is not None:
        assert len(names) == expect
    failures = []
    for name in names:
        errs = {r: per_rank[r][name][1] for r in per_rank if per_rank[r][name][1]}
        digests = {per_rank[r][name][0] for r in per_rank}
        if errs:
            failures.append(f"{name}: " + "; ".join(f"rank {r}: {e}" for r, e in errs.items()))
        elif len(digests) != 1:
            failures.append(
                f"{name}: results differ between ranks (hashes "
                + ", ".join(f"rank {r}: {per_rank[r][name][0][:12]}" for r in per_rank)
                + ")"
            )
    assert not failures, f"{len(failures)} of {len(names)} cases failed:\n  " + "\n  ".join(
        failures[:40]
    )


@pytest.mark.timeout(200)
def test_concurrent_ops_with_tags(pooled_cluster):
    """Eight ops in flight at once (one tag each, started and waited for in
    a different order on every rank), twice with the same tags."""
    cluster = pooled_cluster(3, 4, 4096)
    replies = cluster.request({"cmd": "concurrent", "seed": 11, "rounds": 2}, timeout=150)
    assert_cases_ok(replies, expect=16)


@pytest.mark.timeout(120)
def test_burst_of_small_ops(pooled_cluster):
    """256 small ops in flight at once, one tag each, started and waited
    for in a different order on every rank."""
    cluster = pooled_cluster(3, 4, 4096)
    replies = cluster.request({"cmd": "burst", "ops": 256, "seed": 5}, timeout=90)
    assert_cases_ok(replies, expect=256)


@pytest.mark.timeout(120)
def test_same_tag_twice_in_flight_is_busy(pooled_cluster):
    cluster = pooled_cluster(3, 4, 4096)
    replies = cluster.request({"cmd": "busy", "elements": 1 << 20}, timeout=90)
    for r, rep in replies.items():
        assert rep["second"] == "BusyError", f"rank {r}: second op with tag 7: {rep['second']}"
        assert rep["first"] == "ok", f"rank {r}: first op: {rep['first']}"
    assert len({rep["hash"] for rep in replies.values()}) == 1


@pytest.mark.timeout(120)
def test_special_values(pooled_cluster):
    """NaN, +/-inf, -0.0 and subnormals: IEEE results unquantized, no
    damage beyond their own slice when quantized, and always the same bits
    on every rank."""
    cluster = pooled_cluster(3, 4, 4096)
    replies = cluster.request({"cmd": "special", "seed": 3}, timeout=90)
    assert_cases_ok(replies, expect=4 * 5 * 2)


@pytest.mark.timeout(280)
@pytest.mark.parametrize("cfg", MATRIX_CONFIGS, ids=_ids)
def test_dtype_op_size_matrix(pooled_cluster, cfg):
    world, k, slice_bytes = cfg
    cluster = pooled_cluster(world, k, slice_bytes)
    replies = cluster.request({"cmd": "matrix", "seed": 1000 + world * 100 + k}, timeout=240)
    assert_cases_ok(replies, expect=len(ref.matrix_cases(world)))


@pytest.mark.timeout(200)
def test_100_mb_tensor(pooled_cluster):
    """One float32 tensor of 100 MiB (+1 element), world 2, K = 4: exact
    (integer-valued floats) and bit-identical."""
    cluster = pooled_cluster(2, 4, None)
    n = 100 * 2**20 // 4 + 1
    replies = cluster.request({"cmd": "big", "elements": n}, timeout=150)
    for r, rep in replies.items():
        assert rep["error"] is None, f"rank {r}: {rep['error']}"
        # Ring all-reduce of world 2: each rank sends about half the tensor twice.
        assert rep["tx_bytes"] >= 4 * (n - 1) and rep["rx_bytes"] >= 4 * (n - 1)
    assert len({rep["hash"] for rep in replies.values()}) == 1
