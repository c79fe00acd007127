"""Prefix tuning (Li & Liang, 2021), following AdapterHub 1.3.0 (``methods/prefix_tuning.py``).

One generator per adapter makes the prefixes of every layer, ``(layers * 2, kv_heads, P, head_dim)``:
an Embedding of P positions through an MLP, or (``flat``) the values themselves. At each attention
the rule puts layer l's prefix before the keys and values, so every query attends to it:

- SDPA: ``k = cat(prefix_k, k)``, ``v = cat(prefix_v, v)`` along the sequence, the mask grows by P
  visible columns (a causal SDPA gets an explicit mask).
- matmul-softmax attention (DeBERTa): the keys are extended before the score matmul's own
  transpose and scaling, the values before the probabilities matmul; score-shaped terms added to
  the scores (relative position bias, masks) grow by P neutral columns, and the views between
  the matmuls by P in their last dimension.

Prefixes are batch-free and broadcast over the batch; a gate (UniPELT) scales them per example.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import operator

import torch
from torch import nn
from torch.fx import Node

from .. import composition
from ..config import PrefixTuningConfig
from ..errors import AdapterError, CheckpointError, SiteError
from ..formats.common import AdapterHubCheckpoint, Converted, known_fields, layer_and_location, put
from ..ops import MATMUL, SOFTMAX, op_name
from ..naming import PREFIX_GATES, PREFIX_TUNINGS, state_key, weights_path
from ..passes.dropout import RATE_MODULE
from ..placement import Placement, one_per_layer
from ..sites import LINEAR_OPS, Anatomy, Attention, sequence_input
from .base import Activation, Emitter, Method, seeded
from .gating import Gate

if TYPE_CHECKING:
    from ..module import AdaptedModule

aten = torch.ops.aten


class PrefixTuning(nn.Module):
    """AdapterHub's ``PrefixTuning`` (``wte`` + ``control_trans`` MLP) or ``FlatPrefixTuning``
    (``control_trans`` holds the prefixes): ``forward()`` gives ``(layers * 2, heads, P, head_dim)``."""

    label = "prefix"  # in fxadapt.draw's pictures

    def __init__(self, config: PrefixTuningConfig, hidden: int, layers: int, heads: int, head_dim: int):
        super().__init__()
        self.shape = (config.prefix_length, layers * 2, heads, head_dim)
        width = layers * 2 * heads * head_dim
        if config.flat:
            self.control_trans = nn.Parameter(torch.randn(config.prefix_length * width))
        else:
            self.wte = nn.Embedding(config.prefix_length, hidden)
            self.control_trans = nn.Sequential(nn.Linear(hidden, config.bottleneck_size), Activation(config.non_linearity),
                                               nn.Linear(config.bottleneck_size, width))

    def forward(self) -> torch.Tensor:
        flat = self.control_trans if isinstance(self.control_trans, nn.Parameter) else self.control_trans(self.wte.weight)
        return flat.view(self.shape).permute(1, 2, 0, 3)

    def eject(self) -> None:
        """Fold the MLP into the prefixes it produces (AdapterHub's ``eject_prefix_tuning``)."""
        if not isinstance(self.control_trans, nn.Parameter):
            with torch.no_grad():
                flat = self.control_trans(self.wte.weight).reshape(-1).clone()
            del self.wte, self.control_trans
            self.control_trans = nn.Parameter(flat)


def _build_gate(attention: Attention, config: PrefixTuningConfig, like: torch.Tensor) -> Gate:
    with seeded(config.init_weights_seed, "gate", attention.layer):
        gate = Gate(attention.hidden_size, 1 if config.shared_gating else 2, init_bias=False)
    return gate.to(like.device, like.dtype)


def _build_generator(config: PrefixTuningConfig, placements: list[Placement], like: torch.Tensor) -> PrefixTuning:
    att = placements[0].attention
    # One slot per adapted layer (left-out layers have none, as in AdapterHub).
    with seeded(config.init_weights_seed, "prefix"):
        generator = PrefixTuning(config, att.hidden_size, placements[0].layers, att.kv_heads, att.head_dim)
    return generator.to(like.device, like.dtype)


def insert_prefix(e: Emitter, p: Placement, gate: Gate | None) -> None:
    att, config = p.attention, p.config
    x, batch = _begin(e, att)
    k, v = _prefix_pair(e, p, gate, x, batch)
    if att.kind == "sdpa":
        _extend_sdpa(e, att, k, v, config.prefix_length)
    else:
        _extend_matmul(e, att, k, v, config.prefix_length)


def _begin(e: Emitter, att: Attention) -> tuple[Node, Node]:
    """Point the emitter where the prefix is built; the layer input (for gates) and the batch size."""
    # Matmul attention uses its keys before the anchor (the values matmul): build the prefix there.
    e.point = _key_consumer(e.named(att.scores), att.head_dim)[0] if att.kind == "matmul" else None
    # The layer input as the query projection reads it now (after earlier rewrites, e.g. adapters
    # closing the previous layer).
    query = e.named(att.query)
    x = sequence_input(query.args[LINEAR_OPS[op_name(query)][0]])
    # The batch size as the keys hold it: the layer input may be sequence-first (nn.MultiheadAttention).
    keys = _keys(e, att)
    batch = e.pre(aten.sym_size.int, keys, 0)
    if keys.meta["val"].ndim != 4:  # batch and heads flattened, as _as_layout makes the prefix
        batch = e.pre(operator.floordiv, batch, att.kv_heads)
    return x, batch


def _keys(e: Emitter, att: Attention) -> Node:
    return e.node.args[1] if att.kind == "sdpa" else _key_consumer(e.named(att.scores), att.head_dim)[1]


def _prefix_pair(e: Emitter, p: Placement, gate: Gate | None, x: Node, batch) -> tuple[Node, Node]:
    """Adapter ``p``'s keys and values prefixes, (batch, kv_heads, P, head_dim), gated by ``x`` rows."""
    config = p.config
    pool = e.prelude(("prefix", p.adapter), p.shared[0])

    def prefix(slot: int) -> Node:  # (batch, kv_heads, P, head_dim)
        t = e.pre(aten.select.int, pool, 0, 2 * p.slot + slot)
        t = e.pre(aten.expand.default, e.pre(aten.unsqueeze.default, t, 0), [batch, -1, -1, -1])
        if config.dropout > 0:
            t = e.pre(aten.dropout.default, t, e.pre(RATE_MODULE, float(config.dropout)), True)
        return t

    k, v = prefix(0), prefix(1)
    if gate is not None:
        g = e.pre(p.module, x)  # (batch, 1 or 2)
        for_k = e.pre(aten.slice.Tensor, g, 1, 0, 1)
        for_v = e.pre(aten.slice.Tensor, g, 1, -1, None) if not config.shared_gating else for_k
        k = e.pre(aten.mul.Tensor, k, e.pre(aten.view.default, for_k, [-1, 1, 1, 1]))
        v = e.pre(aten.mul.Tensor, v, e.pre(aten.view.default, for_v, [-1, 1, 1, 1]))
    return k, v


class Composer(composition.Composer):
    """Prefix tuning in a composition (AdapterHub's ``PrefixTuningLayer``): a Stack concatenates the
    prefixes (the last adapter's first), Parallel and BatchSplit give each slice of rows its own. Slices
    with prefixes of different lengths (or none) are padded at the front to the longest and the padding
    masked, so each slice attends exactly as with its own prefix alone."""

    def __init__(self, e: Emitter, placements, weights):
        super().__init__(e, placements, weights)
        self.att = next(iter(placements.values())).attention
        self.x, self.batch = _begin(e, self.att)

    def op(self, target, *args):
        return self.e.pre(target, *args)

    def initial(self):
        return _PrefixState(None, None, 0, self.x, self.batch, None)

    def rows(self, state):
        return state.batch

    def single(self, name, state):
        p = self.placements[name]
        k, v = _prefix_pair(self.e, p, self.weights[name], state.x, state.batch)
        visible = state.visible
        if state.k is not None:  # stacked: this adapter's prefix before the earlier ones
            k, v = self.e.pre(aten.cat.default, [k, state.k], 2), self.e.pre(aten.cat.default, [v, state.v], 2)
            if visible is not None:
                visible = self.e.pre(aten.constant_pad_nd.default, visible, [p.config.prefix_length, 0], 1)
        return state._replace(k=k, v=v, length=state.length + p.config.prefix_length, visible=visible)

    def vslice(self, state, start, stop):
        sl = lambda t: None if t is None else self.slice(t, 0, start, stop)  # noqa: E731
        return _PrefixState(sl(state.k), sl(state.v), state.length, sl(state.x), self.e.pre(operator.sub, stop, start), sl(state.visible))

    def cat(self, states):
        if all(s.k is None for s in states):
            return states[0]._replace(x=self.x, batch=self.batch)
        cat = lambda ts, dim=0: self.e.pre(aten.cat.default, ts, dim)  # noqa: E731
        length = max(s.length for s in states)
        if all(s.length == length and s.visible is None for s in states):
            return _PrefixState(cat([s.k for s in states]), cat([s.v for s in states]), length, self.x, self.batch, None)
        like = next(s.k for s in states if s.k is not None)
        ks, vs, visible = [], [], []
        for s in states:  # padded at the front, where a Stack puts the next prefix
            if s.k is None:
                zeros = self.e.pre(aten.new_zeros.default, like, [s.batch, self.att.kv_heads, length, self.att.head_dim])
                ks.append(zeros)
                vs.append(zeros)
                visible.append(self.e.pre(aten.new_zeros.default, s.x, [s.batch, length], dtype=torch.bool))
                continue
            pad = length - s.length
            ks.append(self.e.pre(aten.constant_pad_nd.default, s.k, [0, 0, pad, 0], 0.0) if pad else s.k)
            vs.append(self.e.pre(aten.constant_pad_nd.default, s.v, [0, 0, pad, 0], 0.0) if pad else s.v)
            shown = s.visible if s.visible is not None else self.e.pre(aten.new_ones.default, s.x, [s.batch, s.length], dtype=torch.bool)
            visible.append(self.e.pre(aten.constant_pad_nd.default, shown, [pad, 0], 0) if pad else shown)
        return _PrefixState(cat(ks), cat(vs), length, self.x, self.batch, cat(visible))

    def mean(self, outs, state):
        raise AdapterError("Average does not compose prefix tuning (AdapterHub's rule)")

    def finish(self, state):
        if state.k is None:
            return
        extend = _extend_sdpa if self.att.kind == "sdpa" else _extend_matmul
        extend(self.e, self.att, state.k, state.v, state.length, state.visible)


class _PrefixState(NamedTuple):
    k: Node | None
    v: Node | None
    length: int
    x: Node
    batch: Node
    visible: Node | None  # (rows, length) bool: which prefix slots each row attends to; None: all


def _as_layout(e: Emitter, prefix: Node, like: Node, heads: int) -> Node:
    """The (batch, kv_heads, P, D) prefix in the layout of ``like``: repeated heads (GQA), or
    batch and heads flattened, as the model holds its keys."""
    shape = like.meta["val"].shape
    if len(shape) == 4 and isinstance(shape[1], int) and shape[1] != heads:
        prefix = e.pre(aten.repeat_interleave.self_int, prefix, shape[1] // heads, 1)
    if len(shape) == 3:
        prefix = e.pre(aten.flatten.using_ints, prefix, 0, 1)
    return prefix


def _set_arg(node: Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _arg(node: Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _extend_sdpa(e: Emitter, att: Attention, k: Node, v: Node, p_len: int, visible: Node | None = None) -> None:
    node = e.node
    q, key, value = node.args[0], node.args[1], node.args[2]
    new_k = e.pre(aten.cat.default, [_as_layout(e, k, key, att.kv_heads), key], -2)
    new_v = e.pre(aten.cat.default, [_as_layout(e, v, value, att.kv_heads), value], -2)
    mask = _arg(node, 3, "attn_mask")
    if _arg(node, 5, "is_causal", False):
        # A causal SDPA over a longer key sequence needs its triangle written out, prefix visible.
        q_len, k_len = e.pre(aten.sym_size.int, q, -2), e.pre(aten.sym_size.int, key, -2)
        ones = e.pre(aten.ones.default, [q_len, k_len], dtype=torch.bool, device=_device(key))
        causal = e.pre(aten.tril.default, ones, e.pre(operator.sub, k_len, q_len))
        if visible is None:
            shown = e.pre(aten.ones.default, [q_len, p_len], dtype=torch.bool, device=_device(key))
            _set_arg(node, 3, "attn_mask", e.pre(aten.cat.default, [shown, causal], -1))
        else:
            _set_arg(node, 3, "attn_mask", _cat_rows(e, visible, causal, 1, q_len))
        _set_arg(node, 5, "is_causal", False)
    elif isinstance(mask, Node) and visible is not None:
        val = mask.meta["val"]
        for _ in range(4 - val.ndim):  # as SDPA broadcasts it: (batch, heads, queries, keys)
            mask = e.pre(aten.unsqueeze.default, mask, 0)
        if val.dtype != torch.bool:  # an additive mask: the slots as terms, -inf where hidden
            visible = e.pre(aten.masked_fill.Scalar, e.pre(aten.new_zeros.default, mask, [1]),
                            e.pre(aten.logical_not.default, visible), float("-inf"))
        _set_arg(node, 3, "attn_mask", _cat_rows(e, visible, mask, e.pre(aten.sym_size.int, mask, 1), e.pre(aten.sym_size.int, mask, 2)))
    elif isinstance(mask, Node):
        _set_arg(node, 3, "attn_mask", _pad_front(e, mask, p_len, keep=True))
    elif visible is not None:  # no mask: the tokens all visible, the prefix slots per row
        shown = e.pre(aten.new_ones.default, visible, [e.pre(aten.sym_size.int, visible, 0), e.pre(aten.sym_size.int, key, -2)])
        _set_arg(node, 3, "attn_mask", _cat_rows(e, e.pre(aten.cat.default, [visible, shown], -1)))
    _set_arg(node, 1, "key", new_k)
    _set_arg(node, 2, "value", new_v)


def _cat_rows(e: Emitter, visible: Node, mask: Node | None = None, heads=1, queries=1) -> Node:
    """A 4-d SDPA mask: each row's prefix slots (``visible``, (batch, P)) before ``mask`` over the keys
    (broadcast to the batch, ``heads`` and ``queries``), or ``visible`` alone when ``mask`` is None."""
    batch = e.pre(aten.sym_size.int, visible, 0)
    block = e.pre(aten.unsqueeze.default, e.pre(aten.unsqueeze.default, visible, 1), 1)
    if mask is None:
        return block
    block = e.pre(aten.expand.default, block, [batch, heads, queries, -1])
    mask = e.pre(aten.expand.default, mask, [batch, heads, queries, -1])
    return e.pre(aten.cat.default, [block, mask], -1)


def _device(node: Node):
    val = node.meta.get("val")
    return val.device if isinstance(val, torch.Tensor) else None


def _pad_front(e: Emitter, t: Node, p_len: int, keep: bool) -> Node:
    """``t`` with ``p_len`` columns put before its last dimension: True where ``keep`` for boolean
    masks (False otherwise), 0 for additive terms."""
    val = t.meta["val"]
    fill = keep if val.dtype == torch.bool else 0.0
    shape = [e.pre(aten.sym_size.int, t, i) for i in range(val.ndim - 1)] + [p_len]
    block = e.pre(aten.full.default, shape, fill, dtype=val.dtype, device=val.device)
    return e.pre(aten.cat.default, [block, t], -1)


_SCORE_PREP = frozenset({"transpose", "permute", "div", "mul", "to", "_to_copy", "contiguous", "clone"})


def _key_consumer(scores: Node, head_dim: int) -> tuple[Node, Node, bool]:
    """The keys a score matmul reads, in heads layout ``(..., keys, head_dim)`` before the matmul's
    own transpose and scaling; the node reading them there; whether that layout is transposed."""
    keys = str(scores.meta["val"].shape[-1])
    consumer, key = scores, scores.args[1] if op_name(scores) != "baddbmm" else scores.args[2]
    while True:
        shape = key.meta["val"].shape
        if str(shape[-2]) == keys and shape[-1] == head_dim:
            return consumer, key, False
        if op_name(key) in _SCORE_PREP and isinstance(key.args[0], Node) and key.args[0].meta["val"].ndim >= 3:
            consumer, key = key, key.args[0]
            continue
        if str(shape[-1]) == keys and shape[-2] == head_dim:
            return consumer, key, True
        raise SiteError(f"prefix tuning cannot follow the keys of attention {scores.name}: layout {tuple(shape)}")


def _extend_matmul(e: Emitter, att: Attention, k: Node, v: Node, p_len: int, visible: Node | None = None) -> None:
    scores, softmax, out = e.named(att.scores), e.named(att.softmax), e.node
    # Keys: before the score matmul's own transpose and scaling, so the prefix gets them too.
    consumer, key, transposed = _key_consumer(scores, att.head_dim)
    prefix_k = _as_layout(e, k, key, att.kv_heads)
    if transposed:
        prefix_k = e.pre(aten.transpose.int, prefix_k, -1, -2)
    new_key = e.pre(aten.cat.default, [prefix_k, key], -1 if transposed else -2)
    consumer.replace_input_with(key, new_key)
    value = out.args[1]
    prefix_v = _as_layout(e, v, value, att.kv_heads)
    e.point = out
    out.replace_input_with(value, e.pre(aten.cat.default, [prefix_v, value], -2))
    # Between the matmuls: terms combined with the scores grow by P neutral columns; views by P.
    key_len = str(scores.meta["val"].shape[-1])
    if op_name(scores) == "baddbmm" and _key_shaped(scores.args[0], key_len):  # ALiBi-style bias added in the matmul
        e.point = scores
        scores.replace_input_with(scores.args[0], _pad_front(e, scores.args[0], p_len, keep=False))
    path = _between(scores, softmax) + _between(softmax, out)
    for node in path:
        e.point = node
        name = op_name(node)
        if name in ("view", "reshape", "_unsafe_view", "expand"):
            sizes = list(node.args[1])
            last = sizes[-1]
            if last != -1:  # -1 infers the longer length by itself
                sizes[-1] = e.pre(operator.add, last, p_len) if isinstance(last, Node) else last + p_len
                node.args = (node.args[0], sizes)
            continue
        for operand in node.all_input_nodes:
            if operand in path or operand is scores or operand is softmax:
                continue
            if _key_shaped(operand, key_len):
                # masked_fill's mask marks what to hide; where's condition what to keep; other terms add.
                keep = name == "where"
                node.replace_input_with(operand, _pad_front(e, operand, p_len, keep=keep))
    if visible is not None:  # the slots a row does not attend to: -inf scores before the softmax
        logits = softmax.args[0]
        if logits.meta["val"].ndim != 4:
            raise AdapterError(f"the attention scores of layer {att.layer} are not (batch, heads, queries, keys): "
                               "prefixes of different lengths in a Parallel / BatchSplit cannot be masked there")
        e.point = softmax
        hidden = e.pre(aten.logical_not.default, visible)
        hidden = e.pre(aten.constant_pad_nd.default, hidden, [0, e.pre(aten.sym_size.int, key, -1 if transposed else -2)], 0)
        hidden = e.pre(aten.unsqueeze.default, e.pre(aten.unsqueeze.default, hidden, 1), 1)
        softmax.replace_input_with(logits, e.pre(aten.masked_fill.Scalar, logits, hidden, float("-inf")))


def _key_shaped(node, key_len: str) -> bool:
    """Whether a tensor's last dimension runs over the keys (so it must grow with the prefix)."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    return isinstance(val, torch.Tensor) and val.ndim > 0 and str(val.shape[-1]) == key_len


def _between(start: Node, stop: Node) -> list[Node]:
    """Nodes on paths from ``start`` to ``stop`` (both excluded), in graph order."""
    forward, frontier = set(), [start]
    while frontier:
        for user in frontier.pop().users:
            if user is not stop and user not in forward and op_name(user) not in MATMUL | SOFTMAX:
                forward.add(user)
                frontier.append(user)
    reach, frontier = set(), [stop]
    while frontier:
        for parent in frontier.pop().all_input_nodes:
            if parent in forward and parent not in reach:
                reach.add(parent)
                frontier.append(parent)
    between, node = [], start.next
    while node is not stop:  # graph order, walking only this attention's stretch of the graph
        if node in reach:
            between.append(node)
        node = node.next
    return between


# -- where ---------------------------------------------------------------------------------


def place(name: str, config: PrefixTuningConfig, anatomy: Anatomy) -> list[Placement]:
    """One placement per self-attention; one prefix generator shared by all of them."""
    attentions, model_name = anatomy.attentions, anatomy.model_name
    own = [a for a in attentions if not a.cross]
    if not own:
        raise SiteError(f"{type(config).__name__} needs attention with projected keys and values; {model_name} has none")
    own = [a for a in own if a.layer not in config.leave_out]
    other = next((a for a in own if a.kind not in ("sdpa", "matmul")), None)
    if other is not None:
        raise SiteError(f"{type(config).__name__}: the attention of layer {other.layer} of {model_name} multiplies with {other.kind} "
                        "(relative attention written as einsum, Funnel's), whose keys and values prefix tuning cannot extend; "
                        f"leave_out=[{other.layer}] skips it")
    if config.use_gating and any(not a.batch_first for a in own):
        first = next(a for a in own if not a.batch_first)
        raise SiteError(f"{type(config).__name__}.use_gating=True: the gate reads the layer input as (batch, seq, features), but "
                        f"the attention of layer {first.layer} of {model_name} reads a sequence-first input (as nn.MultiheadAttention does)")
    generator = weights_path(PREFIX_TUNINGS, name)
    placements = []
    # The generator holds one slot per adapted layer, in layer order (AdapterHub's prefix ids).
    for slot, att in enumerate(own):
        # Gates live by the attention's projections, as AdapterHub's prefix_gates.
        parent = att.weight.rpartition(".")[0].rpartition(".")[0]
        gate = weights_path(PREFIX_GATES, name, parent) if config.use_gating else None
        placements.append(Placement(name, "prefix", att, gate, config, shared=(generator,), layers=len(own), slot=slot))
    if not placements:
        raise SiteError(f"{type(config).__name__} selects no attention of {model_name} (leave_out={list(config.leave_out)})")
    return one_per_layer(placements)


# -- AdapterHub checkpoints ----------------------------------------------------------------


def read_adapterhub(gm: AdaptedModule, ckpt: AdapterHubCheckpoint) -> Converted:
    """AdapterHub prefix tuning: the generator ``prefix_tuning.prefix_tunings.<name>.self_prefix.<param>``
    (its aliases under every attention's ``prefix_tuning.pool`` are the same tensors) and the
    gates ``<attention>.prefix_tuning.prefix_gates.<name>.<param>``, by layer."""
    config = ckpt.make_config(PrefixTuningConfig, **known_fields(PrefixTuningConfig, ckpt.config))
    gates = {p.attention.layer: p for p in ckpt.placements(place, gm, config) if p.module is not None}
    tensors, sources = {}, {}
    for key, tensor in ckpt.tensors.items():
        if ".pool." in key:
            continue
        _, sep, param = key.partition(f"prefix_tunings.{ckpt.name}.self_prefix.")
        if sep:
            ours = f"prefix_tunings.{param}"
        else:
            _, sep, param = key.partition(f"prefix_gates.{ckpt.name}.")
            p = gates.get(layer_and_location(key, "prefix_tuning")[0]) if sep else None
            ours = state_key(p.module, "adapter", param) if p is not None else key
        if "cross_prefix" in key:
            raise CheckpointError(f"{ckpt.weights_path}: tensor {key}: cross-attention prefixes are not supported",
                                  path=ckpt.weights_path, tensor=key)
        put(tensors, sources, ours, tensor, key, ckpt.weights_path)
    return Converted(ckpt.name, config, tensors, ckpt.weights_path, sources)


METHOD = Method("prefix", "prefix_tuning", _build_gate, insert_prefix, place, exclusive=True, build_shared=_build_generator,
                gate_location=lambda p: "self_prefix", adapterhub=read_adapterhub)
