"""Adapter sites, found by dataflow.

A *site* is a weight that a linear-like node reads (``aten.linear``, GPT-2's ``addmm``, ``x @ W``),
with the role its output plays in a transformer layer:

- ``q``, ``k``, ``v``: the projection's output reaches an attention's query, key or value through
  reshapes, slices, RoPE and norms, but no other projection. A fused projection (GPT-2's ``c_attn``,
  Phi-3's ``qkv_proj``, DeBERTa's ``in_proj``) gives one site per role, each owning the output
  columns that reach its operand; the columns are found by pushing column indices through the
  reshapes and splits that follow the projection.
- ``o``: a projection whose input comes from an attention's output.
- ``ffn_in``, ``ffn_out``: ``ffn_out`` reads, through an activation, the outputs of the ``ffn_in``
  projections (up, and gate for gated FFNs).
- ``cross_q`` ... ``cross_o``: the same for an attention whose keys read another stream than its
  queries (encoder-decoder cross-attention); keys that read the queries' input pooled or reduced
  without a projection (Funnel's pooled queries, SegFormer's reduced keys) are self-attention.

Attention is ``scaled_dot_product_attention`` or a ``softmax`` between two activation matmuls or
two-operand einsums (DeBERTa; Funnel's relative attention). Layers are numbered by the self-attention blocks in topological order. Module names are
never consulted, so renaming every module of a model gives the same sites.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
import dataclasses
import functools
import heapq
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from .errors import FxAdaptError, SiteError
from .ops import ACTIVATIONS, CASTS, DROPOUT, MATMUL, METADATA, MOVEMENT, SDPA, SELECTING, SOFTMAX, concrete, op_name
from .ops import example_shape as _example_shape

__all__ = ["Site", "Linear", "Block", "Attention", "Anatomy", "anatomy", "analyse", "find_input_embeddings", "find_sites", "find_blocks", "find_attentions", "ROLES", "LINEAR_OPS"]

ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out")
_ROLE_ORDER = {r: i for i, r in enumerate(("q", "k", "v", "o", "cross_q", "cross_k", "cross_v", "cross_o", "ffn_in", "ffn_out"))}

# op name -> (index of the input, index of the weight, index of the bias, weight stored (in, out))
LINEAR_OPS = {
    "linear": (0, 1, 2, False),
    "addmm": (1, 2, 0, True),
    "matmul": (0, 1, None, True),
    "mm": (0, 1, None, True),
    # A convolution whose kernel is 1 everywhere, stride 1, no padding, is a linear over its channel
    # dim (SqueezeBERT's Conv1d projections); _conv_groups says which convolutions are.
    "conv1d": (0, 1, 2, False),
    "conv2d": (0, 1, 2, False),
    "conv3d": (0, 1, 2, False),
    "convolution": (0, 1, 2, False),
    # Experts of a mixture-of-experts layer, a 3-D weight (E, in, out) read by a grouped matmul over
    # rows sorted by expert with each expert's row offsets (transformers' grouped_mm experts).
    "grouped_mm_fallback": (0, 1, None, True),
    "_grouped_mm": (0, 1, None, True),
    "grouped_mm": (0, 1, None, True),
    # Or a 3-D weight indexed by each row's expert then a batched matmul (transformers' batched_mm
    # experts): ``x[:, None] @ W[ids]``, or ``W[ids] @ x[..., None]`` (the input second; _expert_read).
    "bmm": (0, 1, None, True),
}
_CONVS = frozenset({"conv1d", "conv2d", "conv3d", "convolution"})
GROUPED = frozenset({"grouped_mm_fallback", "_grouped_mm", "grouped_mm"})


@dataclass(frozen=True)
class Linear:
    """A weight read by linear-like nodes: ``y = x W^T + b`` (or ``x W + b`` when ``transposed``).

    A 1x1 convolution is a linear over its channel dim: ``channel_dim`` counts from the end (-2 for
    a Conv1d's (N, C, L), -3 for a Conv2d's; -1 for a linear), its weight is (out, in / groups, 1, ...),
    and ``groups`` > 1 makes it block-diagonal (``in_features`` counts every input channel).

    ``experts`` > 0: the (E, out, in) weight (or (E, in, out) when ``transposed``) of a mixture of
    experts, E = ``experts``, its ``path`` the parameter's path; each row of the input is read by one
    expert's slice, chosen by a grouped matmul's offsets or by indexing the weight (``expert_read``)."""

    path: str
    weight: str
    bias: str | None
    transposed: bool
    in_features: int
    out_features: int
    nodes: tuple[str, ...]
    groups: int = 1
    channel_dim: int = -1
    experts: int = 0

    @property
    def conv(self) -> bool:
        """Whether this is a 1x1 convolution (channels not last)."""
        return self.channel_dim != -1


@dataclass(frozen=True)
class Site:
    """Where an adapter can sit.

    ``layer`` and ``role`` say what the projection is (``role`` is None for a linear picked only by
    a ``targets`` pattern); ``path`` is the module path of its weight; ``in_features`` and
    ``out_features`` the shape the adapter sees (for a fused projection, the role's columns);
    ``columns`` the output columns the role owns in a fused projection (None: all of them).
    """

    layer: int | None
    role: str | None
    path: str
    in_features: int
    out_features: int
    linear: Linear = field(repr=False)
    columns: Sequence[int] | None = field(default=None, repr=False)

    @property
    def weight(self) -> str:
        """Attribute path of the weight this site reads."""
        return self.linear.weight

    @property
    def name(self) -> str:
        """The module path, with the role for one part of a fused projection."""
        return self.path if self.columns is None else f"{self.path}[{self.role}]"


@dataclass(frozen=True)
class Block:
    """The residual connection closing an attention block (``location="mh"``, after the ``o``
    projection) or a feed-forward block (``"output"``, after ``ffn_out``).

    ``add`` is the residual add node, ``residual_arg`` the index of its argument that carries the
    block's input. ``tail`` is the sublayer's output as it is summed, after its own output transforms
    (a norm of the sublayer output, Gemma2; a scale, Granite and BEiT); ``direct`` says it is the add's other argument
    (False in parallel-residual layers, GPT-J or Falcon, where attention and feed-forward outputs
    are summed before the residual comes in). ``norm`` lists, for a post-LN block (BERT), the nodes
    of the normalisation applied to the sum, its output last; for a pre-LN block (GPT-2, Llama,
    ViT) it is empty and the sum is the block's output.
    """

    layer: int
    location: str
    add: str
    residual_arg: int
    norm: tuple[str, ...]
    hidden_size: int
    path: str  # module path of the projection closing the block (``o`` or ``ffn_out``)
    weight: str  # its weight
    residual: str  # the add's residual input node (for the first block: the embedding output)
    tail: str
    direct: bool = True

    @property
    def output(self) -> str:
        """The node an adapter rewrites: the norm's last node or the add (or, in a parallel-residual
        layer, the sublayer's output)."""
        if not self.direct:
            return self.tail
        return self.norm[-1] if self.norm else self.add


@dataclass(frozen=True)
class Attention:
    """An attention of the graph, with what a pass needs to extend its keys and values.

    ``kind`` is ``"sdpa"`` (``node`` is the SDPA call) or ``"matmul"`` (``node`` is the
    probabilities-times-values matmul, ``scores`` the query-times-keys matmul, ``softmax`` between),
    or ``"einsum"`` for the same written as two-operand einsums (Funnel's relative attention).
    ``query`` is the query projection node; what it reads is the layer's attention input.
    """

    layer: int
    cross: bool
    kind: str
    node: str
    query: str
    kv_heads: int
    head_dim: int
    hidden_size: int
    weight: str  # the query projection's weight
    scores: str | None = None
    softmax: str | None = None
    batch_first: bool = True  # the layer input's dim 0 is the batch (not nn.MultiheadAttention's (L, N, E))


@dataclass(frozen=True)
class Anatomy:
    """Everything site analysis finds in a captured graph, which placement rules read: the role
    sites, every linear by weight path, the residual blocks and the attentions."""

    model_name: str
    sites: list[Site]
    linears: dict[str, Linear]
    blocks: list[Block]
    attentions: list[Attention]
    embeddings: tuple[str, ...] = ()  # tables the first block's input looks up by a graph input, largest first
    unmatched: tuple[tuple[Site, str], ...] = ()  # o / ffn_out sites that close no residual block, and why
    parameters: dict[str, tuple[str, ...]] = field(default_factory=dict)  # every parameter's path -> the get_attr nodes reading it


def _named_errors(fn):
    """Site analysis raises SiteError naming the node it was analysing, never a raw torch or sympy error."""

    @functools.wraps(fn)
    def wrapped(gm, *args, **kwargs):
        try:
            return fn(gm, *args, **kwargs)
        except FxAdaptError:
            raise
        except Exception as e:
            node = _failing_node(e.__traceback__)
            at = f" at node {node.name} ({node.format_node()})" if node is not None else ""
            raise SiteError(f"site analysis of {type(gm).__name__} failed{at}: {type(e).__name__}: {e}") from e

    return wrapped


def _failing_node(tb) -> Node | None:
    """The graph node that the innermost frame of this module was working on when an error rose."""
    found = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals.get("__name__") == __name__:
            nodes = [v for v in frame.f_locals.values() if isinstance(v, Node)]
            found = frame.f_locals.get("node") if isinstance(frame.f_locals.get("node"), Node) else (nodes[0] if nodes else found)
        tb = tb.tb_next
    return found


@_named_errors
def anatomy(gm: GraphModule, model_name: str = "model") -> Anatomy:
    """Analyse a captured graph: its sites, linears, attentions, residual blocks and input embeddings."""
    sites, linears, attentions = analyse(gm)
    unmatched: list[tuple[Site, str]] = []
    blocks = find_blocks(gm, sites, attentions, unmatched)
    parameters: dict[str, tuple[str, ...]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and _param(gm, node) is not None:
            parameters[node.target] = (*parameters.get(node.target, ()), node.name)
    return Anatomy(model_name, sites, linears, blocks, attentions, find_input_embeddings(gm, blocks), tuple(unmatched), parameters)


def find_input_embeddings(gm: GraphModule, blocks: list[Block]) -> tuple[str, ...]:
    """The weight paths of the embedding tables (``aten.embedding``) that the first block's residual
    input (the embedding output) looks up with a graph input as indices, largest first: the word
    embeddings lead (positions are computed, not inputs; token types are fewer than words)."""
    if not blocks:
        return ()
    by_name = {n.name: n for n in gm.graph.nodes}
    tables = {}
    for node in _ancestors(by_name[blocks[0].residual]):
        if op_name(node) == "embedding" and isinstance(node.args[1], Node) and node.args[1].op == "placeholder":
            weight = _param(gm, node.args[0])
            if weight is not None:
                tables[node.args[0].target] = weight.shape[0]
    return tuple(sorted(tables, key=lambda t: -tables[t]))


@dataclass
class _Attention:
    out: Node
    q: Node
    k: Node
    v: Node
    scores: list[tuple[Node, Node, Node]] = field(default_factory=list)  # (left, right, matmul) of score matmuls
    softmax: Node | None = None


def find_sites(gm: GraphModule) -> tuple[list[Site], dict[str, Linear]]:
    """The role sites of a captured graph, sorted by layer and role, and every linear by weight path."""
    sites, linears, _ = analyse(gm)
    return sites, linears


def find_attentions(gm: GraphModule) -> list[Attention]:
    """The attentions of a captured graph whose keys come from a projection, in graph order."""
    return analyse(gm)[2]


@_named_errors
def analyse(gm: GraphModule) -> tuple[list[Site], dict[str, Linear], list[Attention]]:
    """Sites, linears and attentions of a captured graph, in one pass of the dataflow analysis."""
    nodes = list(gm.graph.nodes)
    linears, linear_of = _find_linears(gm, nodes)
    attentions = _find_attentions(nodes, linear_of)
    columns = _column_maps(gm, nodes, linear_of, linears)
    origin = _propagate_origins(nodes, linear_of, attentions, columns)
    sites, described = _assign_roles(nodes, linears, linear_of, attentions, origin, _constants(nodes))
    sites.sort(key=lambda s: (s.layer if s.layer is not None else -1, _ROLE_ORDER.get(s.role, 99), s.path))
    return sites, linears, described


# -- linears ---------------------------------------------------------------------------------


def _param(gm: GraphModule, node) -> torch.nn.Parameter | None:
    if isinstance(node, Node) and node.op == "get_attr":
        try:
            value = gm.get_parameter(node.target)
        except AttributeError:
            return None
        return value
    return None


def _weight_node(arg) -> tuple[Node, bool]:
    """The get_attr a weight operand reads, and whether it is read transposed (``x @ W.T``, Falcon)."""
    if isinstance(arg, Node) and arg.op == "call_function" and isinstance(arg.args[0], Node) and arg.args[0].op == "get_attr":
        name = op_name(arg)
        if name in ("t", "numpy_T") or (name == "transpose" and sorted(a % 2 for a in arg.args[1:3]) == [0, 1]) \
                or (name == "permute" and list(arg.args[1]) == [1, 0]):
            return arg.args[0], True
    return arg, False


def expert_read(node: Node) -> tuple[Node, int, bool, Node | None] | None:
    """How a node reads a 3-D expert weight, or None: (the weight's get_attr, the input's arg index,
    whether the weight is read as (E, in, out), the node indexing it by each row's expert (None for a
    grouped matmul, whose offsets say which rows each expert reads))."""
    name = op_name(node) if node.op == "call_function" else ""
    if name in GROUPED and len(node.args) >= 3:
        w, flipped = _weight3(node.args[1])
        return (w, 0, not flipped, None) if w is not None else None
    if name == "bmm":
        for w_i in (1, 0):  # x[:, None] @ W[ids] reads (E, in, out); W[ids] @ x[..., None] reads (E, out, in)
            arg = node.args[w_i]
            if isinstance(arg, Node) and op_name(arg) == "index" and len(arg.args[1]) == 1 and isinstance(arg.args[1][0], Node):
                w, flipped = _weight3(arg.args[0])
                if w is not None:
                    return w, 1 - w_i, (w_i == 1) ^ flipped, arg
    return None


def _weight3(arg) -> tuple[Node | None, bool]:
    """The get_attr a (3-D) weight operand reads, and whether it swaps the last two dims."""
    flipped = False
    if isinstance(arg, Node) and op_name(arg) == "transpose" and {a % 3 for a in arg.args[1:3]} == {1, 2}:
        arg, flipped = arg.args[0], True
    return (arg, flipped) if isinstance(arg, Node) and arg.op == "get_attr" else (None, False)


def _find_linears(gm: GraphModule, nodes: list[Node]) -> tuple[dict[str, Linear], dict[Node, tuple[str, int]]]:
    """Linear-like nodes grouped by weight; ``linear_of[node] = (weight path, input arg index)``."""
    found: dict[str, dict] = {}
    linear_of: dict[Node, tuple[str, int]] = {}
    for node in nodes:
        expert = expert_read(node)
        weight = _param(gm, expert[0]) if expert is not None else None
        if weight is not None and weight.ndim == 3:
            w_node, x_i, transposed, _ = expert
            n, a, b = weight.shape
            entry = found.setdefault(w_node.target, dict(path=w_node.target, weight=w_node.target, bias=None, transposed=transposed,
                                                         in_features=a if transposed else b, out_features=b if transposed else a,
                                                         nodes=[], experts=n))
            entry["nodes"].append(node.name)
            linear_of[node] = (w_node.target, x_i)
            continue
        spec = LINEAR_OPS.get(op_name(node)) if node.op == "call_function" else None
        if spec is None:
            continue
        x_i, w_i, b_i, transposed = spec
        if len(node.args) <= max(x_i, w_i):
            continue
        w_node, flipped = _weight_node(node.args[w_i])
        weight = _param(gm, w_node)
        conv = op_name(node) in _CONVS
        groups = _conv_groups(node, weight) if conv else 1
        if weight is None or groups is None or (not conv and weight.ndim != 2):
            continue
        transposed ^= flipped
        bias_node = node.args[b_i] if b_i is not None and len(node.args) > b_i else node.kwargs.get("bias")
        bias = bias_node.target if _param(gm, bias_node) is not None else None
        target = w_node.target
        out_f, in_f = (weight.shape[1], weight.shape[0]) if transposed else (weight.shape[0], weight.shape[1] * groups)
        entry = found.setdefault(target, dict(path=target.rpartition(".")[0], weight=target, bias=bias,
                                              transposed=transposed, in_features=in_f, out_features=out_f, nodes=[],
                                              groups=groups, channel_dim=1 - weight.ndim))
        entry["nodes"].append(node.name)
        linear_of[node] = (target, x_i)
    linears = {k: Linear(**{**v, "nodes": tuple(v["nodes"])}) for k, v in found.items()}
    return linears, linear_of


def _conv_groups(node: Node, weight: torch.Tensor | None) -> int | None:
    """The groups of a convolution that is a linear over its channel dim (kernel 1 everywhere,
    stride 1, no padding, not transposed: each position's output reads only its own input), else None."""
    if weight is None or weight.ndim < 3 or any(k != 1 for k in weight.shape[2:]):
        return None
    spatial = weight.ndim - 2
    schema = ("stride", "padding", "dilation", "transposed", "output_padding", "groups") if op_name(node) == "convolution" \
        else ("stride", "padding", "dilation", "groups")
    args = dict(zip(schema, node.args[3:]), **node.kwargs)

    def ints(v, default):  # [1] and 1 both mean 1 along every spatial dim
        v = default if v is None else v
        return [int(x) for x in v] * (spatial if len(v) == 1 else 1) if isinstance(v, (list, tuple)) else [int(v)] * spatial

    padding = args.get("padding", 0)
    if isinstance(padding, str):  # "valid", or "same", which for a kernel of 1 is no padding either
        padding = 0
    if ints(args.get("stride"), 1) != [1] * spatial or ints(padding, 0) != [0] * spatial or args.get("transposed", False) \
            or any(ints(args.get("output_padding"), 0)):
        return None
    return int(args.get("groups", 1))


# -- attention -------------------------------------------------------------------------------


def _find_attentions(nodes: list[Node], linear_of) -> list[_Attention]:
    """SDPA nodes, and softmax(scores) @ v patterns whose scores come from activation matmuls."""
    found = []
    for node in nodes:
        name = op_name(node)
        if name in SDPA:
            found.append(_Attention(out=node, q=node.args[0], k=node.args[1], v=node.args[2]))
        elif name in SOFTMAX:
            att = _softmax_attention(node, linear_of)
            if att is not None:
                found.append(att)
    return found


def _einsum_operands(node: Node) -> tuple[str, list] | None:
    """The equation and operands of a two-operand einsum (``aten.einsum(eq, [a, b])`` or ``torch.einsum(eq, a, b)``)."""
    if op_name(node) != "einsum" or not node.args or not isinstance(node.args[0], str):
        return None
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    return (node.args[0].replace(" ", ""), list(operands)) if len(operands) == 2 else None


def _is_matmul(node: Node) -> bool:
    """A product of two tensors: a matmul op, or an einsum of two operands (Funnel's relative attention)."""
    return op_name(node) in MATMUL or _einsum_operands(node) is not None


def _matmul_operands(node: Node) -> tuple[Node, Node, Node]:
    """(left, right, node): for scores, the queries and the keys; for probabilities times values,
    the probabilities and the values. An einsum's operands are ordered by its equation: the right
    one holds the output's last index (the keys a softmax normalises over; the values' features)."""
    if op_name(node) == "baddbmm":
        return node.args[1], node.args[2], node
    einsum = _einsum_operands(node)
    if einsum is None:
        return node.args[0], node.args[1], node
    equation, (a, b) = einsum
    inputs, _, out = equation.partition("->")
    left, _, right = inputs.partition(",")
    if not out:  # implicit output: the indices that occur once, sorted
        out = "".join(sorted(c for c in set(inputs) if c.isalpha() and inputs.count(c) == 1))
    last = out[-1:] if out[-1:].isalpha() else ""
    return (b, a, node) if last and last in left and last not in right else (a, b, node)


def _softmax_attention(softmax: Node, linear_of) -> _Attention | None:
    # Forward: the probabilities (through dropout, casts, views) are the left operand of P @ V.
    out, frontier = None, [softmax]
    while frontier and out is None:
        node = frontier.pop()
        for user in node.users:
            if _is_matmul(user) and user not in linear_of and _matmul_operands(user)[0] is node:
                out = user
                break
            if op_name(user) in MOVEMENT or op_name(user) in ("dropout", "masked_fill", "where"):
                frontier.append(user)
    if out is None:
        return None
    # Backward: the activation matmuls whose results are summed, scaled and masked into the scores.
    scores, stack, seen = [], [softmax.args[0]], set()
    while stack:
        node = stack.pop()
        if not isinstance(node, Node) or node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if _is_matmul(node) and node not in linear_of:
            scores.append(_matmul_operands(node))
        elif node not in linear_of and op_name(node) not in SOFTMAX:
            stack.extend(node.all_input_nodes)
    if not scores:
        return None
    return _Attention(out=out, q=scores[0][0], k=scores[0][1], v=_matmul_operands(out)[1], scores=scores, softmax=softmax)


# -- columns of fused projections ------------------------------------------------------------


def _column_maps(gm: GraphModule, nodes: list[Node], linear_of, linears) -> dict[Node, tuple[Node, frozenset[int]]]:
    """For nodes that select part of a projection's output: (projection node, output columns they hold).

    Column indices are pushed through the movement ops after the projection (views, permutes,
    splits, chunks, slices) by running them on an index tensor of the example shape. Needs
    shapes (``node.meta["val"]``); graphs without them get no column maps.
    """
    maps: dict[Node, tuple[Node, frozenset[int]]] = {}
    order = {n: i for i, n in enumerate(nodes)}
    for node in linear_of:
        chain = _movement_chain(node, order)
        if not any(op_name(n) in SELECTING for n in chain):
            continue
        shape = example_shape(node)
        if shape is None:
            continue
        # The columns run along the last dim, or the channel dim of a 1x1 convolution.
        dim = linears[linear_of[node][0]].channel_dim
        width = shape[dim]
        env = {node: torch.arange(width).view([width] + [1] * (-1 - dim)).expand(shape).contiguous()}
        try:
            for n in chain:
                env[n] = _run_movement(gm, n, env)
        except Exception:  # an op we cannot replay on indices: treat every column as reaching everything
            continue
        for n in chain:
            # A plain tensor of indices; not a fake one: an op whose sizes depend on the data (a
            # classifier picking each row's last token) selects rows, and its columns are not known.
            if type(env[n]) is torch.Tensor:
                cols = frozenset(env[n].unique().tolist())
                if len(cols) < width:
                    maps[n] = (node, cols)
    return maps


def example_shape(node: Node) -> tuple[int, ...] | None:
    """The node's output shape with symbolic sizes made concrete (``ops.example_shape``), or, where
    that fails, the sizes of the example inputs the capture ran on: setting every free size to 2
    divides by zero in windowed attention (Swin's ``(h // window) * (w // window)`` windows)."""
    try:
        return _example_shape(node)
    except ArithmeticError:
        val = node.meta.get("val")
        hints = [s.node.hint if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
        if any(h is None for h in hints):
            raise
        return tuple(int(h) for h in hints)


def _movement_chain(start: Node, order: dict[Node, int]) -> list[Node]:
    """The movement ops reached from ``start`` through movement ops only, in graph order."""
    chain, seen, frontier = [], set(), [start]
    while frontier:
        for user in frontier.pop().users:
            if op_name(user) in MOVEMENT and user not in seen:
                seen.add(user)
                chain.append(user)
                frontier.append(user)
    return sorted(chain, key=order.__getitem__)


def _run_movement(gm: GraphModule, node: Node, env: dict) -> object:
    def value(a):
        if isinstance(a, Node):
            if a in env:
                return env[a]
            if a.op == "get_attr":  # constants the ops read (Falcon's head indices)
                return getattr(gm.get_submodule(a.target.rpartition(".")[0]), a.target.rpartition(".")[2])
            if op_name(a) in ("lift_fresh_copy", "detach", "alias", "clone") and isinstance(a.args[0], Node):
                return value(a.args[0])
            return concrete(a.meta.get("val"))
        if isinstance(a, (list, tuple)):
            return type(a)(value(x) for x in a)
        return a

    args, kwargs = value(node.args), {k: value(v) for k, v in node.kwargs.items()}
    if op_name(node) in CASTS:
        return args[0]
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


# -- origins ---------------------------------------------------------------------------------

# origin[node] maps each source (a projection node or an attention output) whose value reaches the
# node without passing another projection, attention or softmax, to (columns or None for all,
# whether an activation lies on the way).
_Origin = dict[Node, tuple[frozenset[int] | None, bool]]


def _propagate_origins(nodes, linear_of, attentions, columns) -> dict[Node, _Origin]:
    att_outs = {a.out for a in attentions}
    empty: _Origin = {}
    origin: dict[Node, _Origin] = {}
    for node in nodes:
        name = op_name(node)
        if node in linear_of or node in att_outs:
            origin[node] = {node: (None, False)}
        elif node in columns:
            source, cols = columns[node]
            origin[node] = {source: (cols, False)}
        elif node.op not in ("call_function", "call_method") or _is_matmul(node) or name in SOFTMAX or name in SDPA or name in METADATA:
            origin[node] = empty
        else:
            merged: _Origin = {}
            # Indexing by computed indices (a mixture of experts' routing) reads values from operand 0 only.
            parents = [node.args[0]] if name in _INDEXING and isinstance(node.args[0], Node) else node.all_input_nodes
            for parent in parents:
                for source, (cols, act) in origin.get(parent, empty).items():
                    if source in merged:
                        old_cols, old_act = merged[source]
                        cols = None if cols is None or old_cols is None else cols | old_cols
                        act = act or old_act
                    merged[source] = (cols, act)
            if name in ACTIVATIONS and merged:
                merged = {s: (c, True) for s, (c, _) in merged.items()}
            if name == "add" and _junction(node, origin):
                # A residual add joins the outputs of different sublayers: the sum is the residual
                # stream, which reads no projection of its own (an attention that reads it without a
                # projection, a pooling head's packed in_proj, has no q/k/v site there). Carrying
                # every earlier layer's sources along the stream would also cost layers x nodes.
                merged = empty
            origin[node] = merged or empty
    return origin


_INDEXING = frozenset({"index", "index_select", "gather"})


def _junction(add: Node, origin) -> bool:
    """Whether both operands of ``add`` carry sources and no source is on both sides (RoPE's
    ``q * cos + rotate(q) * sin`` has the same source on both)."""
    sides = [set(origin.get(a, {})) for a in add.all_input_nodes]
    return len(sides) == 2 and all(sides) and not (sides[0] & sides[1])


# -- roles -----------------------------------------------------------------------------------


def _assign_roles(nodes, linears, linear_of, attentions, origin, constants) -> list[Site]:
    order = {n: i for i, n in enumerate(nodes)}
    x_of = {n: n.args[i] for n, (_, i) in linear_of.items()}
    roles: dict[tuple[str, str], tuple[int, frozenset[int] | None]] = {}  # (weight, role) -> (layer, columns)

    def sources(node) -> dict[Node, frozenset[int] | None]:
        return {s: c for s, (c, _) in origin.get(node, {}).items() if s in linear_of}

    def add(node: Node, role: str, layer: int, cols=None) -> None:
        key = (linear_of[node][0], role)
        if key in roles:
            old = roles[key][1]
            cols = None if old is None or cols is None else old | cols
        roles[key] = (layer, cols)

    # q, k, v: what reaches each attention's operands. Self-attention blocks number the layers.
    att_layer: dict[Node, int] = {}
    cross_atts: set[Node] = set()
    described: list[Attention] = []
    layer = -1
    for att in attentions:
        q, k, v = _qkv_sources(att, sources, x_of)
        cross = bool(q) and bool(k) and not _same_stream({x_of[s] for s in q}, {x_of[s] for s in k}, linear_of)
        layer = max(layer, 0) if cross else layer + 1
        att_layer[att.out] = layer
        prefix = "cross_" if cross else ""
        if cross:
            cross_atts.add(att.out)
        for role, srcs in (("q", q), ("k", k), ("v", v)):
            for node, cols in srcs.items():
                add(node, prefix + role, layer, cols)
        head_dim = _last_dim(att.v)
        if q and k and head_dim:
            k_node, k_cols = next(iter(k.items()))
            width = len(k_cols) if k_cols is not None else linears[linear_of[k_node][0]].out_features
            q_node = next(iter(q))
            q_lin = linears[linear_of[q_node][0]]
            described.append(Attention(layer, cross, _kind(att), att.out.name,
                                       q_node.name, width // head_dim, head_dim, q_lin.in_features, q_lin.weight,
                                       att.scores[0][2].name if att.scores else None, att.softmax.name if att.softmax else None,
                                       _batch_first(sequence_input(x_of[q_node]), att.k, width // head_dim)))

    # o: the projection(s) reading an attention's output.
    taken = {w for (w, _) in roles}
    for node in linear_of:
        feeding = [a for a in origin.get(x_of[node], {}) if a in att_layer]
        if feeding and linear_of[node][0] not in taken:
            att = max(feeding, key=order.__getitem__)
            add(node, "cross_o" if att in cross_atts else "o", att_layer[att])

    # ffn: a projection reading other projections' outputs through an activation, whose own output
    # is added back to the residual stream those projections read.
    taken = {w for (w, _) in roles}
    att_order = sorted(att_layer, key=order.__getitem__)
    for node in linear_of:
        inputs = {s: act for s, (_, act) in origin.get(x_of[node], {}).items() if s in linear_of and linear_of[s][0] not in taken}
        # Experts reading experts through an activation are an expert FFN: their outputs reach the
        # residual only after the routing weights and the sum over each token's experts.
        experts = linears[linear_of[node][0]].experts and all(linears[linear_of[s][0]].experts for s in inputs)
        if linear_of[node][0] in taken or not any(inputs.values()) or not (
                experts or _adds_to_residual(node, [x_of[s] for s in inputs], order, constants)):
            continue
        first = min(order[s] for s in inputs)
        before = [a for a in att_order if order[a] < first]
        layer = att_layer[before[-1]] if before else 0
        add(node, "ffn_out", layer)
        for s in inputs:
            add(s, "ffn_in", layer)
        taken |= {linear_of[node][0], *(linear_of[s][0] for s in inputs)}

    return _make_sites(roles, linears), described


# How far _same_stream looks back from a query's input for its keys' input: a pooling step (Funnel's
# strided mean over the sequence, written out as slices, a cat and a pool) is ~10 nodes.
_POOLING_DEPTH = 32


def _same_stream(q_inputs: set[Node], k_inputs: set[Node], linear_of, depth: int = _POOLING_DEPTH) -> bool:
    """Whether queries and keys are projected from one stream: the same input, or one input derived
    from the other through no projection or attention (Funnel pools the query's stream between
    blocks, its keys read the unpooled one). Cross-attention's keys read another model's stream,
    which reaches its queries only through projections, if at all."""
    if q_inputs & k_inputs:
        return True
    for start, goal in ((q_inputs, k_inputs), (k_inputs, q_inputs)):
        seen, frontier = set(start), list(start)
        for _ in range(depth):
            frontier = [p for n in frontier if n not in linear_of and not _is_matmul(n) and op_name(n) not in SDPA
                        for p in n.all_input_nodes if p not in seen]
            if goal & set(frontier):
                return True
            seen.update(frontier)
    return False


def sequence_input(node: Node) -> Node:
    """The (batch, seq, features) tensor a projection reads, before a flattening view (GPT-2's addmm)."""
    while op_name(node) in MOVEMENT and (example_shape(node) or (0, 0, 0)).__len__() < 3 and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _batch_first(x: Node, keys: Node, kv_heads: int) -> bool:
    """Whether the layer input ``x`` holds the batch in dim 0, as the keys do (batch, heads, ...) or
    with batch and heads flattened; not so for a sequence-first input (nn.MultiheadAttention's (L, N, E))."""
    xv, kv = x.meta.get("val"), keys.meta.get("val")
    if not isinstance(xv, torch.Tensor) or not isinstance(kv, torch.Tensor) or xv.ndim < 2:
        return True  # no shapes to tell: as most models are

    def expr(size):
        return size.node.expr if isinstance(size, torch.SymInt) else size

    batch = expr(kv.shape[0]) if kv.ndim == 4 else expr(kv.shape[0]) / kv_heads
    return bool(expr(xv.shape[0]) - batch == 0)


def _kind(att: _Attention) -> str:
    """``"sdpa"``, ``"einsum"`` (a score or values product written as an einsum: Funnel), or ``"matmul"``."""
    if op_name(att.out) in SDPA:
        return "sdpa"
    return "einsum" if any(_einsum_operands(n) is not None for n in (att.out, *(m for _, _, m in att.scores[:1]))) else "matmul"


def _last_dim(node) -> int | None:
    shape = example_shape(node) if isinstance(node, Node) else None
    val = node.meta.get("val") if isinstance(node, Node) else None
    return int(val.shape[-1]) if shape and isinstance(val.shape[-1], int) else (shape[-1] if shape else None)


def _qkv_sources(att: _Attention, sources, x_of):
    q, k, v = sources(att.q), sources(att.k), sources(att.v)
    if len(att.scores) > 1:
        # Several score matmuls (DeBERTa's content and position terms): the content term is the
        # one whose keys read the same input as the values.
        v_inputs = {x_of[s] for s in v}
        for left, right, matmul in att.scores:
            right_src = sources(right)
            if {x_of[s] for s in right_src} & v_inputs:
                q, k = sources(left), right_src
                att.q, att.k, att.scores = left, right, [(left, right, matmul)] + [e for e in att.scores if e[2] is not matmul]
                break
    return q, k, v


# How far _adds_to_residual looks back: the up projections' inputs derive from the residual within
# a norm and casts. 48 nodes back cover a norm written out op by op (RMSNorm with its casts is ~10)
# with room, and stay inside one layer (a layer is hundreds).
_RESIDUAL_DEPTH = 48


def _adds_to_residual(down: Node, up_inputs: list[Node], order, constants, depth: int = _RESIDUAL_DEPTH) -> bool:
    """Whether ``down``'s output, through its output transforms (and sums with parallel sublayers),
    is added to the residual stream the up projections' inputs derive from."""
    ancestors, frontier = set(up_inputs), list(up_inputs)
    for _ in range(depth):
        frontier = [p for n in frontier for p in n.all_input_nodes if p not in ancestors]
        ancestors.update(frontier)
    return _residual_add(down, ancestors, order, constants)[0] is not None


# Ops a sublayer's output may pass on its way to the residual add, besides reshapes and dropout:
# a norm of the sublayer output (Gemma2's post-attention norm, Swin v2's res-post-norm, written out
# op by op or as one op), a scalar or per-channel scale (Granite's residual_multiplier, BEiT's layer
# scale), Swin's cyclic shift (roll). Their other operands must be constants (weights, eps).
_OUTPUT_TRANSFORMS = MOVEMENT | DROPOUT | frozenset(
    """roll mul div add sub neg pow square sqrt rsqrt reciprocal mean var var_mean layer_norm native_layer_norm
    rms_norm _fused_rms_norm""".split())
# A norm written out is ~15 nodes with its casts and reshapes; 64 leaves room and stays in one layer.
_CHAIN_LIMIT = 64
# Sums with other sublayers' outputs (parallel attention and feed-forward) followed to the residual.
_PARALLEL_SUMS = 4


def _constants(nodes) -> set[Node]:
    """Nodes that depend on no graph input: weights and what is computed from them (Gemma's
    ``1 + weight``), and sizes (not tensors)."""
    out: set[Node] = set()
    for node in nodes:
        if node.op == "get_attr" or op_name(node) in METADATA or (
                node.op in ("call_function", "call_method") and all(p in out for p in node.all_input_nodes)):
            out.add(node)
    return out


def _first_add(start: Node, order, constants, limit: int = _CHAIN_LIMIT) -> tuple[Node | None, int, str]:
    """The first add (in graph order) that sums ``start``'s output, through output transforms, with
    a value from elsewhere; the index of that other operand; and, when there is none, why."""
    chain, heap, seen = {start}, [(order[u], u) for u in start.users], set()
    heapq.heapify(heap)
    stop = "it has no users"
    while heap:
        _, node = heapq.heappop(heap)
        if node in seen:
            continue
        seen.add(node)
        name = op_name(node)
        if name not in _OUTPUT_TRANSFORMS:
            stop = f"the output reaches {node.name} ({name or node.op}) before any residual add"
            continue
        # Reshapes and dropout carry their first operand; the rest are sizes, indices and rates.
        values = node.args[:1] if name in MOVEMENT or name in DROPOUT else node.all_input_nodes
        others = [a for a in values if isinstance(a, Node) and a not in chain and a not in constants]
        if name == "mul" and len(others) == 1 and _row_gate(others[0]):
            others = []  # a gate per row (Qwen2-MoE's sigmoid-gated shared expert, routing weights) scales the output
        if not others:
            if len(chain) >= limit:
                return None, -1, f"no residual add within {limit} output transforms"
            chain.add(node)
            for user in node.users:
                heapq.heappush(heap, (order[user], user))
        elif name == "add" and len(node.args) >= 2 and len(others) == 1 and node.args[0] is not node.args[1]:
            return node, (0 if node.args[0] is others[0] else 1), ""
        else:
            stop = f"the output is combined with {others[0].name} at {node.name} ({name})"
    return None, -1, stop


def _row_gate(node: Node) -> bool:
    """Whether ``node`` holds one value per row (its last dim 1, as in a gate of shape (tokens, 1))."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.ndim >= 2 and val.shape[-1] == 1


def _is_stream(node: Node, before: Container[Node]) -> bool:
    """Whether ``node`` is the residual stream a sublayer read: one of its input's ancestors, or
    such an ancestor plus another parallel sublayer's output (Cohere's ``residual + attn + mlp``)."""
    return node in before or (op_name(node) == "add" and any(a in before for a in node.all_input_nodes))


def _residual_add(projection: Node, before: Container[Node], order, constants) -> tuple[Node | None, int, Node | None, bool, str]:
    """The residual add a sublayer's output reaches: (add, index of the residual operand, the
    sublayer's value summed, whether it is the add's own operand, why none was found)."""
    current, tail, direct = projection, None, True
    for _ in range(_PARALLEL_SUMS):
        add, arg, why = _first_add(current, order, constants)
        if add is None:
            return None, -1, None, False, why
        tail = tail if tail is not None else add.args[1 - arg]
        if _is_stream(add.args[arg], before):
            return add, arg, tail, direct, ""
        # A parallel-residual layer sums its sublayers before the residual comes in (GPT-J).
        current, direct = add, False
    return None, -1, None, False, f"no residual add after {_PARALLEL_SUMS} sums with other sublayers"


def _make_sites(roles, linears: dict[str, Linear]) -> list[Site]:
    by_weight: dict[str, list[tuple[str, int, frozenset[int] | None]]] = {}
    for (weight, role), (layer, cols) in roles.items():
        by_weight.setdefault(weight, []).append((role, layer, cols))
    sites = []
    for weight, entries in by_weight.items():
        lin = linears[weight]
        fused = len(entries) > 1 and all(c is not None for _, _, c in entries)
        if len(entries) > 1 and not fused:
            # Several roles but no column split we could follow: one site for the whole projection.
            entries.sort(key=lambda e: _ROLE_ORDER.get(e[0], 99))
            role = "".join(r for r, _, _ in entries) if all(len(r) == 1 for r, _, _ in entries) else entries[0][0]
            sites.append(Site(entries[0][1], role, lin.path, lin.in_features, lin.out_features, lin))
            continue
        for role, layer, cols in entries:
            columns = _as_columns(cols, lin.out_features) if fused else None
            width = lin.out_features if columns is None else len(columns)
            sites.append(Site(layer, role, lin.path, lin.in_features, width, lin, columns))
    return sites


def _as_columns(cols: frozenset[int] | None, width: int) -> Sequence[int] | None:
    if cols is None or len(cols) == width:
        return None
    ordered = sorted(cols)
    if ordered[-1] - ordered[0] + 1 == len(ordered):
        return range(ordered[0], ordered[-1] + 1)
    return tuple(ordered)


# -- residual blocks -------------------------------------------------------------------------

_BLOCK_LOCATIONS = {"o": "mh", "ffn_out": "output"}


@_named_errors
def find_blocks(gm: GraphModule, sites: list[Site], attentions: list[Attention] = (),
                unmatched: list[tuple[Site, str]] | None = None) -> list[Block]:
    """The residual blocks closed by the ``o`` and ``ffn_out`` sites, in graph order.

    The residual add is the first add that sums the projection's output, through output transforms
    whose other operands are constants (dropout, reshapes, a norm of the sublayer output, a scalar
    or per-channel scale), with the residual stream the projection's input derives from (a pooled
    stream, when the sublayer's query was pooled: Funnel). A block is post-LN when the next block's
    residual input is a normalisation of this block's sum; its ``norm`` holds that normalisation's
    nodes, up to where the sequence changes (a pooling or upsampling between blocks is no part of it). The last block of a stack takes the style of the
    others, its normalisation being the chain of nodes every use of the sum runs through. Sites
    whose output reaches no residual add are appended to ``unmatched`` with the reason.
    """
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    order = {n: i for i, n in enumerate(nodes)}
    constants = _constants(nodes)
    # A projection shared by several layers (ALBERT) closes one block per call: its layer is that of
    # the attention before the call.
    att_order = sorted(((order[by_name[a.node]], a.layer) for a in attentions if not a.cross))
    found = []  # (layer, location, add node, residual arg, site, tail, direct)
    for site, projection in ((s, by_name[n]) for s in sites for n in s.linear.nodes):
        location = _BLOCK_LOCATIONS.get(site.role)
        if location is None:
            continue
        if site.linear.conv:
            # Its sum holds channels before the positions (SqueezeBERT's (N, C, L)): the methods
            # placed at blocks (bottleneck, ReFT, prompts) read features last.
            if unmatched is not None:
                unmatched.append((site, f"it is a 1x1 convolution: the residual stream it adds to holds channels in dim "
                                        f"{site.linear.channel_dim}, and adapters at residual blocks need features last"))
            continue
        if len(site.linear.nodes) > 1 and att_order:
            layer = max((l for i, l in att_order if i < order[projection]), default=site.layer)
            site = dataclasses.replace(site, layer=layer)
        # The residual is an input the sublayer itself derives from; a sum with another sublayer's
        # output first (parallel attention and feed-forward) is followed on to the residual add.
        before = _Ancestry(projection.args[LINEAR_OPS[op_name(projection)][0]], order)
        add, arg, tail, direct, why = _residual_add(projection, before, order, constants)
        if add is not None:
            found.append((site.layer, location, add, arg, site, tail, direct))
        elif unmatched is not None:
            unmatched.append((site, why))
    found.sort(key=lambda f: order[f[2]])

    norms: list[tuple[Node, ...] | None] = []  # None: last block of a stack, decided below
    for i, (_, _, add, *_) in enumerate(found):
        nxt = found[i + 1] if i + 1 < len(found) else None
        norms.append(_region(add, nxt[2].args[nxt[3]], order) if nxt else None)
    post_ln = sum(1 for n in norms if n) > sum(1 for n in norms if n == ())
    blocks = []
    for (layer, location, add, residual_arg, site, tail, direct), norm in zip(found, norms):
        if norm is None:
            norm = _last_norm(add, order) if post_ln else ()
        blocks.append(Block(layer, location, add.name, residual_arg, tuple(n.name for n in norm if n.users),
                            site.linear.out_features, site.path, site.weight, add.args[residual_arg].name, tail.name, direct))
    return blocks


# A bound on the ancestors collected for the residual test above: the residual input of a block is
# within its own layer (a few hundred nodes in the layers of the tested architectures), so 2000
# finds it while keeping each search bounded by a layer rather than the whole graph.
_ANCESTOR_LIMIT = 2000


def _ancestors(node: Node, limit: int = _ANCESTOR_LIMIT) -> set[Node]:
    seen, frontier = set(), [node]
    while frontier and len(seen) < limit:
        n = frontier.pop()
        for p in n.all_input_nodes:
            if p not in seen:
                seen.add(p)
                frontier.append(p)
    return seen


class _Ancestry:
    """The ancestors of ``node``, asked one at a time (``x in ancestry``): a backward search that
    never goes above the node asked about in graph order, so a question costs the nodes between the
    two (a residual input is within its layer) and site analysis stays linear in the graph's size."""

    def __init__(self, node: Node, order: dict[Node, int]):
        self.node, self.order = node, order

    def __contains__(self, target: object) -> bool:
        if not isinstance(target, Node) or target not in self.order:
            return False
        lowest, seen, frontier = self.order[target], set(), [self.node]
        while frontier:
            for parent in frontier.pop().all_input_nodes:
                if parent is target:
                    return True
                if parent not in seen and self.order[parent] > lowest:
                    seen.add(parent)
                    frontier.append(parent)
        return False


_PASS_THROUGH = MOVEMENT - SELECTING


def _region(add: Node, residual: Node, order: dict[Node, int]) -> tuple[Node, ...] | None:
    """Nodes on the paths from ``add`` to the next block's residual input; () if they only cast or
    reshape (pre-LN); None if that input does not come from ``add`` or a projection lies between them
    (another stack starts)."""
    if residual is add:
        return ()
    forward, frontier = {add}, [add]
    while frontier:
        for user in frontier.pop().users:
            if user not in forward and order[user] <= order[residual]:
                forward.add(user)
                frontier.append(user)
    if residual not in forward:
        return None
    region, frontier = {residual}, [residual]
    while frontier:
        for parent in frontier.pop().all_input_nodes:
            if parent in forward and parent is not add and parent not in region:
                region.add(parent)
                frontier.append(parent)
    if any(op_name(n) in LINEAR_OPS or _is_matmul(n) for n in region):
        return None  # a projection between the blocks (Swin's patch merging): another stack starts
    ordered = _same_rows(add, sorted(region, key=order.__getitem__))
    if all(op_name(n) in _PASS_THROUGH for n in ordered):
        return ()
    return tuple(ordered)


def _same_rows(add: Node, region: list[Node]) -> list[Node]:
    """The part of ``region`` (in graph order) that keeps the rows of ``add``'s sum: a norm acts on
    each position, a pooling or upsampling step between blocks changes the sequence (Funnel). The
    region is cut where its nodes first hold other rows than the sum (their shape does not start
    with the sum's leading dims); the copies and slices that the cut leaves at its end are dropped,
    so that the norm ends at its own output and the pooling reads the adapted stream."""
    rows = (example_shape(add) or ())[:-1]
    kept: list[Node] = []
    for node in region:
        shape = example_shape(node) if isinstance(node.meta.get("val"), torch.Tensor) else None
        if (shape is None or tuple(shape[:len(rows)]) == rows) and all(p is add or p in kept or p not in region for p in node.all_input_nodes):
            kept.append(node)
    if len(kept) == len(region):
        return region
    while kept and op_name(kept[-1]) in MOVEMENT:
        kept.pop()
    return kept


def _last_norm(add: Node, order: dict[Node, int], limit: int = 64) -> tuple[Node, ...]:
    """The normalisation after the last post-LN block: up to the furthest node that every use of
    ``add`` passes through before anything but elementwise and reduction ops."""
    reached, pending, live = {add}, {add: len(add.users)}, {add}
    best: tuple[Node, ...] = ()
    node = add.next
    for _ in range(limit):
        if node.op in ("output", "root"):
            break
        inputs = [p for p in node.all_input_nodes if p in reached]
        if inputs:
            name = op_name(node)
            if name in SELECTING or _is_matmul(node) or name in SDPA or name in SOFTMAX or name in LINEAR_OPS:
                break
            reached.add(node)
            for p in inputs:
                pending[p] -= 1
                if pending[p] == 0:
                    live.discard(p)
            pending[node] = len(node.users)
            if node.users:
                live.add(node)
            if live == {node}:
                best = tuple(sorted(reached - {add}, key=order.__getitem__))
        node = node.next
    return best
