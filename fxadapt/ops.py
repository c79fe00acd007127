"""What an FX node computes, in one vocabulary for torch.export (aten) and symbolic_trace (torch) graphs."""

from __future__ import annotations

import torch
from torch.fx import Node

aten = torch.ops.aten


def op_name(node: Node) -> str:
    """``"linear"`` for ``aten.linear.default``, ``F.linear`` and ``x.linear``; ``""`` for other node kinds."""
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return ""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    name = packet.__name__ if packet is not None else getattr(target, "__name__", "")
    # In-place variants compute what their functional ops do (add_ is add).
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


# Ops through which a linear's output columns move unchanged (values are only reordered or selected).
MOVEMENT = frozenset(
    """view reshape _unsafe_view transpose permute t contiguous clone expand expand_as unsqueeze squeeze
    split split_with_sizes chunk getitem slice select unbind narrow alias detach flatten unflatten movedim
    swapaxes view_as reshape_as to _to_copy type_as float half bfloat16 lift_fresh_copy index""".split()
)
# Movement ops that drop part of their input, so a consumer may see only some columns.
SELECTING = frozenset("split split_with_sizes chunk getitem slice select unbind narrow index".split())
# Dtype conversions: identity on the column-index tensors we push through movement chains.
CASTS = frozenset("to _to_copy type_as float half bfloat16".split())
ACTIVATIONS = frozenset(
    """gelu relu silu sigmoid tanh erf elu selu celu leaky_relu mish hardswish hardsigmoid hardtanh
    softplus relu6 glu prelu gelu_ quick_gelu""".split()
)
SOFTMAX = frozenset({"softmax", "_softmax", "_safe_softmax", "log_softmax"})
MATMUL = frozenset({"matmul", "bmm", "mm", "baddbmm", "__matmul__"})
SDPA = frozenset({"scaled_dot_product_attention"})
DROPOUT = frozenset({"dropout", "feature_dropout", "alpha_dropout"})
# Ops that read a tensor's metadata (sizes, dtype), not its values.
METADATA = frozenset({"size", "sym_size", "sym_numel", "sym_stride", "dim", "numel", "getattr", "_assert_tensor_metadata"})


def concrete(value):
    """An int for a SymInt (free symbols set to 2, a size that never specialises), lists element-wise."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return int(expr.xreplace({s: 2 for s in expr.free_symbols}))
    if isinstance(value, (list, tuple)):
        return type(value)(concrete(v) for v in value)
    return value


def example_shape(node: Node) -> tuple[int, ...] | None:
    """The node's output shape with symbolic sizes made concrete, or None when the graph has no shapes."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(concrete(s) for s in val.shape)
    return None


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph`` with the same node names (placements refer to nodes by name); the code
    generator (pytree specs) is shared."""
    new = torch.fx.Graph(tracer_cls=graph._tracer_cls)
    value, old_output = new.graph_copy(graph, {}, return_output_node=True)
    new.output(value, type_expr=getattr(old_output, "type", None)).meta.update(old_output.meta)
    new._codegen = graph._codegen
    return new
