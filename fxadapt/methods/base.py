"""What every method file builds on: :class:`Method`, the record a method file fills in; the
:class:`Emitter` its insert rule writes nodes with; seeded initialisation; column index tensors
of fused projections; the parameters an adapter keeps fixed.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.fx import Graph, Node
from transformers.activations import get_activation

from ..ops import op_name
from ..passes.dropout import RATE_MODULE
from ..placement import Placement
from ..sites import LINEAR_OPS, Site

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..sites import Anatomy

aten = torch.ops.aten

__all__ = ["Method", "PeftFormat", "Emitter", "Activation", "seeded", "columns_tensor", "frozen_parameters"]


@dataclass(frozen=True)
class PeftFormat:
    """A method's conversion to and from PEFT's format (``adapter_config.json`` with ``peft_type`` and
    ``adapter_model.safetensors``); ``fxadapt.formats.common`` has the checks and names they share.

    - ``read(gm, directory, path, meta, key_mapping)``: the :class:`~fxadapt.formats.common.Converted`
      adapter of the checkpoint in ``directory``, whose config file ``path`` holds ``meta``;
    - ``write(gm, name)``: ``(config file name, meta, weights file name, tensors)`` of adapter ``name``.
    """

    peft_type: str
    read: Callable[..., Any]
    write: Callable[[Any, str], tuple[str, dict, str, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Method:
    """An adapter method as data, filled in by its file under ``fxadapt/methods`` and listed in
    ``METHODS``:

    - ``place(adapter, config, anatomy)``: the placements of a config on a model (None for a method
      that another one places, as bottleneck adapters place the invertible adapter);
    - ``build(where, config, like)``: the weights of one placement at its Site, Block or Attention
      (``like`` is the weight it follows, for device and dtype), an ``nn.Module``; ``build_shared
      (config, placements, like)``: weights all placements of an adapter share;
    - ``insert(emitter, placement, weights)``: the nodes it adds to the graph at the placement;
    - ``fold(W, b, placement, weights)``: the merged weight and bias (None: cannot merge);
    - ``exclusive``: at most one active adapter of this method per place;
    - ``gate_location(placement)``: AdapterHub's name for where its gate sits (gating scores);
    - ``adapterhub(gm, checkpoint)``: reads AdapterHub checkpoints of ``architecture``;
    - ``peft``: its :class:`PeftFormat`, how PEFT's checkpoints of it are read and written (None: PEFT
      has no form of it). ``fxadapt.formats.peft`` reads by ``peft_type`` and writes by method;
    - ``positionwise``: what it does at a position does not depend on where the sequence starts, so a
      decode step over the new positions with a KV cache computes what the whole forward does
      (``generate``); False for methods that add positions or pick them by index (prompt tuning, ReFT).
    """

    name: str
    architecture: str
    build: Callable[[Any, "AdapterConfig", torch.Tensor], nn.Module]
    insert: Callable[["Emitter", Placement, nn.Module | None], None]
    place: Callable[[str, "AdapterConfig", "Anatomy"], list[Placement]] | None = None
    fold: Callable[[torch.Tensor, torch.Tensor | None, Placement, nn.Module], tuple] | None = None
    exclusive: bool = False
    build_shared: Callable[["AdapterConfig", list, torch.Tensor], nn.Module] | None = None
    gate_location: Callable[[Placement], str] = lambda p: ""
    adapterhub: Callable | None = None
    peft: PeftFormat | None = None
    positionwise: bool = True


class Emitter:
    """Builds the nodes of one anchor: after it in order, or before it for a projection's input.

    ``y`` is the anchor's value as rewritten so far; ``finish`` makes the anchor's users read it.
    At a projection, ``x`` is its input."""

    def __init__(self, graph: Graph, node: Node, by_name: dict[str, Node], cache: dict | None = None):
        self.graph, self.node, self._by_name = graph, node, by_name
        self._cache = {} if cache is None else cache
        spec = LINEAR_OPS.get(op_name(node))
        self.x_index = spec[0] if spec else None
        self.x: Node | None = node.args[self.x_index] if spec else None
        self.y: Node = node
        self.point: Node | None = None  # where ``pre`` inserts; the anchor when None
        self._last = node
        self._created: set[Node] = set()
        self._meta = {k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta}

    def _new(self, op: str, target, args: tuple, kwargs: dict | None = None, before: bool | Node = False) -> Node:
        if before is True:
            before = self.node
        where = self.graph.inserting_before(before) if before is not False else self.graph.inserting_after(self._last)
        with where:
            new = self.graph.create_node(op, target, args, kwargs or {})
        if not before:
            self._last = new
        new.meta.update(self._meta)
        self._created.add(new)
        return new

    def call(self, target, *args, **kwargs) -> Node:
        return self._new("call_function", target, args, kwargs)

    def attr(self, path: str) -> Node:
        return self._new("get_attr", path, ())

    def module(self, path: str, *args) -> Node:
        return self._new("call_module", path, args)

    def pre(self, target, *args, **kwargs) -> Node:
        """A call inserted before the anchor, or before ``self.point`` when set (to rewrite inputs)."""
        op = "call_module" if isinstance(target, str) else "call_function"
        return self._new(op, target, args, kwargs, before=self.point or True)

    def prelude(self, key, path: str, *args) -> Node:
        """A module call at the start of the graph, made once per rebuild and shared by all anchors."""
        if key not in self._cache:
            first = next(n for n in self.graph.nodes if n.op != "placeholder")
            with self.graph.inserting_before(first):
                self._cache[key] = self.graph.call_module(path, args)
            self._created.add(self._cache[key])
        return self._cache[key]

    def named(self, name: str) -> Node:
        """A node of the graph by name (placements refer to nodes by name)."""
        return self._by_name[name]

    def copy_nodes(self, names: Sequence[str], replace: dict[Node, Node]) -> Node:
        """Copy these nodes (in order), reading ``replace[n]`` wherever they read ``n``; the last copy."""
        mapping = dict(replace)
        for name in names:
            old = self._by_name[name]
            with self.graph.inserting_after(self._last):
                new = self.graph.node_copy(old, lambda a: mapping.get(a, a))
            self._created.add(new)
            self._last = mapping[old] = new
        return new

    def rate(self, p: float) -> Node:
        """The dropout rate ``p`` in training mode, 0 in eval mode."""
        return self._new("call_module", RATE_MODULE, (float(p),))

    def scale_input(self, scale_path: str, scaling: float = 1.0, cast: bool = False) -> None:
        """Multiply the projection's input by ``scaling`` times a vector, for this projection only.
        With ``cast`` (a vector in a dtype of its own), the product is rounded to the input's dtype once."""
        x = self.node.args[self.x_index]
        s = self._new("get_attr", scale_path, (), before=True)
        if scaling != 1.0:
            s = self._new("call_function", aten.mul.Tensor, (s, scaling), before=True)
        scaled = self._new("call_function", aten.mul.Tensor, (x, s), before=True)
        if cast:
            scaled = self._new("call_function", aten.type_as.default, (scaled, x), before=True)
        args = list(self.node.args)
        args[self.x_index] = scaled
        self.node.args = tuple(args)

    def add_to_columns(self, delta: Node, site: Site, index_path: str) -> None:
        """``y += delta``, with ``delta`` placed into the site's columns of a fused projection."""
        cols, width = site.columns, site.linear.out_features
        if cols is None:
            self.y = self.call(aten.add.Tensor, self.y, delta)
        elif isinstance(cols, range):
            self.y = self.call(aten.add.Tensor, self.y, self.call(aten.constant_pad_nd.default, delta, [cols.start, width - cols.stop], 0.0))
        else:
            self.y = self.call(aten.index_add.default, self.y, -1, self.attr(index_path), delta)

    def full_vector(self, vec: Node, site: Site, index_path: str, fill: float) -> Node:
        """A vector (or rows of them) over all output columns: ``vec`` on the site's columns, ``fill``
        elsewhere."""
        cols, width = site.columns, site.linear.out_features
        if cols is None:
            return vec
        if isinstance(cols, range):
            return self.call(aten.constant_pad_nd.default, vec, [cols.start, width - cols.stop], fill)
        # ``fill`` in vec's shape with the last dimension ``width``: no columns of vec, padded
        full = self.call(aten.constant_pad_nd.default, self.call(aten.slice.Tensor, vec, -1, 0, 0), [0, width], fill)
        return self.call(aten.index_copy.default, full, -1, self.attr(index_path), vec)

    def finish(self) -> None:
        if self.y is not self.node:
            self.node.replace_all_uses_with(self.y, delete_user_cb=lambda user: user not in self._created)


@contextlib.contextmanager
def seeded(seed: int | None, *where):
    """Initialise under a seed of its own (``init_weights_seed``, mixed with where the weights sit so
    that places differ), leaving the global random state as it was; no-op without a seed."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(repr((seed, *where)).encode()))
        yield


def columns_tensor(columns: Sequence[int] | None) -> torch.Tensor | None:
    """Index tensor of a fused site's non-contiguous columns (None when a pad does the job)."""
    if columns is None or isinstance(columns, range):
        return None
    return torch.tensor(list(columns), dtype=torch.long)


def frozen_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters an adapter keeps fixed while it trains: those each submodule lists in its
    ``frozen()`` (Compacter's PHM rule with ``learn_phm=False``)."""
    return [p for m in module.modules() if hasattr(m, "frozen") for p in m.frozen()]


class Activation(nn.Module):
    """AdapterHub's activation lookup: transformers' ``get_activation``, plus "leakyrelu"."""

    def __init__(self, name: str):
        super().__init__()
        name = name.lower()
        self.f = nn.functional.leaky_relu if name == "leakyrelu" else get_activation(name)

    def forward(self, x):
        return self.f(x)
