"""Composition blocks: AdapterHub 1.3.0's ``Stack``, ``Parallel``, ``BatchSplit``, ``Split``, ``Average`` and ``Fuse``
(``adapters.composition``), with its names, nesting rules and semantics, compiled into the graph.

A block is data: ``gm.set_active_adapters(Stack("lang", "task"))`` records it and the rebuild compiles it.
At each place where adapters of the composition act (a projection for LoRA / (IA)^3, a residual block for
bottleneck adapters, an attention for prefix tuning), a *composer* of that kind of place holds a state, as
AdapterHub's ``ComposableAdapterLayerBase`` does (``BottleneckState``, ``LoRAState``, ``PrefixTuningState``),
and the block's rule (:func:`_run`) composes the adapters' outputs into it:

- ``Stack``: each adapter reads the state the previous one left (bottleneck: its own ``pre_forward`` each
  time; LoRA: the next LoRA reads the previous one's *delta*, not the layer input; prefix tuning: the
  prefixes are concatenated, the last adapter's first);
- ``Parallel``: the whole batch once per branch; the graph's batch inputs are repeated ``len(block)``
  times at its start and branch i acts on rows ``[i*B, (i+1)*B)`` (AdapterHub repeats the batch at the first
  adapter place; everything before it is per row, so this is the same computation);
- ``BatchSplit``: rows split by ``batch_sizes``, one child per slice, concatenated back;
- ``Split``: the sequence split by ``splits`` (bottleneck adapters only);
- ``Average``: ``sum_i w_i out_i / n`` (AdapterHub takes ``torch.mean`` over the weighted outputs: the
  weights, normalised to sum 1 by default, are divided by the number of children once more).
- ``Fuse``: AdapterFusion (bottleneck adapters): each child reads the last adapter's ``pre_forward``, and the
  fusion layer ``gm.add_adapter_fusion`` added attends over their up-projections (:mod:`fxadapt.fusion`).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .errors import AdapterError, InputError

if TYPE_CHECKING:
    from torch.fx import Graph, Node

    from .methods.base import Emitter
    from .placement import Placement

__all__ = ["Block", "Stack", "Parallel", "BatchSplit", "Split", "Average", "Fuse", "validate", "check_call", "compose", "to_lora",
           "repeat_batch_inputs", "KINDS"]

aten = torch.ops.aten


class Block(Sequence):
    """AdapterHub's ``AdapterCompositionBlock``: children are adapter names or blocks (a list nests as a Stack)."""

    def __init__(self, *children):
        if not children:
            raise AdapterError(f"{type(self).__name__} needs at least one adapter")
        self.children = [c if isinstance(c, (str, Block)) else _as_block(c) for c in children]

    def __getitem__(self, key):
        return self.children[key]

    def __len__(self):
        return len(self.children)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.children == other.children and self._kwargs() == other._kwargs()

    def __hash__(self):
        return hash((type(self).__name__, tuple(self.children)))

    def __repr__(self):
        args = [repr(c) for c in self.children] + [f"{k}={v!r}" for k, v in self._kwargs().items()]
        return f"{type(self).__name__}({', '.join(args)})"

    def _kwargs(self) -> dict:
        return {}

    def first(self) -> str:
        """The first adapter name, depth first (AdapterHub's ``first()``)."""
        c = self.children[0]
        return c if isinstance(c, str) else c.first()

    def last(self) -> str:
        c = self.children[-1]
        return c if isinstance(c, str) else c.last()

    def flatten(self) -> list[str]:
        """Every adapter name, in order of first appearance."""
        names = itertools.chain(*[[c] if isinstance(c, str) else c.flatten() for c in self.children])
        return list(dict.fromkeys(names))

    def contains(self, kind: type) -> bool:
        """Whether this block, or one nested in it, is a ``kind`` (e.g. ``Split``)."""
        return isinstance(self, kind) or any(isinstance(c, Block) and c.contains(kind) for c in self.children)

    @property
    def parallel_channels(self) -> int:
        """How many times the batch is repeated (AdapterHub's ``parallel_channels``)."""
        return max(c.parallel_channels if isinstance(c, Block) else 1 for c in self.children)

    def to_dict(self) -> dict:
        """AdapterHub's ``to_dict()``."""
        out = {"type": type(self).__name__,
               "children": [c.to_dict() if isinstance(c, Block) else {"type": "single", "children": [c]} for c in self.children]}
        if self._kwargs():
            out["kwargs"] = self._kwargs()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Block:
        """The block ``to_dict()`` wrote (AdapterHub's format)."""
        blocks = {b.__name__: b for b in (Stack, Parallel, BatchSplit, Split, Average, Fuse)}
        if data.get("type") not in blocks:
            raise AdapterError(f"unknown composition block {data.get('type')!r} (known: {', '.join(blocks)})")
        children = [c["children"][0] if c["type"] == "single" else cls.from_dict(c) for c in data["children"]]
        return blocks[data["type"]](*children, **data.get("kwargs", {}))


def _as_block(value) -> Block:
    if isinstance(value, (list, tuple)):
        return Stack(*value)
    raise AdapterError(f"a composition child must be an adapter name or a block, got {value!r}")


class Stack(Block):
    """Adapters one after the other: each reads what the previous one produced."""


class Parallel(Block):
    """The same input through each child; outputs concatenated along the batch (batch ``len(block) * B``)."""

    @property
    def parallel_channels(self) -> int:
        return len(self.children)


def _sizes(block: str, field: str, sizes, n: int) -> list[int]:
    sizes = sizes if isinstance(sizes, list) else [sizes] * n
    if len(sizes) != n or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes):
        raise AdapterError(f"{block}.{field} must be {n} non-negative whole numbers (one per child) or one, got {sizes!r}")
    return sizes


class BatchSplit(Block):
    """Rows split by ``batch_sizes`` (a list, one per child, or one int for all): child i acts on its rows."""

    def __init__(self, *children, batch_sizes: list[int] | int):
        super().__init__(*children)
        self.batch_sizes = _sizes("BatchSplit", "batch_sizes", batch_sizes, len(self.children))

    def _kwargs(self) -> dict:
        return {"batch_sizes": self.batch_sizes}


class Split(Block):
    """The sequence split by ``splits`` (positions per child): child i acts on its positions."""

    def __init__(self, *children, splits: list[int] | int):
        super().__init__(*children)
        self.splits = _sizes("Split", "splits", splits, len(self.children))

    def _kwargs(self) -> dict:
        return {"splits": self.splits}


class Average(Block):
    """``mean_i(w_i * out_i)``: weights normalised to sum 1 unless ``normalize_weights=False`` (default
    ``1/n`` each), then, as AdapterHub's ``torch.mean``, divided by the number of children."""

    def __init__(self, *children, weights: list[float] | None = None, normalize_weights: bool = True):
        super().__init__(*children)
        n = len(self.children)
        if weights is None:
            self.weights = [1 / n] * n
        else:
            if (not isinstance(weights, (list, tuple)) or len(weights) != n
                    or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w == w and abs(w) != float("inf") for w in weights)):
                raise AdapterError(f"Average.weights must be {n} finite numbers (one per child), got {weights!r}")
            total = sum(weights)
            if normalize_weights and total == 0:
                raise AdapterError(f"Average.weights {list(weights)} sum to 0: they cannot be normalised (normalize_weights=False keeps them)")
            self.weights = [w / total for w in weights] if normalize_weights else list(weights)

    def _kwargs(self) -> dict:
        return {"weights": self.weights}

    def __eq__(self, other):  # AdapterHub's to_dict keeps the normalised weights: equal blocks compare equal
        return type(other) is type(self) and self.children == other.children and self.weights == other.weights

    __hash__ = Block.__hash__


class Fuse(Block):
    """AdapterFusion (AdapterHub's ``Fuse``): each child reads the same input and a fusion layer, added with
    ``gm.add_adapter_fusion``, attends over their outputs (:mod:`fxadapt.fusion`). ``name`` is the fusion
    layer's: by default the children's (a Stack's last) names joined by commas."""

    def __init__(self, *children, name: str | None = None):
        super().__init__(*children)
        self._name = name

    @property
    def name(self) -> str:
        return self._name or ",".join(c if isinstance(c, str) else c.last() for c in self.children)

    def __eq__(self, other):
        return type(other) is type(self) and self.children == other.children and self.name == other.name

    __hash__ = Block.__hash__


# -- rules -----------------------------------------------------------------------------------

#: AdapterHub's ALLOWED_NESTINGS (MultiTask left out: not a composition block of this module).
ALLOWED = {Stack: (str, Fuse, Split, Parallel, BatchSplit, Average), Fuse: (str, Stack), Split: (str, Split, Stack, BatchSplit, Average),
           Parallel: (str, Stack, BatchSplit, Average), BatchSplit: (str, Stack, Split, BatchSplit, Average),
           Average: (str, Stack, Split, BatchSplit)}

#: The blocks each kind of place composes (AdapterHub's ``supported_compositions``: BottleneckLayer,
#: LoRALayer (LoRA and (IA)^3), PrefixTuningLayer).
SUPPORTED = {"bottleneck": (Stack, Fuse, Split, Parallel, BatchSplit, Average),
             "lora": (Stack, BatchSplit, Average, Parallel),
             "prefix": (Stack, Parallel, BatchSplit)}

#: The kind of place of each method that composes (methods not listed cannot be in a block).
KINDS = {"bottleneck": "bottleneck", "lora": "lora", "ia3": "lora", "prefix": "prefix"}


def validate(setup: Block, adapters: dict[str, Any], model_name: str = "the model", fusions: dict | None = None) -> None:
    """AdapterError unless ``setup`` is a composition AdapterHub allows: known adapter names, nestings of
    ``ALLOWED``, nothing but a Stack or a name deeper than level 1, and each block composing only methods
    that support it (``SUPPORTED``), and each Fuse naming a fusion layer of ``fusions`` over its adapters.
    ``adapters`` maps names to objects with ``placements`` and ``config``."""
    _validate(setup, 0)
    for name in setup.flatten():
        if name not in adapters:
            raise AdapterError(f"{type(setup).__name__}: {model_name} has no adapter {name!r} (adapters: {', '.join(adapters) or 'none'})")
        for p in adapters[name].placements:
            if p.method not in KINDS:
                what = "invertible adapters (pfeiffer+inv, houlsby+inv)" if p.method == "invertible" else f"{p.method} adapters"
                raise AdapterError(f"{type(setup).__name__}: adapter {name!r} has {what}, which do not compose in blocks "
                                   "(only bottleneck, Compacter, LoRA, (IA)^3 and prefix tuning do); activate it alone or in a list")
    _check_methods(setup, adapters)
    _check_fusions(setup, fusions or {}, model_name)


def _check_fusions(block, fusions: dict, model_name: str) -> None:
    if not isinstance(block, Block):
        return
    if isinstance(block, Fuse):
        fusion = fusions.get(block.name)
        if fusion is None:
            raise AdapterError(f"{block!r}: {model_name} has no AdapterFusion {block.name!r} (fusions: {', '.join(fusions) or 'none'}); "
                               "add_adapter_fusion first")
        if fusion.fuse.children != block.children:
            raise AdapterError(f"{block!r}: AdapterFusion {block.name!r} fuses {fusion.fuse!r}, other adapters")
    for child in block.children:
        _check_fusions(child, fusions, model_name)


def _validate(block, level: int) -> None:
    if not isinstance(block, Block):
        return
    if level > 1 and not isinstance(block, Stack):
        raise AdapterError(f"adapter setup is too deep: cannot have {block!r} at level {level} (below level 1 only a Stack or a name)")
    for child in block.children:
        if not isinstance(child, ALLOWED[type(block)]):
            allowed = ", ".join(t.__name__ for t in ALLOWED[type(block)])
            raise AdapterError(f"cannot nest {child!r} in {type(block).__name__}: it takes {allowed}")
        _validate(child, level + 1)


def _check_methods(block: Block, adapters: dict) -> None:
    for name in block.flatten():
        for p in adapters[name].placements:
            kind = KINDS[p.method]
            if type(block) not in SUPPORTED[kind]:
                allowed = ", ".join(t.__name__ for t in SUPPORTED[kind])
                raise AdapterError(f"{type(block).__name__} cannot compose adapter {name!r}: its {p.method} adapters compose only "
                                   f"in {allowed} (AdapterHub's rule)")
    if isinstance(block, Stack):  # a Stack of LoRAs chains them at every projection both adapt: out == in there
        _check_lora_chain(block, adapters)
    for child in block.children:
        if isinstance(child, Block):
            _check_methods(child, adapters)


def _check_lora_chain(block: Stack, adapters: dict) -> None:
    seen: dict[tuple, str] = {}
    for child in block.children:
        names = [child] if isinstance(child, str) else child.flatten()
        for name in names:
            for p in adapters[name].placements:
                if p.method != "lora":
                    continue
                key = p.site.linear.nodes
                if key in seen and seen[key] != name and p.site.in_features != p.site.out_features:
                    raise AdapterError(f"Stack({seen[key]!r}, {name!r}): LoRAs stacked at {p.describe()} chain (the second reads the first's "
                                       f"output, as AdapterHub), which needs in_features == out_features; it is "
                                       f"{p.site.in_features} -> {p.site.out_features}")
                seen.setdefault(key, name)


def check_call(setup: Block, batch: int | None, length: int | None, model_name: str) -> None:
    """InputError unless each BatchSplit's ``batch_sizes`` sum to the batch it splits and each Split's
    ``splits`` to the sequence length (checked before the graph runs)."""
    rows = None if batch is None else batch * setup.parallel_channels
    _check_call(setup, rows, batch, length, model_name)


def _check_call(block, rows, batch, length, model_name) -> None:
    if not isinstance(block, Block):
        return
    if isinstance(block, BatchSplit) and rows is not None and sum(block.batch_sizes) != rows:
        raise InputError(f"{model_name}: BatchSplit batch_sizes={block.batch_sizes} sum to {sum(block.batch_sizes)}, "
                         f"but the batch size there is {rows}")
    if isinstance(block, Split) and length is not None and sum(block.splits) != length:
        raise InputError(f"{model_name}: Split splits={block.splits} sum to {sum(block.splits)}, but the sequence length is {length}")
    for child in block.children:
        _check_call(child, batch if isinstance(block, Parallel) else rows, batch, length, model_name)


# -- compiling a composition into the graph ---------------------------------------------------


def repeat_batch_inputs(graph: Graph, channels: int, main: str | None) -> None:
    """Repeat every graph input with a dynamic first dimension (the batch: inputs captured with batch 1
    or fixed sizes keep theirs) ``channels`` times along it (Parallel)."""
    inputs = [n for n in graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].ndim > 0]
    ref = next((n for n in inputs if main in (n.name, n.target)), inputs[0] if inputs else None)
    if ref is None or not isinstance(ref.meta["val"].shape[0], torch.SymInt):
        shown = f" (input {ref.name} has {ref.meta['val'].shape[0]} rows)" if ref is not None else ""
        raise AdapterError(f"Parallel repeats the batch, but the graph was captured with a fixed batch size{shown}")
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for node in inputs:
        val = node.meta["val"]
        if not isinstance(val.shape[0], torch.SymInt):
            continue
        with graph.inserting_after(last):
            rep = graph.call_function(aten.repeat.default, (node, [channels] + [1] * (val.ndim - 1)))
        last = rep
        node.replace_all_uses_with(rep, delete_user_cb=lambda user, rep=rep: user is not rep)


def compose(e: Emitter, setup: Block, placements: list[Placement], gm) -> None:
    """Emit, at the emitter's anchor, the composition of the adapters whose ``placements`` are there."""
    kinds = {KINDS[p.method] for p in placements}
    if len(kinds) != 1:
        raise AdapterError(f"adapters of kinds {sorted(kinds)} act at the same node {e.node.name}; they cannot compose there")
    from .methods import bottleneck, lora, prefix  # here: the method files import this module
    composer = {"bottleneck": bottleneck.Composer, "lora": lora.Composer, "prefix": prefix.Composer}[kinds.pop()]
    by_name = {p.adapter: p for p in placements}
    c = composer(e, by_name, {p.adapter: gm.get_submodule(p.module) if p.module else None for p in placements})
    c.fusions = getattr(gm, "_fx_fusions", {})  # Fuse: the fusion layers (fxadapt.fusion)
    state = _run(c, setup, c.initial(), 0)
    c.finish(state)
    # Slices and concatenations a state carried but nothing read (a LoRA state's input after a BatchSplit).
    dead = [n for n in e._created if not n.users and n.target in _PURE]
    while dead:
        node = dead.pop()
        inputs = node.all_input_nodes
        e.graph.erase_node(node)
        e._created.discard(node)
        dead += [n for n in inputs if n in e._created and not n.users and n.target in _PURE and n not in dead]


_PURE = {aten.cat.default, aten.slice.Tensor, aten.sym_size.int, operator.sub, operator.mul, operator.floordiv}


def _run(c, block, state, lvl: int):
    """AdapterHub's ``compose_<block>`` functions over any composer ``c``."""
    if isinstance(block, str):
        return c.single(block, c.pre_block(block, state)) if c.has(block) else state
    if isinstance(block, Stack):
        for child in block.children:
            state = _run(c, child, state, lvl + 1)
        return state
    if not c.has_any(block.flatten()):
        return state
    if isinstance(block, Fuse):
        return c.fuse(block, state, lvl)
    if isinstance(block, Average):
        state = c.pre_block(block, state)
        outs = [(w, _child(c, child, state, lvl)) for w, child in zip(block.weights, block.children) if c.has_any(_names(child))]
        return c.mean(outs, state)
    if isinstance(block, Split):
        state = c.pre_block(block, state)
        starts = [sum(block.splits[:i]) for i in range(len(block.children) + 1)]
        outs = [_child(c, child, c.seq_slice(state, starts[i], starts[i + 1]), lvl) for i, child in enumerate(block.children)]
        return c.seq_cat(outs, state)
    # BatchSplit, Parallel: rows sliced, one child per slice, concatenated back
    if isinstance(block, BatchSplit):
        starts = [sum(block.batch_sizes[:i]) for i in range(len(block.children) + 1)]
    else:
        per = c.op(operator.floordiv, c.rows(state), len(block.children))
        starts = [0] + [c.op(operator.mul, per, i + 1) for i in range(len(block.children))]
    state = c.pre_block(block, state)
    outs = [_child(c, child, c.vslice(state, starts[i], starts[i + 1]), lvl) for i, child in enumerate(block.children)]
    return c.cat(outs)


def _child(c, child, state, lvl):
    if isinstance(child, str):
        return c.single(child, state) if c.has(child) else state
    return _run(c, child, state, lvl + 1)


def _names(child) -> list[str]:
    return [child] if isinstance(child, str) else child.flatten()


class Composer:
    """What a kind of place (bottleneck, LoRA, prefix) provides to compose adapters there, as
    AdapterHub's ``ComposableAdapterLayerBase``: the state, ``pre_block``, ``single``, ``vslice`` / ``cat``
    (rows), ``seq_slice`` / ``seq_cat`` (positions), ``mean`` and ``finish`` (what the place outputs)."""

    def __init__(self, e: Emitter, placements: dict[str, Placement], weights: dict[str, Any]):
        self.e, self.placements, self.weights = e, placements, weights

    def has(self, name: str) -> bool:
        return name in self.placements

    def has_any(self, names) -> bool:
        return any(n in self.placements for n in names)

    def pre_block(self, block, state):
        return state

    def op(self, target, *args) -> Node:
        """A node after the anchor (the anchor's output is rewritten); the prefix composer emits before it."""
        return self.e.call(target, *args)

    def slice(self, t: Node, dim: int, start, stop) -> Node:
        return self.op(aten.slice.Tensor, t, dim, start, stop)

    def seq_slice(self, state, start, stop):
        raise AdapterError("Split composes bottleneck adapters only")

    def fuse(self, block, state, lvl):
        raise AdapterError("Fuse composes bottleneck adapters only")

    def seq_cat(self, states, before):
        raise AdapterError("Split composes bottleneck adapters only")


# -- folding a Stack / Average of LoRAs ------------------------------------------------------


def to_lora(gm, name: str, setup: Block) -> None:
    """Add LoRA adapter ``name`` that computes exactly what ``setup``, a Stack or Average of LoRA
    adapters (nested as those allow), computes at every projection, so that ``gm.merge_adapter(name)``
    merges the composition into the weights. Each projection's composed update is factored exactly:
    a Stack chains (``s_b B_b (A_b s_a B_a A_a)``, rank of the last), an Average stacks the factors
    (``[w_1 B_1 / n, ...] [A_1; ...]``, ranks summed); the new adapter's rank is the largest (zero-padded
    elsewhere), its scaling 1. The LoRAs must select the same projections (same site fields)."""
    validate(setup, gm._fx_adapters, gm._fx_model_name)
    _only_folding(setup)
    adapters = [gm._fx_adapters[n] for n in setup.flatten()]
    for a in adapters:
        bad = next((p for p in a.placements if p.method != "lora" or getattr(p.config, "use_gating", False)), None)
        if bad is not None or getattr(a.config, "use_gating", False):
            raise AdapterError(f"{type(setup).__name__}: adapter {a.name!r} is not an ungated LoRA: only LoRAs fold into one")
    keys = [{_site_key(p) for p in a.placements} for a in adapters]
    if any(k != keys[0] for k in keys):
        raise AdapterError(f"{type(setup).__name__}: adapters {setup.flatten()} adapt different projections; to_lora needs the same ones")
    weights = {a.name: {_site_key(p): gm.get_submodule(p.module) for p in a.placements} for a in adapters}
    factors = {key: _factors(setup, key, weights, None) for key in keys[0]}
    rank = max(b.shape[1] for b, _ in factors.values())
    config = adapters[0].config.replace(r=rank, alpha=rank, use_rslora=False, dropout=0.0, rank_pattern={}, alpha_pattern={})
    with gm._atomic():
        gm.add_adapter(name, config)
        with torch.no_grad():
            for p in gm._fx_adapters[name].placements:
                w, (b, a) = gm.get_submodule(p.module), factors[_site_key(p)]
                w.lora_A.zero_()[: a.shape[0]].copy_(a)
                w.lora_B.zero_()[:, : b.shape[1]].copy_(b)


def _only_folding(block) -> None:
    if isinstance(block, Block):
        if not isinstance(block, (Stack, Average)):
            raise AdapterError(f"{type(block).__name__} does not fold into the weights: only a Stack or an Average of LoRAs does")
        for child in block.children:
            _only_folding(child)


def _site_key(p) -> tuple:
    return (p.site.path, p.site.role)


def _factors(block, key, weights, m):
    """The (B, A) factors (float64) of the update after ``block`` at site ``key``, given the running
    update ``m`` (None: nothing applied yet, the adapters read the layer input)."""
    if isinstance(block, str):
        w = weights[block].get(key)
        if w is None:
            return m
        b, a = w.lora_B.double() * w.scaling, w.lora_A.double()
        return (b, a) if m is None else (b, (a @ m[0]) @ m[1])
    if isinstance(block, Stack):
        for child in block.children:
            m = _factors(child, key, weights, m)
        return m
    present = [(w, child) for w, child in zip(block.weights, block.children)
               if any(key in weights[n] for n in ([child] if isinstance(child, str) else child.flatten()))]
    if not present:
        return m
    parts = [(w, _factors(child, key, weights, m)) for w, child in present]
    return (torch.cat([w * b / len(parts) for w, (b, _) in parts], 1), torch.cat([a for _, (_, a) in parts], 0))
