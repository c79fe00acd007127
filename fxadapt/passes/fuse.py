"""Graph optimisations that need the whole graph, which a module-swapping library cannot do.

- :func:`fuse_lora_a`: the LoRA ``A`` projections that read the same input (q, k, v; gate and up)
  become one matmul with the ``A`` matrices concatenated, split after. Off by default: on CPU at
  roberta-base shape it does not make the training step faster (README, "Benchmarks": row f);
  turn it on per module with ``set_options(gm, fuse_lora_a=True)``.
- :func:`remove_dead_dropout`: a dropout that cannot drop (``p == 0``, or ``train=False``) is removed.
- :func:`specialize_eval`: dropout rates fixed at eval mode (0), so the graph has no dropout at all
  (what :func:`fxadapt.export` writes).
- :func:`adapter_nodes` / :func:`check_merged`: a merged graph holds no adapter node and is the
  base graph, node for node.
- :func:`hoist_attribute_paths`: the code an AdaptedModule runs looks each submodule up once per
  call rather than once per weight (``self.encoder.layer[0].attention.self.query`` once for its
  weight, bias and LoRA matrices), and calls the most frequent ATen ops through torch's own
  bindings (``torch.add`` for ``aten.add.Tensor``). Attribute lookups and the boxed ATen calls were
  a large part of what an eager call costs beyond its kernels, and on a GPU, or in a decode step,
  that per-call cost is most of a call.

:func:`optimize` runs the enabled passes; it is listed in ``fxadapt.passes.insert.OPTIMIZATIONS``, so
every rebuild of an :class:`~fxadapt.AdaptedModule` applies it after the adapters are inserted.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, fields, replace

import torch
from torch.fx import Graph, GraphModule, Node

from ..errors import ConfigError, MergeError
from ..ops import DROPOUT, copy_graph, op_name
from .dropout import RATE_MODULE

aten = torch.ops.aten

__all__ = ["FuseOptions", "set_options", "get_options", "optimize", "fuse_lora_a", "remove_dead_dropout",
           "specialize_eval", "adapter_nodes", "check_merged", "hoist_attribute_paths"]


@dataclass(frozen=True)
class FuseOptions:
    """Which optimisations :func:`optimize` applies to a module's graph."""

    fuse_lora_a: bool = False  # measured: no faster on CPU at roberta-base, so off by default
    remove_dead_dropout: bool = True


_OPTIONS_ATTR = "_fx_fuse_options"


def get_options(gm: GraphModule) -> FuseOptions:
    """The optimisation options of ``gm`` (the defaults unless :func:`set_options` changed them)."""
    return getattr(gm, _OPTIONS_ATTR, FuseOptions())


def set_options(gm: GraphModule, **changes: bool) -> FuseOptions:
    """Turn optimisations on or off for one AdaptedModule and rebuild its graph.

    >>> import fxadapt, torch
    >>> gm = fxadapt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
    >>> set_options(gm, fuse_lora_a=True).fuse_lora_a
    True
    """
    known = {f.name for f in fields(FuseOptions)}
    for name, value in changes.items():
        if name not in known:
            raise ConfigError(f"unknown optimisation {name!r}; known: {sorted(known)}", field=name, value=value)
        if not isinstance(value, bool):
            raise ConfigError(f"optimisation {name} must be True or False, got {value!r}", field=name, value=value)
    options = replace(get_options(gm), **changes)
    setattr(gm, _OPTIONS_ATTR, options)
    if hasattr(gm, "_rebuild"):
        gm._rebuild()
    return options


def optimize(gm: GraphModule, graph: Graph) -> None:
    """The pass registered in ``OPTIMIZATIONS``: every optimisation ``gm``'s options enable."""
    options = get_options(gm)
    if options.remove_dead_dropout:
        remove_dead_dropout(graph)
    if options.fuse_lora_a:
        fuse_lora_a(gm, graph)


# -- dropout ----------------------------------------------------------------------------------


def _is_zero(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) == 0.0


def remove_dead_dropout(graph: Graph) -> int:
    """Remove the dropouts whose rate is the constant 0 or whose ``train`` flag is False (the
    identity either way). Returns how many were removed."""
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or op_name(node) not in DROPOUT:
            continue
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", node.kwargs.get("training", True))
        if _is_zero(p) or train is False:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    return removed


def specialize_eval(graph: Graph) -> None:
    """Fix every mode-dependent dropout rate at its eval value (0) and remove the dropouts, so the
    graph computes what the module computes in ``.eval()`` with no dropout node left."""
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == RATE_MODULE:
            node.replace_all_uses_with(0.0)
            graph.erase_node(node)
    remove_dead_dropout(graph)


# -- LoRA A fusion ----------------------------------------------------------------------------


def _lora_a_input(node: Node) -> Node | None:
    """``x`` when ``node`` is ``linear(x, <...>.lora_A)`` with no bias, else None."""
    if node.op != "call_function" or node.target is not aten.linear.default or len(node.args) != 2 or node.kwargs:
        return None
    x, a = node.args
    if isinstance(a, Node) and a.op == "get_attr" and str(a.target).endswith(".lora_A") and isinstance(x, Node):
        return x
    return None


def fuse_lora_a(gm: GraphModule, graph: Graph) -> int:
    """Fuse the LoRA ``A`` projections that read the same node into one: ``linear(x, cat(A_1..A_n))``
    split into each adapter's ``r_i`` columns. Each ``A_i`` keeps its own gradient (through ``cat``).
    Returns how many projections were fused away."""
    groups: dict[Node, list[Node]] = {}
    for node in graph.nodes:
        x = _lora_a_input(node)
        if x is not None:
            groups.setdefault(x, []).append(node)
    fused = 0
    for x, linears in groups.items():
        params = [gm.get_parameter(n.args[1].target) for n in linears]
        if len(linears) < 2 or len({(p.dtype, p.device) for p in params}) > 1:
            continue
        first = linears[0]
        meta = {k: first.meta[k] for k in ("nn_module_stack", "stack_trace") if k in first.meta}
        with graph.inserting_before(first):
            weights = [graph.get_attr(n.args[1].target) for n in linears]
            cat = graph.call_function(aten.cat.default, (weights, 0))
            h = graph.call_function(aten.linear.default, (x, cat))
            parts = graph.call_function(aten.split_with_sizes.default, (h, [p.shape[0] for p in params], -1))
            outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(linears))]
        for new in (*weights, cat, h, parts, *outs):
            new.meta.update(meta)
        for old, new in zip(linears, outs):
            old.replace_all_uses_with(new)
            a = old.args[1]
            graph.erase_node(old)
            if not a.users:
                graph.erase_node(a)
        fused += len(linears) - 1
    return fused


# -- code generation --------------------------------------------------------------------------


def hoist_attribute_paths(graph: Graph) -> tuple[Graph, dict[Node, Node]]:
    """A copy of ``graph`` to generate code from, in which ``get_attr("a.b.c.weight")`` becomes
    ``getattr(<a.b.c>, "weight")`` with each submodule ``a``, ``a.b``, ``a.b.c`` looked up once, where
    it is first needed; and, for each node of the copy made from a node of ``graph``, that node.

    It computes the same: every lookup still happens on each call, through ``getattr``, so replaced
    or reparametrised weights are read as before. ``graph`` is unchanged (passes keep reading
    ``get_attr`` nodes)."""
    new = Graph(tracer_cls=graph._tracer_cls)
    new._codegen = graph._codegen
    modules: dict[str, Node] = {}

    def module(path: str) -> Node:
        if path not in modules:
            parent, _, leaf = path.rpartition(".")
            modules[path] = (new.create_node("call_function", getattr, (module(parent), leaf), name=path.replace(".", "_"))
                             if parent else new.get_attr(path))
        return modules[path]

    env: dict[Node, Node] = {}
    for node in graph.nodes:
        if node.op == "get_attr" and "." in node.target:
            parent, _, leaf = node.target.rpartition(".")
            env[node] = new.create_node("call_function", getattr, (module(parent), leaf), name=node.name)
        else:
            env[node] = new.node_copy(node, env.__getitem__)
            if node.op == "call_function" and node.target in _BINDINGS:
                env[node].target = _BINDINGS[node.target]
        env[node].meta = node.meta
    return new, {copy: node for node, copy in env.items()}


#: The ATen ops most frequent in captured graphs -> torch's own Python bindings of the same native
#: function, which take the same arguments (generated from the same schema) and dispatch with less
#: Python around each call: ``torch.ops.aten.add.Tensor(x, y)`` costs about 3 us more than
#: ``torch.add(x, y)`` on small tensors, which at a decode step's sizes is several percent of a call.
#: Only overloads whose binding resolves to the same overload for every argument a graph passes are listed.
_BINDINGS = {
    aten.linear.default: torch._C._nn.linear, aten.silu.default: torch._C._nn.silu,
    aten.add.Tensor: torch.add, aten.sub.Tensor: torch.sub, aten.mul.Tensor: torch.mul, aten.neg.default: torch.neg,
    aten.pow.Tensor_Scalar: torch.pow, aten.rsqrt.default: torch.rsqrt, aten.mean.dim: torch.mean,
    aten.cos.default: torch.cos, aten.sin.default: torch.sin, aten.cat.default: torch.cat,
    aten.unsqueeze.default: torch.unsqueeze, aten.transpose.int: torch.transpose, aten.reshape.default: torch.reshape,
    aten.view.default: torch.Tensor.view, aten.to.dtype: torch.Tensor.to,
}


# -- merged graphs ----------------------------------------------------------------------------


def _signature(graph: Graph) -> list[tuple]:
    return [(n.op, str(n.target)) for n in graph.nodes]


def _base_graph(gm: GraphModule) -> Graph:
    """``gm``'s base graph as its rebuild would make it with no adapter: optimised the same way."""
    graph = copy_graph(gm._fx_base)
    optimize(gm, graph)
    return graph


def adapter_nodes(gm: GraphModule) -> list[Node]:
    """The nodes of ``gm``'s graph that are not in its base graph, or that read adapter weights."""
    adapters = getattr(gm, "_fx_adapters", {}).values()
    modules = [m for a in adapters for m in getattr(a, "modules", [p.module for p in a.placements])]
    adapter_paths = tuple(m + "." for m in modules if m)
    base = {n.name for n in gm._fx_base.nodes} if hasattr(gm, "_fx_base") else None
    return [
        n for n in gm.graph.nodes
        if (base is not None and n.name not in base)
        or (n.op in ("get_attr", "call_module") and (str(n.target) + ".").startswith(adapter_paths) and adapter_paths)
    ]


def check_merged(gm: GraphModule, base: GraphModule | None = None) -> None:
    """Raise :class:`~fxadapt.MergeError` unless ``gm``'s graph holds no adapter node and is, node
    for node (op and target), its base graph, and ``base``'s graph when one is given (e.g. a fresh
    ``fxadapt.capture`` of the base model).

    >>> import fxadapt, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(targets=["0"], selfattn_lora=False), example_inputs=torch.randn(2, 4))
    >>> gm.merge_adapter("lora"); check_merged(gm)
    """
    extra = adapter_nodes(gm)
    if extra:
        names = ", ".join(f"{n.name} ({n.target})" for n in extra[:5])
        raise MergeError(f"the graph holds {len(extra)} adapter node(s): {names}{', ...' if len(extra) > 5 else ''}")
    for what, reference in (("its base graph", _base_graph(gm) if hasattr(gm, "_fx_base") else None),
                            ("the given base graph", None if base is None else base.graph)):
        if reference is not None and _signature(gm.graph) != _signature(reference):
            mine, theirs = _signature(gm.graph), _signature(reference)
            where = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            raise MergeError(
                f"the merged graph is not {what}: {len(mine)} nodes against {len(theirs)}, first difference "
                f"at node {where}: {mine[where] if where < len(mine) else None} against {theirs[where] if where < len(theirs) else None}"
            )


