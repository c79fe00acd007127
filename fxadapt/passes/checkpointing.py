"""Activation checkpointing on graph regions: one region per transformer layer.

Each layer's nodes are outlined into a body graph, and the outer graph calls it through one
:class:`CheckpointedRegions` submodule, which runs it under :func:`torch.utils.checkpoint.checkpoint`
(``use_reentrant=False``, ``preserve_rng_state=True``: the backward pass recomputes the layer with
the same dropout masks). In eval mode or under ``torch.no_grad()`` the body runs directly.

A layer's region is found from the graph, not from module names. Site analysis numbers the layers
(:class:`~fxadapt.sites.Anatomy`); the module path a layer's nodes share is the longest common prefix
of the ``nn_module_stack`` paths of its projections, residual adds and attentions
(``model.layers.3``). The region is the span of nodes, in graph order, from the first to the last
node recorded under that path, so adapter nodes inserted inside the layer (LoRA, bottleneck adapters)
are checkpointed with it. Attribute reads (weights) stay in the outer graph and are passed in, as are
non-tensor values the layer reads (dropout rates, sizes). A layer whose path it cannot tell apart from
another's (a weight-shared layer called repeatedly), whose span overlaps another's, or whose values
leaving the region are not all tensors is left as it is.

The body modules are not registered submodules (so they add nothing to ``state_dict`` or
``parameters()``): each rebuild of the graph makes a new :class:`CheckpointedRegions`, registered at
:data:`CHECKPOINT_MODULE`. ``torch.compile`` traces ``torch.utils.checkpoint.checkpoint`` as one
higher-order op per region, without graph breaks.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .dropout import RATE_MODULE

__all__ = ["CHECKPOINT_MODULE", "CheckpointedRegions", "Settings", "settings", "layer_regions", "checkpoint_layers", "apply"]

#: Attribute name of the CheckpointedRegions module on a graph with checkpointed layers.
CHECKPOINT_MODULE = "fxadapt_checkpoint"
#: Where an AdaptedModule keeps its :class:`Settings` (in its ``__dict__``; absent when off).
ENABLED_ATTR = "_fx_checkpointing"
#: The keyword arguments of torch.utils.checkpoint.checkpoint that activation_checkpointing_kwargs may set.
CHECKPOINT_KWARGS = frozenset({"use_reentrant", "preserve_rng_state", "context_fn", "determinism_check", "debug"})


@dataclass(frozen=True)
class Settings:
    """What ``activation_checkpointing_enable`` asked for (transformers' arguments)."""

    kwargs: dict = field(default_factory=dict)  # for torch.utils.checkpoint.checkpoint, over our defaults
    every_n_layers: int = 1  # checkpoint layers 0, n, 2n, ... (in graph order); the others keep their activations
    offload: bool = False  # what checkpoint saves (each layer's inputs) held in host memory


def settings(kwargs, every_n_layers, offload, name: str = "activation_checkpointing_kwargs") -> Settings:
    """Checked :class:`Settings`; ConfigError naming the argument (``name`` for ``kwargs``), or the
    checkpoint keyword, that is wrong."""
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ConfigError(f"{name} must be a dict or None, got {type(kwargs).__name__}", field=name, value=kwargs)
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - CHECKPOINT_KWARGS)
    if unknown:
        raise ConfigError(f"{name}: torch.utils.checkpoint.checkpoint takes no {unknown[0]!r} "
                          f"(it takes {sorted(CHECKPOINT_KWARGS)})", field=unknown[0], value=kwargs[unknown[0]])
    if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
        raise ConfigError(f"every_n_layers must be a whole number >= 1, got {every_n_layers!r}", field="every_n_layers", value=every_n_layers)
    if not isinstance(offload, bool):
        raise ConfigError(f"offload must be True or False, got {offload!r}", field="offload", value=offload)
    return Settings(kwargs, every_n_layers, offload)


class CheckpointedRegions(nn.Module):
    """Runs region ``index``'s body under activation checkpointing in training mode with gradients
    enabled, and directly otherwise (no recomputation where nothing is saved for a backward). With
    ``offload``, what checkpoint saves of a layer on an accelerator is held in pinned host memory
    (``torch.autograd.graph.save_on_cpu``; eager only: torch.compile does not trace it)."""

    def __init__(self, bodies: list[GraphModule], kwargs: dict | None = None, offload: bool = False):
        super().__init__()
        # A plain list: the bodies read the owner's modules and must not be registered a second time.
        self.bodies = list(bodies)
        self.kwargs = {"use_reentrant": False, "preserve_rng_state": True, **(kwargs or {})}
        self.offload = offload

    def forward(self, index: int, *args):
        body = self.bodies[index]
        if not (self.training and torch.is_grad_enabled()):
            return body(*args)
        devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        if self.offload and devices - {"cpu"}:
            with torch.autograd.graph.save_on_cpu(pin_memory=True, device_type=(devices - {"cpu"}).pop()):
                return checkpoint(body, *args, **self.kwargs)
        return checkpoint(body, *args, **self.kwargs)


def _paths(node: Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [value[0] for value in stack.values() if isinstance(value, tuple) and value and isinstance(value[0], str)]


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    prefix = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return ".".join(prefix)


def _within(path: str, scope: str) -> bool:
    return path == scope or path.startswith(scope + ".")


def _layer_scopes(gm: GraphModule, graph: Graph) -> dict[int, str]:
    """Layer number -> the module path all of the layer's anchor nodes (projections, residual adds,
    attentions) were recorded under; layers without one, or sharing it with another layer, left out."""
    anatomy = gm._fx_anatomy
    by_name = {n.name: n for n in graph.nodes}
    anchors: dict[int, list[str]] = {}
    for site in anatomy.sites:
        if site.layer is not None:
            anchors.setdefault(site.layer, []).extend(site.linear.nodes)
    for block in anatomy.blocks:
        anchors.setdefault(block.layer, []).append(block.add)
    for attention in anatomy.attentions:
        anchors.setdefault(attention.layer, []).append(attention.node)
    scopes = {}
    for layer, names in anchors.items():
        paths = [max(_paths(by_name[n]), key=len) for n in names if n in by_name and _paths(by_name[n])]
        if len(paths) == len(names):  # every anchor recorded where it came from
            scopes[layer] = _common_prefix(paths)
    # A scope that is empty, or equal to or inside another layer's, cannot separate the layers.
    return {layer: s for layer, s in scopes.items()
            if s and not any(o != layer and (_within(s, t) or _within(t, s)) for o, t in scopes.items())}


def _is_tensor_valued(node: Node) -> bool:
    """Whether the node's value is a tensor: from its recorded value, else (inserted nodes) anything
    but a dropout rate."""
    if node.op == "call_module" and node.target == RATE_MODULE:
        return False
    val = node.meta.get("val")
    return val is None or isinstance(val, torch.Tensor)


def layer_regions(gm: GraphModule, graph: Graph) -> dict[int, list[Node]]:
    """Layer number -> the nodes of ``graph`` to checkpoint as that layer, in graph order (see the
    module docstring for the rule)."""
    scopes = _layer_scopes(gm, graph)
    nodes = list(graph.nodes)
    spans = {}
    for layer, scope in scopes.items():
        inside = [i for i, n in enumerate(nodes) if any(_within(p, scope) for p in _paths(n))]
        spans[layer] = (inside[0], inside[-1])
    regions = {}
    for layer, (start, end) in sorted(spans.items()):
        if any(o != layer and s <= end and start <= e for o, (s, e) in spans.items()):
            continue  # overlapping spans: the layers interleave
        region: list[Node] = []
        members: set[Node] = set()
        for node in nodes[start:end + 1]:
            if node.op in ("placeholder", "get_attr", "output"):
                continue  # weights and inputs are passed in
            reads_region = any(a in members for a in node.all_input_nodes)
            if not reads_region and not _is_tensor_valued(node):
                continue  # sizes and rates computed from outside: left outside, passed in
            region.append(node)
            members.add(node)
        leaving = [n for n in region if any(u not in members for u in n.users)]
        if region and leaving and all(_is_tensor_valued(n) for n in leaving):
            regions[layer] = region
    return regions


def _outline(graph: Graph, region: list[Node]) -> tuple[Graph, list[Node], list[Node]]:
    """A graph computing ``region`` from its inputs (the nodes outside it that it reads), returning
    the values read after it; and those inputs and outputs, in order."""
    members = set(region)
    inputs: list[Node] = []
    for node in region:
        for a in node.all_input_nodes:
            if a not in members and a not in inputs:
                inputs.append(a)
    outputs = [n for n in region if any(u not in members for u in n.users)]
    body = Graph()
    env = {a: body.placeholder(a.name) for a in inputs}
    for a in inputs:
        env[a].meta = {k: v for k, v in a.meta.items() if k == "val"}
    for node in region:
        env[node] = body.node_copy(node, lambda a: env[a])
    body.output(tuple(env[n] for n in outputs))
    return body, inputs, outputs


def checkpoint_layers(gm: GraphModule, graph: Graph, options: Settings = Settings()) -> int:
    """Outline every layer's region of ``graph`` (``gm``'s graph being rebuilt; every
    ``options.every_n_layers``-th) into a body called through a new :class:`CheckpointedRegions` on
    ``gm``; returns how many layers were outlined."""
    bodies = []
    for i, (layer, region) in enumerate(layer_regions(gm, graph).items()):
        if i % options.every_n_layers:
            continue
        sub, inputs, outputs = _outline(graph, region)
        body = GraphModule(gm, sub, f"Layer{layer}")  # reads the same submodules (adapters) as gm
        members = set(region)
        with graph.inserting_after(region[-1]):
            call = graph.call_module(CHECKPOINT_MODULE, (len(bodies), *inputs))
        last = call
        for i, node in enumerate(outputs):
            with graph.inserting_after(last):
                last = graph.call_function(operator.getitem, (call, i))
            last.meta.update(node.meta)
            node.replace_all_uses_with(last, delete_user_cb=lambda user: user not in members and user is not call)
        for node in reversed(region):
            graph.erase_node(node)
        bodies.append(body)
    gm.add_module(CHECKPOINT_MODULE, CheckpointedRegions(bodies, options.kwargs, options.offload).train(gm.training))
    return len(bodies)


def apply(gm: GraphModule, graph: Graph) -> None:
    """The rebuild hook: checkpoint ``graph``'s layers when ``gm`` has checkpointing enabled (its
    ``_fx_checkpointing`` holds the :class:`Settings`), else drop any regions module."""
    options = gm.__dict__.get(ENABLED_ATTR)
    if options is not None:
        checkpoint_layers(gm, graph, options)
    elif CHECKPOINT_MODULE in gm._modules:
        delattr(gm, CHECKPOINT_MODULE)
