"""The insert stage: the one driver that applies every method's rule where ``plan.annotate`` put
its placements, then the graph-to-graph optimisations, in order (``OPTIMIZATIONS``: dead dropout
removal, LoRA A fusion; see ``passes.fuse``)."""

from __future__ import annotations

from torch.fx import Graph, GraphModule

from ..methods import METHODS
from ..methods.base import Emitter
from ..plan import META_KEY
from .fuse import optimize

__all__ = ["insert_adapters", "OPTIMIZATIONS"]

#: Graph-to-graph optimisations run, in order, after the adapters are inserted: f(gm, graph) -> None.
OPTIMIZATIONS = [optimize]


def insert_adapters(gm: GraphModule, graph: Graph) -> None:
    """Apply every placement annotated in ``graph`` (by ``plan.annotate``), in annotation order."""
    by_name = {n.name: n for n in graph.nodes}
    cache: dict = {}
    for node in list(graph.nodes):
        placements = node.meta.pop(META_KEY, None)
        if not placements:
            continue
        emitter = Emitter(graph, node, by_name, cache)
        for p in placements:
            METHODS[p.method].insert(emitter, p, gm.get_submodule(p.module) if p.module else None)
        emitter.finish()
