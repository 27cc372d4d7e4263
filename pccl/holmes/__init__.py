"""Holmes placement over heterogeneous NICs (arXiv 2312.03549).

Plan a pipeline- and data-parallel training job over nodes whose fast
networks cannot talk to each other (an InfiniBand cluster, a RoCE cluster,
only Ethernet between them): every pipeline stage inside one NIC block so
each data-parallel group reduces on its own fast network, a layer split that
balances the stages, the network (address) each group uses, and a predicted
iteration time.  Pure Python; docs/holmes.md explains the rules and the
cost model.

    from pccl import holmes
    nodes = [holmes.Node("ib0", [holmes.NIC("ib", 200), holmes.NIC("ethernet", 25)], gpus=8),
             ...]
    model = holmes.ModelSpec(layers=36, hidden=4096, seq=2048, vocab=50304,
                             micro_batch=4, global_batch=2048)
    p = holmes.plan(nodes, model, tp=1, pp=2)
    p.stages, p.dp_groups, p.predicted_iteration_s, p.breakdown
    p.peer_group_for("ib0"), p.address_for("ib0", "dp")
"""

from .cost import BREAKDOWN_KEYS, Layout, select_network
from .model import KINDS, NIC, ModelSpec, Node
from .planner import STRATEGIES, Plan, Stage, best_partition, plan

__all__ = [
    "BREAKDOWN_KEYS",
    "KINDS",
    "NIC",
    "STRATEGIES",
    "Layout",
    "ModelSpec",
    "Node",
    "Plan",
    "Stage",
    "best_partition",
    "plan",
    "select_network",
]
