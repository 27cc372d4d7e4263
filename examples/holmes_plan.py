"""Holmes placement vs naive placement for a two-cluster job, predicted.

The paper's Fig. 6 case (arXiv 2312.03549): 8 nodes of 8 GPUs, 4 on an
InfiniBand cluster and 4 on a RoCE cluster, only Ethernet between the two,
training a GPT of 36 layers, hidden 4096 (7.5B parameters), seq 2048,
micro-batch 4, global batch 2048, TP 1, PP 2.  The paper's NIC speeds were
not recoverable; the defaults (IB 200, RoCE 100, Ethernet 25 Gbit/s per
node, 200 sustained TFLOPS per A100) are assumptions: change them with the
options.  The nodes are listed as a hostfile that alternates clusters would
list them (--order sorted lists IB first); naive takes them in that order.

    python examples/holmes_plan.py --help
"""

from __future__ import annotations

import argparse
import sys

from pccl import holmes


def build_nodes(args: argparse.Namespace) -> list[holmes.Node]:
    def node(kind: str, i: int, gbps: float) -> holmes.Node:
        octet = 0 if kind == "ib" else 1
        return holmes.Node(
            f"{kind}{i}",
            [holmes.NIC(kind, gbps, f"198.18.{octet}.{i + 1}:29500"),
             holmes.NIC("ethernet", args.eth_gbps, f"198.19.{octet}.{i + 1}:29500")],
            gpus=args.gpus_per_node, tflops=args.tflops,
        )

    ibs = [node("ib", i, args.ib_gbps) for i in range(args.ib_nodes)]
    roces = [node("roce", i, args.roce_gbps) for i in range(args.roce_nodes)]
    if args.order == "sorted":
        return ibs + roces
    out: list[holmes.Node] = []
    for i in range(max(len(ibs), len(roces))):
        out += ibs[i:i + 1] + roces[i:i + 1]
    return out


class _Console:
    """rich when it is installed (pccl[bench]), plain aligned text otherwise."""

    def __init__(self) -> None:
        try:
            from rich.console import Console
        except ImportError:
            self.rich = None
        else:
            self.rich = Console(width=None if sys.stdout.isatty() else 140)

    def print(self, text: str) -> None:
        if self.rich is None:
            print(text)
        else:
            self.rich.print(text, highlight=False)

    def table(self, title: str, headers: list[str], rows: list[list[str]]) -> None:
        if self.rich is not None:
            from rich.table import Table

            t = Table(title=title, title_justify="left")
            for i, h in enumerate(headers):
                t.add_column(h, justify="right" if i and h not in ("nodes", "DP network")
                             else "left")
            for row in rows:
                t.add_row(*row)
            self.rich.print(t)
            return
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
        print(title)
        left = {0} | {i for i, h in enumerate(headers) if h in ("nodes", "DP network")}
        for r in [headers, *rows]:
            cells = zip(r, widths, strict=True)
            print("  ".join(c.ljust(w) if i in left else c.rjust(w)
                            for i, (c, w) in enumerate(cells)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("cluster")
    g.add_argument("--ib-nodes", type=int, default=4, help="nodes on the InfiniBand cluster (4)")
    g.add_argument("--roce-nodes", type=int, default=4, help="nodes on the RoCE cluster (4)")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (8)")
    g.add_argument("--tflops", type=float, default=200.0,
                   help="sustained TFLOPS per GPU (200, about what the paper's pure-IB runs reach)")
    g.add_argument("--ib-gbps", type=float, default=200.0,
                   help="IB bandwidth per node, Gbit/s (200)")
    g.add_argument("--roce-gbps", type=float, default=100.0,
                   help="RoCE bandwidth per node, Gbit/s (100)")
    g.add_argument("--eth-gbps", type=float, default=25.0,
                   help="Ethernet bandwidth per node, Gbit/s (25); the only inter-cluster link")
    g.add_argument("--order", choices=("interleaved", "sorted"), default="interleaved",
                   help="node order given to the planner: clusters alternating, or IB first")
    g = p.add_argument_group("model and parallelism")
    g.add_argument("--layers", type=int, default=36, help="transformer layers (36)")
    g.add_argument("--hidden", type=int, default=4096, help="hidden size (4096)")
    g.add_argument("--seq", type=int, default=2048, help="sequence length (2048)")
    g.add_argument("--vocab", type=int, default=50304, help="vocabulary, padded GPT-2 BPE (50304)")
    g.add_argument("--micro-batch", type=int, default=4, help="micro-batch, samples (4)")
    g.add_argument("--global-batch", type=int, default=2048, help="global batch, samples (2048)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size (1)")
    g.add_argument("--pp", type=int, default=2, help="pipeline stages (2)")
    g.add_argument("--no-overlap", action="store_true",
                   help="expose the whole gradient sync (no overlapped distributed optimizer)")
    g.add_argument("--ablations", action="store_true",
                   help="also predict holmes without per-group NIC selection and naive with it")
    args = p.parse_args(argv)
    console = _Console()

    try:
        nodes = build_nodes(args)
        model = holmes.ModelSpec(args.layers, args.hidden, args.seq, args.vocab,
                                 args.micro_batch, args.global_batch)
        common = dict(tp=args.tp, pp=args.pp, overlap=not args.no_overlap)
        plans = {s: holmes.plan(nodes, model, strategy=s, **common) for s in holmes.STRATEGIES}
        extra = {}
        if args.ablations:
            extra["holmes, one network"] = holmes.plan(nodes, model, strategy="holmes",
                                                       nic_selection=False, **common)
            extra["naive, per-group NIC"] = holmes.plan(nodes, model, strategy="naive",
                                                        nic_selection=True, **common)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    console.print(
        f"{args.ib_nodes} IB ({args.ib_gbps:g} Gbit/s) + {args.roce_nodes} RoCE "
        f"({args.roce_gbps:g} Gbit/s) nodes × {args.gpus_per_node} GPUs at {args.tflops:g} "
        f"TFLOPS, Ethernet {args.eth_gbps:g} Gbit/s; model {model.params() / 1e9:.2f} B params "
        f"({args.layers} layers, hidden {args.hidden}), TP {args.tp} PP {args.pp} "
        f"DP {plans['holmes'].dp}, {plans['holmes'].micro_batches} micro-batches per iteration"
    )
    for name, plan in plans.items():
        rows = [[str(s.index), " ".join(s.nodes), str(s.layers), s.nic_kind,
                 f"{s.compute_s:.2f}", f"{s.dp_s:.2f}", f"{s.dp_exposed_s:.2f}",
                 f"{s.p2p_per_microbatch_s:.3f}"] for s in plan.stages]
        console.table(f"{name} plan", ["stage", "nodes", "layers", "DP network", "compute s",
                                       "DP sync s", "DP exposed s", "p2p s/µbatch"], rows)
        pipes = ", ".join(f"{'-'.join(g)} ({k})"
                          for g, k in zip(plan.pp_groups, plan.pp_group_kinds, strict=True))
        console.print(f"  pipeline groups: {pipes}")

    every = {**plans, **extra}
    rows = [[key, *(f"{pl.breakdown[key]:.3f}" for pl in every.values())]
            for key in holmes.BREAKDOWN_KEYS]
    rows.append(["iteration", *(f"{pl.predicted_iteration_s:.3f}" for pl in every.values())])
    rows.append(["TFLOPS/GPU", *(f"{pl.tflops_per_gpu:.1f}" for pl in every.values())])
    rows.append(["samples/s", *(f"{pl.samples_per_s:.1f}" for pl in every.values())])
    console.table("predicted iteration (seconds)", ["", *every], rows)
    speedup = plans["naive"].predicted_iteration_s / plans["holmes"].predicted_iteration_s
    console.print(f"holmes speed-up over naive (predicted): {speedup:.3f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
