"""DiLoCo convergence: 4 peers with DiLoCo (and async DiLoCo) against one
process training on 4x the batch, after the same number of tokens per peer.

Every contender trains the character-level transformer of
``examples/_charlm.py`` (same initialisation, inner AdamW) for the same
number of inner steps T:

* **diloco** - 4 peers (``examples/diloco_train.py`` processes, a real
  master in this process), batch B each, an outer Nesterov step every H
  inner steps;
* **async** - the same with ``AsyncDiLoCo`` (one-step-delayed outer updates);
* **baseline** - one process, batch 4B, plain AdamW (``--no-diloco``).

So each DiLoCo peer sees T*B sequences and the baseline 4*T*B: the total
is the same.  The final validation loss (the same fixed validation windows
for all) is compared: issue 6 asks for diloco within 5 % of the baseline
and async within 10 %.  Losses do not depend on timing, so all contenders
run at once.  Results: ``benchmarks/out/diloco_convergence.json`` and
``.png``.  Run as a file from the repository root::

    .venv/bin/python benchmarks/diloco_convergence.py --quick   # about 2 minutes
    .venv/bin/python benchmarks/diloco_convergence.py           # about 15-20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pccl

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "examples" / "diloco_train.py"
OUT_DIR = Path(__file__).resolve().parent / "out"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny model, short run (a smoke test, not the measurement)")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--sync-every", type=int, help="H (default 50; quick: 25)")
    p.add_argument("--outer-steps", type=int, help="T/H (default 20; quick: 6)")
    p.add_argument("--batch-size", type=int, help="B per DiLoCo peer (default 16; quick: 8)")
    p.add_argument("--model", choices=["tiny", "small"], help="default small; quick: tiny")
    p.add_argument("--lr", type=float, default=3e-3, help="inner AdamW learning rate (all)")
    p.add_argument("--quantize", choices=["none", "uint8"], default="none")
    p.add_argument("--skip-async", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    a = p.parse_args()
    quick = a.quick
    a.sync_every = a.sync_every or (25 if quick else 50)
    a.outer_steps = a.outer_steps or (6 if quick else 20)
    a.batch_size = a.batch_size or (8 if quick else 16)
    a.model = a.model or ("tiny" if quick else "small")
    a.chars = 1_000_000 if quick else 3_000_000
    return a


def common_args(a: argparse.Namespace, out_dir: Path) -> list[str]:
    return ["--sync-every", str(a.sync_every), "--outer-steps", str(a.outer_steps),
            "--model", a.model, "--lr", str(a.lr), "--seed", str(a.seed),
            "--chars", str(a.chars), "--eval-batches", "8", "--no-progress",
            "--out-dir", str(out_dir)]


def start(argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    with open(log, "w") as f:
        # cwd: the examples folder (never the repository root, whose pccl/
        # has no compiled extension).
        return subprocess.Popen([sys.executable, str(TRAIN), *argv], stdout=f,
                                stderr=subprocess.STDOUT, cwd=TRAIN.parent, env=env)


def load(out_dir: Path, name: str) -> dict:
    with open(out_dir / f"history-{name}.json") as f:
        return json.load(f)


def main() -> int:
    a = parse_args()
    work = a.out / "diloco_convergence"
    work.mkdir(parents=True, exist_ok=True)
    variants = ["diloco"] + ([] if a.skip_async else ["async"])
    print(f"model {a.model}, {a.peers} peers x batch {a.batch_size} vs 1 x batch "
          f"{a.peers * a.batch_size}; T = {a.outer_steps * a.sync_every} inner steps, "
          f"H = {a.sync_every}, quantization {a.quantize}", flush=True)
    t0 = time.monotonic()
    procs: dict[str, subprocess.Popen] = {}
    masters = []
    try:
        procs["baseline"] = start(
            [*common_args(a, work / "baseline"), "--no-diloco", "--name", "baseline",
             "--batch-size", str(a.peers * a.batch_size)], work / "baseline.log")
        for variant in variants:
            master = pccl.MasterNode(listen="127.0.0.1:0", vote_timeout=600.0)
            master.start()
            masters.append(master)
            for i in range(a.peers):
                argv = [*common_args(a, work / variant), "--master", master.address,
                        "--world", str(a.peers), "--data-shard", str(i),
                        "--name", f"peer{i}", "--batch-size", str(a.batch_size),
                        "--quantize", a.quantize]
                if variant == "async":
                    argv.append("--async")
                procs[f"{variant}/peer{i}"] = start(argv, work / f"{variant}-peer{i}.log")
        from tqdm import tqdm

        for name, proc in tqdm(list(procs.items()), desc="processes finished", unit="proc"):
            code = proc.wait(timeout=6 * 3600)
            if code != 0:
                log = (work / f"{name.replace('/', '-')}.log").read_text()[-3000:]
                print(f"{name} failed (exit {code}):\n{log}")
                return 1
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for master in masters:
            master.stop()
    elapsed = time.monotonic() - t0

    baseline = load(work / "baseline", "baseline")
    results = {"baseline": {"final_val_loss": baseline["final_val_loss"],
                            "history": baseline["history"]}}
    print(f"\n{'contender':<10} {'val loss':>9} {'ratio':>7} {'target':>7}  peers agree")
    print(f"{'baseline':<10} {baseline['final_val_loss']:>9.4f} {1:>7.3f} {'':>7}")
    ok = True
    for variant, target in (("diloco", 1.05), ("async", 1.10)):
        if variant not in variants:
            continue
        peers = [load(work / variant, f"peer{i}") for i in range(a.peers)]
        agree = len({p["final_hash"] for p in peers}) == 1
        val = peers[0]["final_val_loss"]
        ratio = val / baseline["final_val_loss"]
        ok &= agree and ratio <= target
        results[variant] = {"final_val_loss": val, "ratio": ratio, "target": target,
                            "peers_agree": agree, "history": peers[0]["history"]}
        print(f"{variant:<10} {val:>9.4f} {ratio:>7.3f} {'<= ' + str(target):>7}  "
              f"{'yes' if agree else 'NO'}")
    print(f"({elapsed:.0f} s)")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    name = "diloco_convergence" + ("_quick" if a.quick else "")
    with open(a.out / f"{name}.json", "w") as f:
        json.dump({"config": config, "elapsed_s": elapsed, "results": results}, f, indent=1)
    plot(results, a, a.out / f"{name}.png")
    print(f"wrote {a.out / (name + '.json')} and {a.out / (name + '.png')}")
    return 0 if ok else 2


def plot(results: dict, a: argparse.Namespace, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"baseline": f"1 process, batch {a.peers * a.batch_size}",
              "diloco": f"DiLoCo, {a.peers} peers x batch {a.batch_size}, H={a.sync_every}",
              "async": f"async DiLoCo, {a.peers} x {a.batch_size}, H={a.sync_every}"}
    for name, r in results.items():
        hist = r["history"]
        ax.plot([h["inner_steps"] for h in hist], [h["val_loss"] for h in hist],
                marker="o", ms=3, label=f"{labels[name]}: {r['final_val_loss']:.3f}")
    ax.set_xlabel("inner steps (same tokens per peer)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title(f"DiLoCo convergence ({a.model} char-LM)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
