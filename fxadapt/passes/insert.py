"""The insert stage: the one driver that applies every method's rule where ``plan.annotate`` put
its placements, then the graph-to-graph optimisations, in order (``OPTIMIZATIONS``: dead dropout
removal, LoRA A fusion; see ``passes.fuse``)."""

from __future__ import annotations

from torch.fx import Graph, GraphModule

from ..composition import KINDS, compose, repeat_batch_inputs
from ..methods import METHODS
from ..methods.base import Emitter
from ..plan import META_KEY
from .fuse import optimize

__all__ = ["insert_adapters", "OPTIMIZATIONS"]

#: Graph-to-graph optimisations run, in order, after the adapters are inserted: f(gm, graph) -> None.
OPTIMIZATIONS = [optimize]


def insert_adapters(gm: GraphModule, graph: Graph, setup=None, replicated: bool = False) -> None:
    """Apply every placement annotated in ``graph`` (by ``plan.annotate``), in annotation order; with a
    composition block ``setup`` (:mod:`fxadapt.composition`), the composing methods' placements at each
    node are composed as the block says (a Parallel first repeats the graph's batch inputs, unless the
    caller gives them ``replicated`` already)."""
    if setup is not None and setup.parallel_channels > 1 and not replicated:
        spec = getattr(gm, "_fx_inputs", None)
        repeat_batch_inputs(graph, setup.parallel_channels, spec.main if spec is not None else None)
    by_name = {n.name: n for n in graph.nodes}
    cache: dict = {}
    for node in list(graph.nodes):
        placements = node.meta.pop(META_KEY, None)
        if not placements:
            continue
        emitter = Emitter(graph, node, by_name, cache)
        composed = [p for p in placements if p.method in KINDS] if setup is not None else []
        for p in placements:
            if p not in composed:
                METHODS[p.method].insert(emitter, p, gm.get_submodule(p.module) if p.module else None)
        # One composition per place: a fused projection's roles (q, k, v) each compose their own adapters.
        groups: dict = {}
        for p in composed:
            groups.setdefault(p.site.name if p.site is not None else None, []).append(p)
        for group in groups.values():
            compose(emitter, setup, group, gm)
        emitter.finish()
