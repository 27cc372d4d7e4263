"""Train a small character-level language model with DiLoCo over pccl.

Every peer trains the same transformer (same seed) on its own random
windows of the Python standard library's source; every ``--sync-every``
inner AdamW steps the peers average their pseudo-gradients and take an
outer Nesterov step (pccl.diloco).  Peers may join and die while the run
goes on (docs/diloco.md).

One peer of a run whose master already runs::

    pccl-master --listen 0.0.0.0:48148 &
    python examples/diloco_train.py --master 127.0.0.1:48148 --world 3 --data-shard 0

A whole run on this machine: an in-process master and three peers; with
``--chaos`` one peer is SIGKILLed at a third of the run and a new one joins::

    python examples/diloco_train.py --local 3 --chaos --outer-steps 12

Alone (no master; the outer step still runs, over one peer)::

    python examples/diloco_train.py --outer-steps 5

Each outer step prints the training and validation loss, tokens/s, the
peers that took part, and the bytes this peer sent; a step whose
all-reduce lost a peer and was retried says so, and a newcomer says when
it was admitted and what its shared-state sync moved.  At the end the loss
and all-reduce time per outer step are saved as a PNG in ``--out-dir``.
With ``--local`` the master serves its status page (the URL is printed)
and its log lines are shown; the peers' ``--name`` is the name the master
logs.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import torch

import pccl
from pccl.diloco import AsyncDiLoCo, DiLoCo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _charlm import SIZES, Batches, CharLM, evaluate, load_corpus, param_count  # noqa: E402

QUANTIZATION = {"none": pccl.Quantization.NONE, "uint8": pccl.Quantization.UINT8_MINMAX}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = p.add_argument_group("the run")
    run.add_argument("--master", help="HOST:PORT of a pccl-master; without it (and without "
                     "--local) this process trains alone")
    run.add_argument("--peer-group", type=int, default=0, help="pccl peer group")
    run.add_argument("--world", type=int, default=1,
                     help="peers to wait for before training starts (0: join a running run "
                     "and train from the next outer step)")
    run.add_argument("--local", type=int, metavar="N",
                     help="start a master and N peers of this script on this machine")
    run.add_argument("--chaos", action="store_true",
                     help="with --local: SIGKILL one peer a third into the run, then start a "
                     "new one that joins")
    algo = p.add_argument_group("DiLoCo")
    algo.add_argument("--sync-every", type=int, default=30, help="H: inner steps per outer step")
    algo.add_argument("--outer-steps", type=int, default=20, help="outer steps to train")
    algo.add_argument("--async", dest="async_", action="store_true",
                      help="AsyncDiLoCo: overlap the all-reduce with the next inner steps")
    algo.add_argument("--quantize", choices=sorted(QUANTIZATION), default="none",
                      help="wire compression of the pseudo-gradients")
    algo.add_argument("--outer-lr", type=float, default=0.7)
    algo.add_argument("--outer-momentum", type=float, default=0.9)
    algo.add_argument("--deviation-feedback", type=float, default=0.0, metavar="KAPPA",
                      help="with --async: AsyncDiLoCo's deviation_feedback (where a peer "
                      "continues after an outer step; docs/diloco.md, Convergence)")
    algo.add_argument("--no-diloco", action="store_true",
                      help="plain training without the outer optimizer (a baseline; alone only)")
    train = p.add_argument_group("training")
    train.add_argument("--seed", type=int, default=0,
                       help="model initialisation (the same on every peer)")
    train.add_argument("--data-shard", type=int,
                       help="seeds this peer's data sampling (default: the process id)")
    train.add_argument("--model", choices=sorted(SIZES), default="small")
    train.add_argument("--batch-size", type=int, default=16, help="sequences per inner step")
    train.add_argument("--lr", type=float, default=3e-3, help="inner AdamW peak learning rate")
    train.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                       help="inner learning rate after the warm-up: cosine decay to "
                       "--min-lr-ratio x lr at the last inner step, or constant")
    train.add_argument("--warmup", type=int, default=50, help="linear warm-up (inner steps)")
    train.add_argument("--min-lr-ratio", type=float, default=0.1,
                       help="final learning rate of the cosine schedule, relative to --lr")
    train.add_argument("--chars", type=int, default=3_000_000,
                       help="characters of the stdlib corpus to use")
    train.add_argument("--eval-batches", type=int, default=4,
                       help="validation batches evaluated after every outer step")
    out = p.add_argument_group("output")
    out.add_argument("--out-dir", default="diloco-out", help="where the plot and history go")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--name", help="label of this peer in the output and the master's log "
                     "(default: its peer id)")
    # --local's newcomer: import and load everything, then connect when a
    # line arrives on stdin (so that it joins when the demo says, promptly).
    out.add_argument("--start-on-stdin", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sync_every < 1:
        p.error("--sync-every must be >= 1")
    if args.no_diloco and (args.master or args.local):
        p.error("--no-diloco trains alone: no --master or --local")
    if args.chaos and not args.local:
        p.error("--chaos needs --local N")
    if args.deviation_feedback and not args.async_:
        p.error("--deviation-feedback needs --async")
    if args.warmup < 0 or not 0 <= args.min_lr_ratio <= 1:
        p.error("--warmup must be >= 0 and --min-lr-ratio in [0, 1]")
    return args


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """Inner learning rate at inner step ``step`` (0-based, counted over the
    whole run, so a newcomer continues the schedule where the run is):
    linear warm-up, then cosine decay (or constant)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "constant":
        return args.lr
    total = args.outer_steps * args.sync_every
    progress = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


# --------------------------------------------------------------------------
# One peer.


def outer_hash(diloco: DiLoCo) -> str:
    """A hash of the shared state: equal on every peer after each outer step."""
    h = hashlib.sha256()
    for name, t in sorted(diloco.shared_state().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class TimedComm:
    """The communicator, with the time of each ``all_reduce_many`` (the
    outer step's averaging, retries included) kept in ``last_reduce_s``."""

    def __init__(self, comm):
        self._comm = comm
        self.last_reduce_s = 0.0

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def all_reduce_many(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._comm.all_reduce_many(*args, **kwargs)
        finally:
            self.last_reduce_s = time.perf_counter() - t0


def connect(args: argparse.Namespace, say):
    kwargs = {}
    if args.name:
        # The master shows this name beside the peer id (logs, /status).
        if "name" in inspect.signature(pccl.Communicator).parameters:
            kwargs["name"] = args.name
        else:
            os.environ.setdefault("PCCL_NAME", args.name)
    comm = pccl.Communicator(args.master, peer_group=args.peer_group,
                             secret=os.environ.get("PCCL_SECRET"), **kwargs)
    label = args.name or "this peer"
    if args.world == 0:
        say(f"[{label}] joining the running run: pending until the peers' next vote")
    t0 = time.perf_counter()
    comm.connect()  # a newcomer is admitted at the running peers' next outer step
    if args.world == 0:
        say(f"[{label}] admitted as {comm.peer_id} after {time.perf_counter() - t0:.1f} s "
            f"pending (world {comm.world_size})")
    deadline = time.monotonic() + 300
    while comm.world_size < args.world:  # peers that start together wait for each other
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {comm.world_size} of {args.world} peers arrived")
        comm.update_topology(timeout=300)
    return comm


def train(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    torch.set_num_threads(1)
    # pccl's warnings (and errors) on stderr, one line each; PCCL_LOG=info
    # (docs/operations.md) shows more.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    corpus = load_corpus(args.chars)
    torch.manual_seed(args.seed)
    model = CharLM(SIZES[args.model])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    shard = os.getpid() if args.data_shard is None else args.data_shard
    data = Batches(corpus.train, args.batch_size, model.cfg.context, seed=1_000_003 * shard + 1)
    tokens_per_step = args.batch_size * model.cfg.context

    say = print if args.no_progress else tqdm.write
    if args.start_on_stdin:
        sys.stdin.readline()
    comm = TimedComm(connect(args, say)) if args.master else None
    name = args.name or (comm.peer_id if comm is not None else "alone")
    say(f"[{name}] {param_count(model) / 1e3:.0f} K parameters, corpus: {corpus.description}; "
        f"H={args.sync_every}, {'async ' if args.async_ else ''}DiLoCo, "
        f"quantization {args.quantize}" + (f", world {comm.world_size}" if comm else ""))
    diloco = None
    if not args.no_diloco:
        cls = AsyncDiLoCo if args.async_ else DiLoCo
        extra = {"deviation_feedback": args.deviation_feedback} if args.async_ else {}
        diloco = cls(model, comm, opt, outer_lr=args.outer_lr, outer_momentum=args.outer_momentum,
                     sync_every=args.sync_every, quantization=QUANTIZATION[args.quantize],
                     **extra)
        sync = diloco.last_sync
        if args.world == 0 and sync is not None:
            # A newcomer: DiLoCo's constructor fetched the run's outer state.
            say(f"[{name}] shared-state sync: {sync.rx_bytes / 1e6:.2f} MB from "
                f"{sync.sources} peer{'s' if sync.sources != 1 else ''} in {sync.seconds:.2f} s; "
                f"joins the run at outer step {diloco.outer_step}")

    history: list[dict] = []
    outer_step = diloco.outer_step if diloco else 0
    os.makedirs(args.out_dir, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    history_path = os.path.join(args.out_dir, f"history-{safe}.json")
    bar = tqdm(total=args.outer_steps, initial=outer_step, unit="outer", desc=name,
               disable=args.no_progress, dynamic_ncols=True)
    inner_steps = 0
    while outer_step < args.outer_steps:
        t0 = time.perf_counter()
        losses = []
        info = None
        group_before = comm.group_world_size if comm is not None else 1
        for _ in range(args.sync_every):
            # The run's inner-step index: a newcomer learned the outer-step
            # counter from the others.
            step = (diloco.outer_step * args.sync_every + diloco.inner_step) if diloco \
                else inner_steps
            for group in opt.param_groups:
                group["lr"] = learning_rate(args, step)
            x, y = data.next()
            loss = model.loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            inner_steps += 1
            info = diloco.step() if diloco else None
        elapsed = time.perf_counter() - t0
        outer_step = info.outer_step if info else outer_step + 1
        val = evaluate(model, corpus.val, batches=args.eval_batches)
        rec = {
            "outer_step": outer_step,
            "inner_steps": inner_steps,
            "tokens": inner_steps * tokens_per_step,
            "train_loss": sum(losses) / len(losses),
            "val_loss": val,
            "tokens_per_s": args.sync_every * tokens_per_step / elapsed,
            "world": info.world_size if info else 1,
            "group": info.group_world_size if info else 1,
            "tx_bytes": info.tx_bytes if info else 0,
            "comm_s": info.comm_seconds if info else 0.0,
            "reduce_s": comm.last_reduce_s if comm is not None else 0.0,
            "seconds": elapsed,
            "hash": outer_hash(diloco) if diloco else "",
        }
        rec["retried"] = info is not None and info.world_size < group_before
        history.append(rec)
        if rec["retried"]:
            # all_reduce_many lost a peer mid-step and reduced again among
            # the survivors (the step is not lost, it took a retry).
            say(f"[{name}] outer {outer_step}: the all-reduce failed (a peer was lost) and "
                f"was retried among the {info.world_size} survivors in "
                f"{rec['reduce_s']:.2f} s")
        with open(history_path, "w") as f:  # every step: a killed peer keeps its curve
            json.dump({"name": name, "history": history}, f)
        say(f"[{name}] outer {outer_step}/{args.outer_steps} train {rec['train_loss']:.3f} "
            f"val {val:.3f} | {rec['tokens_per_s']:,.0f} tok/s | peers {rec['world']} "
            f"(group {rec['group']}) | sent {rec['tx_bytes'] / 1e6:.2f} MB | "
            f"comm {rec['comm_s']:.2f} s | state {rec['hash']}")
        bar.update(outer_step - bar.n)
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val=f"{val:.3f}")
    bar.close()
    if diloco is not None:
        diloco.finish()
    final_val = evaluate(model, corpus.val, batches=4 * args.eval_batches)
    result = {
        "name": name,
        "args": {k: v for k, v in vars(args).items()},
        "params": param_count(model),
        "final_val_loss": final_val,
        "final_hash": outer_hash(diloco) if diloco else "",
        "history": history,
    }
    if comm is not None:
        comm.close()
    with open(history_path, "w") as f:
        json.dump(result, f, indent=1)
    plot_path = os.path.join(args.out_dir, f"loss-{safe}.png")
    plot({name: history}, plot_path, f"{name}: char-LM, H={args.sync_every}")
    say(f"[{name}] done: final validation loss {final_val:.4f}; plot {plot_path}")
    result["plot"] = plot_path
    return result


def plot(histories: dict[str, list[dict]], path: str, title: str,
         marks: list[tuple[float, str, str]] = ()) -> None:
    """Loss (top) and all-reduce time (bottom) per outer step of the run,
    one colour per peer; ``marks`` are (outer step, label, colour) lines
    across both panels (the kill, the join)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 2]})
    steps = [r["outer_step"] for hist in histories.values() for r in hist]
    # After an outer step every peer holds the same model: one validation
    # curve for the run (the first peer's value at each step).
    val: dict[int, float] = {}
    retry_labelled = False
    for label, hist in histories.items():
        if not hist:
            continue
        x = [r["outer_step"] for r in hist]
        line = ax.plot(x, [r["train_loss"] for r in hist], marker="o", ms=4, alpha=0.8,
                       label=f"{label} training")
        colour = line[0].get_color()
        bx.plot(x, [r.get("reduce_s", r["comm_s"]) for r in hist], color=colour, marker="o",
                ms=4, label=label)
        for r in hist:
            val.setdefault(r["outer_step"], r["val_loss"])
        retried = [r for r in hist if r.get("retried")]
        if retried:
            bx.scatter([r["outer_step"] for r in retried],
                       [r.get("reduce_s", r["comm_s"]) for r in retried], s=120,
                       facecolors="none", edgecolors="tab:red", linewidths=1.5, zorder=3,
                       label="retried (a peer lost)" if not retry_labelled else None)
            retry_labelled = True
    if val:
        xs = sorted(val)
        ax.plot(xs, [val[k] for k in xs], color="black", lw=2, ls="--",
                label="validation (the shared model)")
    for at, text, colour in marks:
        for a in (ax, bx):
            a.axvline(at, color=colour, ls=":", lw=1.5)
        ax.annotate(text, (at, 1.0), xycoords=("data", "axes fraction"), xytext=(4, -14),
                    textcoords="offset points", color=colour, fontsize="small")
    ax.set_ylabel("loss (nats/char)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    bx.set_ylabel("all-reduce time (s)\nof the outer step")
    bx.set_xlabel("outer step of the run")
    bx.grid(alpha=0.3)
    bx.legend(fontsize="x-small", ncol=4)
    if steps:
        bx.set_xticks(range(min(steps), max(steps) + 1))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------
# A whole run on this machine.


def local_job(args: argparse.Namespace) -> int:
    """An in-process master and ``args.local`` peers of this script; with
    ``--chaos`` one is SIGKILLed a third into the run and a new one joins.
    The peers' lines and the master's log are printed as they come, each
    prefixed with who said it (the demo's peer names are the names the
    master logs)."""
    out_dir = os.path.abspath(args.out_dir)
    common = ["--sync-every", str(args.sync_every), "--outer-steps", str(args.outer_steps),
              "--quantize", args.quantize, "--seed", str(args.seed), "--model", args.model,
              "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--schedule", args.schedule, "--warmup", str(args.warmup),
              "--min-lr-ratio", str(args.min_lr_ratio),
              "--outer-lr", str(args.outer_lr), "--outer-momentum", str(args.outer_momentum),
              "--chars", str(args.chars), "--eval-batches", str(args.eval_batches),
              "--out-dir", out_dir, "--no-progress"]
    if args.async_:
        common += ["--async", "--deviation-feedback", str(args.deviation_feedback)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs: dict[str, subprocess.Popen] = {}
    progress: dict[str, int] = {}
    joined_at: dict[str, int] = {}
    cond = threading.Condition()
    out_lock = threading.Lock()

    def emit(text: str) -> None:
        with out_lock:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            sys.stdout.flush()

    # The master runs in this process: its log lines (one per membership
    # event) are part of the story.
    class _MasterLines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            emit(f"master: {record.getMessage()}")

    master_log = logging.getLogger("pccl.master")
    master_log.addHandler(_MasterLines())
    master_log.setLevel(logging.INFO if master_log.level == logging.NOTSET else master_log.level)
    master_log.propagate = False

    os.makedirs(out_dir, exist_ok=True)
    for old in os.listdir(out_dir):  # a previous run's peers must not join this plot
        if old.startswith("history-") and old.endswith(".json"):
            os.remove(os.path.join(out_dir, old))

    with pccl.MasterNode(listen="127.0.0.1:0", status="127.0.0.1:0") as master:
        emit(f"master at {master.address}; {args.local} peers, {args.outer_steps} outer steps "
             f"of H={args.sync_every}")
        emit(f"status page: http://{master.status_address}/ (live while the demo runs; "
             f"or `pccl status {master.status_address} --watch`)")

        def pump(label: str, stream, parse: bool) -> None:
            for line in stream:
                emit(f"{label}: {line}")
                if not parse:
                    continue
                m = re.search(r"\] outer (\d+)/", line)
                m_join = re.search(r"\] shared-state sync: .* joins the run at outer step (\d+)",
                                   line)
                if m or m_join:
                    with cond:
                        if m:
                            progress[label] = int(m.group(1))
                        if m_join:
                            joined_at[label] = int(m_join.group(1))
                        cond.notify_all()

        def spawn(index: int, world: int) -> str:
            label = f"peer{index}"
            later = ["--start-on-stdin"] if world == 0 else []
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--master", master.address,
                 "--world", str(world), "--data-shard", str(index), "--name", label, *common,
                 *later],
                stdin=subprocess.PIPE if later else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                env=dict(env, PCCL_NAME=label), cwd=os.path.dirname(os.path.abspath(__file__)))
            procs[label] = proc
            threading.Thread(target=pump, args=(label, proc.stdout, True), daemon=True).start()
            threading.Thread(target=pump, args=(label, proc.stderr, False), daemon=True).start()
            return label

        kill_at = None
        newcomer = None
        try:
            for i in range(args.local):
                spawn(i, args.local)
            if args.chaos:
                # Started now (torch and the corpus take a while to load), it
                # connects only when told to, below.
                newcomer = spawn(args.local, 0)
                kill_at = max(1, args.outer_steps // 3)
                with cond:
                    if not cond.wait_for(lambda: progress.get("peer1", 0) >= kill_at,
                                         timeout=3600):
                        raise TimeoutError("peer1 never reached the kill point")
                    kill_at = progress["peer1"]
                emit(f"*** SIGKILL peer1 (pid {procs['peer1'].pid}) after outer step {kill_at}: "
                     f"the survivors' all-reduce of step {kill_at + 1} fails and is retried "
                     f"without it")
                procs["peer1"].send_signal(signal.SIGKILL)
                procs["peer1"].wait()
                # Start the newcomer once the survivors finished an outer step
                # without peer1 (so it is admitted at a regular vote, not at the
                # retry vote inside the reduction that notices the loss).
                with cond:
                    cond.wait_for(lambda: progress.get("peer0", 0) > kill_at, timeout=3600)
                emit(f"*** {newcomer} connects: it waits (pending) for the running peers' next "
                     f"outer step, is admitted there and catches up through shared-state sync")
                procs[newcomer].stdin.write("go\n")
                procs[newcomer].stdin.close()
            codes = {label: p.wait(timeout=24 * 3600) for label, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()

    results = {}
    for label in procs:
        path = os.path.join(out_dir, f"history-{label}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[label] = json.load(f)
    marks = []
    if kill_at is not None:
        marks.append((kill_at + 0.5, "peer1 SIGKILLed", "tab:red"))
    if newcomer is not None and newcomer in joined_at:
        marks.append((joined_at[newcomer] + 0.5, f"{newcomer} joins", "tab:green"))
    plot_path = os.path.join(out_dir, "loss.png")
    def legend(label: str) -> str:
        if label == "peer1" and kill_at is not None:
            return f"{label} (killed)"
        return f"{label} (joined)" if label == newcomer else label

    plot({legend(label): r["history"] for label, r in results.items()}, plot_path,
         f"DiLoCo, {args.local} peers, H={args.sync_every}" + (" (chaos)" if args.chaos else ""),
         marks)
    emit("\nsummary:")
    finished = {label: r for label, r in results.items() if "final_hash" in r}
    for label in procs:
        r = results.get(label, {})
        hist = r.get("history", [])
        if label in finished:
            emit(f"  {label}: final validation loss {r['final_val_loss']:.4f}, "
                 f"outer state {r['final_hash']}, exit code {codes[label]}")
        else:
            last = hist[-1]["outer_step"] if hist else 0
            emit(f"  {label}: killed after outer step {last} (exit code {codes[label]})")
    if newcomer in joined_at:
        emit(f"  {newcomer} joined after outer step {joined_at[newcomer]}")
    hashes = {r["final_hash"] for r in finished.values()}
    agree = "identical on every peer that finished" if len(hashes) == 1 else "DIFFERS"
    emit(f"  final outer state: {agree}")
    emit(f"  plot: {plot_path} (loss and all-reduce time per outer step; dotted lines: "
         f"the kill and the join)")
    bad = [label for label, c in codes.items() if c not in (0, -signal.SIGKILL)]
    return 1 if bad or len(hashes) != 1 else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local:
        return local_job(args)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
