"""Per-sample routing: one adapter per batch row, as PEFT's ``adapter_names``.

``gm(**inputs, adapter_names=["a", "b", "__base__", "a"])`` runs each row of the batch through the
adapter named for it (``"__base__"``: the base model), for LoRA, (IA)^3 and bottleneck adapters.

Routing is data, not code: a second graph, built once per set of adapters (cached on the module),
holds every routable adapter of the module at once and reads one more input, the per-row index
(0 for the base, ``i`` for the i-th routable adapter in the order they were added;
:func:`adapter_indices`). At a projection the adapters' LoRA factors are stacked (zeros for the
base and for adapters that have no LoRA there, ranks padded with zeros), each row's are gathered by
its index and applied with a batched matmul; (IA)^3 vectors are gathered the same way. A bottleneck
adapter's weights are gathered per row too; adapters whose blocks are wired differently (Pfeiffer's
and Houlsby's) run as separate groups, each row taking its own group's output. Changing the routing
changes only the index tensor: under ``torch.compile`` pass it as a tensor (``gm.adapter_indices(names)``)
and nothing recompiles, since names are Python constants that dynamo specialises on.

Rows run their adapter alone: the active adapters do not act in a routed call, and merged adapters
must be reset first (as in PEFT). ``gm.generate(..., adapter_names=...)`` routes the decode steps the
same way: :func:`build_graph` on each step graph, with the adapters' placements there
(:mod:`fxadapt.generation`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.fx import Graph
from torch.fx.graph import CodeGen
from torch.fx.graph_module import _forward_from_src
from torch.utils import _pytree as pytree

from .errors import InputError
from .methods.base import Emitter
from .methods.bottleneck import insert_bottleneck
from .ops import copy_graph
from .passes.fuse import hoist_attribute_paths
from .passes.insert import OPTIMIZATIONS

if TYPE_CHECKING:
    from .module import AdaptedModule

__all__ = ["BASE", "routable", "adapter_indices", "routed_call"]

#: The name that routes a row to the base model (PEFT's).
BASE = "__base__"


# -- what can be routed --------------------------------------------------------------------------


def _unroutable(adapter) -> str | None:
    """Why an adapter cannot be routed per row, or None when it can."""
    for p in adapter.placements:
        config = p.config or adapter.config
        if p.method not in ("lora", "ia3", "bottleneck"):
            return f"it has {p.method} weights, and only LoRA, (IA)^3 and bottleneck adapters are routed per row"
        if getattr(config, "use_gating", False):
            return "it is gated (use_gating)"
        if p.method == "bottleneck" and config.phm_layer:
            return "it is a Compacter (phm_layer)"
        if p.site is not None and (p.site.linear.conv or p.site.linear.experts):
            return f"it adapts {p.site.path}, a {'convolution' if p.site.linear.conv else 'mixture of experts'}"
    return None


def routable(gm: AdaptedModule) -> list[str]:
    """The adapters a routed call can name, in the order they were added (index ``i + 1``)."""
    return [name for name, a in gm._fx_adapters.items() if _unroutable(a) is None]


def adapter_indices(gm: AdaptedModule, names, batch: int | None = None) -> torch.Tensor:
    """The index tensor of ``adapter_names`` (0 for ``"__base__"``), on the module's device:
    pass it as ``adapter_names`` to route without recompiling under ``torch.compile``. It stays
    valid while no adapter is deleted. InputError for an unknown or unroutable adapter, or a length
    other than ``batch`` (when given)."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InputError(f"adapter_names must be a list of adapter names, one per batch row, or their index tensor "
                         f"(gm.adapter_indices(names)); got {type(names).__name__}")
    order = {name: i for i, name in enumerate(routable(gm), 1)}
    for name in dict.fromkeys(names):
        if name == BASE or name in order:
            continue
        if name not in gm._fx_adapters:
            known = ", ".join(gm._fx_adapters) or "none"
            raise InputError(f"adapter_names names {name!r}, which is no adapter of {gm._fx_model_name} (adapters: {known}; "
                             f"{BASE!r} for the base model)")
        raise InputError(f"adapter_names names {name!r}, which cannot be routed per row: {_unroutable(gm._fx_adapters[name])}")
    if batch is not None and len(names) != batch:
        raise InputError(f"adapter_names has {len(names)} names for a batch of {batch} rows: give one name per row")
    if not torch.compiler.is_compiling():
        _routed_forward(gm)  # built here, outside any compilation, for the compiled calls to come
    device = next((t.device for t in gm.parameters()), None)
    return torch.tensor([order.get(n, 0) for n in names], dtype=torch.long, device=device)


# -- the call ------------------------------------------------------------------------------------


def routed_call(gm: AdaptedModule, args: tuple, kwargs: dict):
    """``gm(*args, **kwargs)`` with ``kwargs["adapter_names"]`` routing each row (see the module doc)."""
    kwargs = dict(kwargs)
    names = kwargs.pop("adapter_names")
    if kwargs.pop("output_adapter_gating_scores", False):
        raise InputError("output_adapter_gating_scores=True cannot be combined with adapter_names: routed adapters have no gates")
    if gm._fx_merged:
        raise InputError(f"adapter_names cannot be used while adapters {gm._fx_merged} are merged into the weights: "
                         "reset_adapter() them first")
    spec = gm._fx_inputs
    if spec is None:
        values = list(args)
    elif not args and len(kwargs) == len(spec.names) and all(n in kwargs for n in spec.names) and torch.compiler.is_compiling():
        values = [kwargs[n] for n in spec.names]  # as _prepare_call: binding is for eager calls
    else:
        bound = spec.bind(gm._fx_model_name, args, kwargs)
        values = [bound[n] for n in spec.names]
    batch = next((v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.ndim), None)
    index = _index(gm, names, batch)
    fn = _routed_forward(gm)
    flat = fn(gm, *values, index)
    out_spec = getattr(gm, "_out_spec", None)
    return pytree.tree_unflatten(list(flat), out_spec) if out_spec is not None else flat


def _index(gm: AdaptedModule, names, batch: int | None) -> torch.Tensor:
    if not isinstance(names, torch.Tensor):
        return adapter_indices(gm, names, batch)
    if names.dtype not in (torch.int64, torch.int32) or names.ndim != 1:
        raise InputError(f"adapter_names as a tensor must be 1-D int64 indices (gm.adapter_indices(names)), got {names.dtype} "
                         f"of shape {tuple(names.shape)}")
    if batch is not None and names.shape[0] != batch:
        raise InputError(f"adapter_names has {names.shape[0]} indices for a batch of {batch} rows: give one per row")
    if not torch.compiler.is_compiling() and names.numel():
        count = len(routable(gm))
        low, high = int(names.min()), int(names.max())
        if low < 0 or high > count:
            raise InputError(f"adapter_names holds index {low if low < 0 else high}; {gm._fx_model_name} routes indices 0 "
                             f"({BASE}) to {count}: use gm.adapter_indices(names)")
    return names


def _routed_forward(gm: AdaptedModule):
    """The routed graph's code, built on first use and kept until the routable adapters or the
    module's device change."""
    names = routable(gm)
    key = routing_key(gm)
    cached = gm.__dict__.get("_fx_routed")
    if cached is not None and cached[0] == key:
        return cached[1]
    if torch.compiler.is_compiling():  # building a graph cannot be traced
        raise InputError("a compiled routed call needs the routed graph built first: call gm.adapter_indices(names) "
                         "(or make one routed call) outside torch.compile after adding or deleting adapters")
    graph = build_graph(gm, names)
    code = hoist_attribute_paths(graph)[0].python_code(root_module="self")
    fn = _forward_from_src(code.src, code.globals)
    gm.__dict__["_fx_routed"] = (key, fn)
    return fn


def routing_key(gm: AdaptedModule) -> tuple:
    """What a routed graph depends on: the routable adapters (by identity) and the module's device."""
    device = next((t.device for t in gm.parameters()), None)
    return tuple((n, id(gm._fx_adapters[n])) for n in routable(gm)), device


def build_graph(gm: AdaptedModule, names: list[str], base: Graph | None = None, placements: dict | None = None) -> Graph:
    """The base graph with every adapter of ``names`` inserted per row, reading one more input,
    ``adapter_index``; plain inputs and a flat output (the caller binds and unflattens).

    ``base`` and ``placements`` (adapter name -> its placements on ``base``'s nodes) build the routed
    form of another graph of the same model, e.g. a decode step (:mod:`fxadapt.generation`); by
    default the module's forward graph and each adapter's own placements."""
    from .module import _single_device, retarget_devices

    graph = copy_graph(gm._fx_base if base is None else base)
    graph._codegen = CodeGen()
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        index = graph.placeholder("adapter_index")
    at: dict[str, list] = {}
    for slot, name in enumerate(names, 1):
        for p in gm._fx_adapters[name].placements if placements is None else placements[name]:
            for anchor in p.anchors:
                at.setdefault(anchor, []).append((slot, p))
    by_name = {n.name: n for n in graph.nodes}
    count = len(names)
    for node in list(graph.nodes):
        entries = at.get(node.name)
        if not entries:
            continue
        e = _RoutedEmitter(graph, node, by_name, gm, index, count)
        for method in ("ia3", "lora", "bottleneck"):
            mine = [(s, p) for s, p in entries if p.method == method]
            if mine:
                getattr(e, method)(mine)
        e.finish()
    for optimize in OPTIMIZATIONS:
        optimize(gm, graph)
    device = _single_device(gm)
    if None not in (device, gm._fx_capture_device) and device != gm._fx_capture_device:
        retarget_devices(graph, gm._fx_capture_device, device)
    graph.lint()
    return graph


def _groups(entries, key):
    groups: dict = {}
    for slot, p in entries:
        groups.setdefault(key(p), []).append((slot, p))
    return list(groups.values())


def _table(count: int, slots: list[int], base: int = 0) -> list[int]:
    """Global index -> position in a stack: ``slots[i]`` -> ``i + 1``, every other index -> ``base``."""
    table = [base] * (count + 1)
    for i, slot in enumerate(slots, 1):
        table[slot] = i
    return table


class _RoutedEmitter(Emitter):
    """An Emitter that writes the per-row form of each method's nodes at one anchor."""

    def __init__(self, graph, node, by_name, gm, index, count):
        super().__init__(graph, node, by_name)
        self.gm, self.index, self.count = gm, index, count
        self._body = None

    def lora(self, entries) -> None:
        for group in _groups(entries, lambda p: (p.site.path, p.site.role)):
            site = group[0][1].site
            weights = [self.attr(p.module) for _, p in group]
            table = _table(self.count, [s for s, _ in group])
            dropout = any(self.gm.get_submodule(p.module).dropout > 0 for _, p in group)
            rate = self.rate(1.0) if dropout else 0.0
            delta = self.call(lora_rows, self.x, self.index, table, rate, *weights)
            self.add_to_columns(delta, site, f"{group[0][1].module}.columns")

    def ia3(self, entries) -> None:
        for group in _groups(entries, lambda p: (p.site.path, p.site.role, p.side)):
            p0 = group[0][1]
            table = _table(self.count, [s for s, _ in group])
            cols = None if p0.site.columns is None else list(p0.site.columns)
            if p0.side == "input":
                x = self.node.args[self.x_index]
                weights = [self._new("get_attr", p.module, (), before=True) for _, p in group]
                scaled = self.pre(ia3_rows, x, self.index, table, None, *weights)
                self.node.args = (*self.node.args[:self.x_index], scaled, *self.node.args[self.x_index + 1:])
            else:
                weights = [self.attr(p.module) for _, p in group]
                self.y = self.call(ia3_rows, self.y, self.index, table, cols, *weights)

    def bottleneck(self, entries) -> None:
        def structure(p):
            c, m = p.config, self.gm.get_submodule(p.module)
            return (c.is_parallel, c.residual_before_ln, c.original_ln_before, c.original_ln_after, c.ln_before, c.ln_after,
                    c.adapter_residual_before_ln, c.non_linearity.lower(), float(c.dropout), type(m.scaling).__name__,
                    m.adapter_up.in_features)

        base = combined = self.node
        for group in _groups(entries, structure):
            self.y = self.node
            self._body = ([self.attr(p.module) for _, p in group], _table(self.count, [s for s, _ in group]))
            insert_bottleneck(self, group[0][1], None)  # the block's wiring; the body is ``module`` below
            members = [False] * (self.count + 1)
            for slot, _ in group:
                members[slot] = True
            combined = self.call(select_rows, self.index, members, self.y, combined)
        self.y = combined if combined is not base else self.y

    def module(self, path: str, *args):
        """The adapter body, per row: what insert_bottleneck calls for the one adapter's module."""
        weights, table = self._body
        return self.call(bottleneck_rows, self.index, [t - 1 if t else 0 for t in table], args[0], args[1], *weights)


# -- per-row computations (called from the routed graph) ----------------------------------------


def _rows_view(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, tokens, features): a (batch, seq, f) tensor, or a flat (batch * seq, f) one (GPT-2)."""
    return t.reshape(batch, -1, t.shape[-1])


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` with zeros appended along ``dim`` (0 or 1 of a matrix) up to ``size``."""
    n = size - t.shape[dim]
    return t if n == 0 else F.pad(t, (0, n) if dim == 1 else (0, 0, 0, n))


def lora_rows(x, index, table: list[int], rate, *weights):
    """``scaling * B A x`` of each row's LoRA (zero for rows whose adapter has none here): the
    factors stacked (zeros first), gathered per row and applied by batched matmuls."""
    r = max(w.lora_A.shape[0] for w in weights)
    a0 = weights[0].lora_A
    dtype = a0.dtype
    # ranks padded with zeros to the largest (A's rows, B's columns)
    a = torch.stack([a0.new_zeros(r, a0.shape[1])] + [_pad(w.lora_A, 0, r) for w in weights])
    b = torch.stack([a0.new_zeros(weights[0].lora_B.shape[0], r)] + [_pad(w.lora_B, 1, r) for w in weights])
    rows = torch.tensor(table, device=index.device)[index]
    xb = _rows_view(x, index.shape[0]).to(dtype)
    if rate:  # per-row dropout rates in training (rate is 1.0 in training mode, 0.0 in eval)
        p = torch.tensor([0.0] + [w.dropout for w in weights], device=x.device, dtype=dtype)[rows][:, None, None] * rate
        xb = xb * (torch.rand_like(xb) >= p) / (1 - p)
    h = torch.bmm(xb, a.index_select(0, rows).transpose(1, 2))  # index_select: a plain copy, faster than a[rows]
    h = h * torch.tensor([0.0] + [w.scaling for w in weights], device=x.device, dtype=dtype)[rows][:, None, None]
    delta = torch.bmm(h, b.index_select(0, rows).transpose(1, 2))
    return delta.reshape(*x.shape[:-1], delta.shape[-1]).to(x.dtype)


def ia3_rows(y, index, table: list[int], columns: list[int] | None, *weights):
    """Each row times its (IA)^3 vector (ones for rows whose adapter has none here); ``columns``: the
    output columns of a fused projection's role the vectors cover."""
    vectors = [w.vector() for w in weights]
    if columns is not None:
        cols = torch.tensor(columns, device=y.device)
        vectors = [v.new_ones(y.shape[-1]).index_copy(0, cols, v) for v in vectors]
    stack = torch.stack([torch.ones_like(vectors[0])] + vectors)
    rows = torch.tensor(table, device=index.device)[index]
    out = _rows_view(y, index.shape[0]) * stack[rows][:, None, :]
    return out.reshape(y.shape).to(y.dtype)


def _affine_rows(h, modules, rows):
    """LayerNorm per row: normalised once, each row with its own adapter's weight and bias."""
    h = F.layer_norm(h, h.shape[-1:], eps=modules[0].eps)
    return h * torch.stack([m.weight for m in modules])[rows][:, None] + torch.stack([m.bias for m in modules])[rows][:, None]


def _linear_rows(h, modules, rows):
    w = torch.stack([m.weight for m in modules])[rows]
    return torch.baddbmm(torch.stack([m.bias for m in modules])[rows][:, None], h, w.transpose(1, 2))


def bottleneck_rows(index, table: list[int], x, residual, *adapters):
    """``Bottleneck.forward`` of each row's adapter, for adapters of one structure (rows of other
    adapters take the first one's; select_rows drops them)."""
    first = adapters[0]
    batch = index.shape[0]
    rows = torch.tensor(table, device=index.device)[index]
    h = _rows_view(x, batch)
    res = None if residual is None else _rows_view(residual, batch)
    down = [list(a.adapter_down) for a in adapters]
    if len(down[0]) == 3:  # ln_before
        h = _affine_rows(h, [d[0] for d in down], rows)
    h = first.adapter_down[-1](_linear_rows(h, [d[-2] for d in down], rows))
    out = _linear_rows(h, [a.adapter_up for a in adapters], rows)
    if isinstance(first.scaling, torch.Tensor):
        scaling = torch.stack([a.scaling.expand(out.shape[-1]) for a in adapters])[rows][:, None]
    else:
        scaling = torch.tensor([a.scaling for a in adapters], device=out.device, dtype=out.dtype)[rows][:, None, None]
    out = first.dropout(out * scaling)
    norm = [a.adapter_norm_after for a in adapters] if first.adapter_norm_after is not None else None
    if first.parallel:
        out = out if norm is None else _affine_rows(out, norm, rows)
    else:
        if not first.residual_after_ln:
            out = out + res
        if norm is not None:
            out = _affine_rows(out, norm, rows)
        if first.residual_after_ln:
            out = out + res
    return out.reshape(x.shape)


def select_rows(index, members: list[bool], new, old):
    """``new`` in the rows whose index is a member, ``old`` in the others."""
    batch = index.shape[0]
    mask = torch.tensor(members, device=index.device)[index][:, None]
    return torch.where(mask, new.reshape(batch, -1), old.reshape(batch, -1)).reshape(new.shape)
