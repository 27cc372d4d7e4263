"""Static-ring example: four processes on localhost reduce tensors over a striped ring.

Each rank contributes its own data; after every all-reduce the ranks compare
a hash of the result (bit-identical on every peer), and the demo prints the
bus bandwidth it reached.  Run with `python examples/static_ring.py --help`.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import time

import numpy as np


def worker(rank: int, world: int, conns: int, elems: int, steps: int, addr_q, addrs_q, out_q):
    import pccl

    with pccl.StaticRing(rank, world, p2p_connections=conns) as ring:
        addr_q.put((rank, ring.address))
        ring.connect(addrs_q.get(timeout=30), timeout=30)
        rng = np.random.default_rng(rank)
        for step in range(steps):
            x = rng.standard_normal(elems, dtype=np.float32)
            t0 = time.perf_counter()
            ring.all_reduce(x, op=pccl.ReduceOp.AVG, timeout=60)
            dt = time.perf_counter() - t0
            out_q.put((rank, step, hashlib.sha256(x.tobytes()).hexdigest()[:16], dt))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4, help="processes in the ring (default 4)")
    p.add_argument("--connections", type=int, default=4, help="TCP connections per neighbour")
    p.add_argument("--mib", type=float, default=16, help="tensor size in MiB (float32)")
    p.add_argument("--steps", type=int, default=10, help="all-reduces to run")
    args = p.parse_args()

    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    addr_q, out_q = ctx.Queue(), ctx.Queue()
    addrs_qs = [ctx.Queue() for _ in range(args.world)]
    elems = int(args.mib * (1 << 20)) // 4
    procs = [
        ctx.Process(target=worker, args=(r, args.world, args.connections, elems, args.steps,
                                         addr_q, addrs_qs[r], out_q), daemon=True)
        for r in range(args.world)
    ]
    for proc in procs:
        proc.start()
    try:
        addrs = dict(addr_q.get(timeout=60) for _ in range(args.world))
        ordered = [addrs[r] for r in range(args.world)]
        print(f"ring of {args.world} peers: {' -> '.join(ordered)}")
        for q in addrs_qs:
            q.put(ordered)
        results: dict[int, dict[int, tuple[str, float]]] = {}
        for _ in tqdm(range(args.world * args.steps), desc="all-reduce", unit="op"):
            rank, step, digest, dt = out_q.get(timeout=120)
            results.setdefault(step, {})[rank] = (digest, dt)
        nbytes = elems * 4
        busbw = []
        for step in sorted(results):
            digests = {d for d, _ in results[step].values()}
            if len(digests) != 1:
                print(f"step {step}: peers DISAGREE: {results[step]}")
                return 1
            worst = max(dt for _, dt in results[step].values())
            busbw.append(2 * (args.world - 1) / args.world * nbytes / worst / 1e9)
        print(f"{args.steps} all-reduces of {args.mib:g} MiB: results bit-identical on all "
              f"{args.world} peers; bus bandwidth median {np.median(busbw):.2f} GB/s")
        return 0
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


if __name__ == "__main__":
    raise SystemExit(main())
