"""Make a captured graph's dropout follow ``.train()`` / ``.eval()``.

A capture bakes dropout's mode in: ``aten.dropout(x, p, False)`` and SDPA's ``dropout_p=0.0`` in eval
mode. This pass routes every dropout rate through one ``DropoutRate`` submodule that returns ``p``
in training mode and ``0.0`` in eval mode, so the graph behaves like the model it came from.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from ..ops import DROPOUT, SDPA, op_name

aten = torch.ops.aten

#: Attribute name of the DropoutRate module on an adapted graph.
RATE_MODULE = "fxadapt_dropout"


class DropoutRate(nn.Module):
    """The dropout rate in effect: ``p`` in training mode, ``0.0`` in eval mode."""

    def forward(self, p: float) -> float:
        return p if self.training else 0.0


def rate(graph: Graph, p: float) -> Node:
    """A node giving dropout rate ``p`` under the module's current mode (insert it where needed)."""
    return graph.call_module(RATE_MODULE, (float(p),))


def dropout_nodes(graph: Graph) -> tuple[list[Node], list[Node]]:
    """The dropout and SDPA nodes of a graph, in order."""
    dropouts = [n for n in graph.nodes if op_name(n) in DROPOUT]
    sdpas = [n for n in graph.nodes if op_name(n) in SDPA]
    return dropouts, sdpas


def _dropout_p(node: Node) -> float:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    return float(p)


def _sdpa_p(node: Node) -> float:
    p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    return float(p) if isinstance(p, (int, float)) else 0.0


def make_mode_aware(gm: GraphModule, train_dropout: list[float] | None = None, train_sdpa: list[float] | None = None) -> None:
    """Rewrite ``gm.graph`` in place so its dropouts follow ``gm.training``.

    ``train_dropout`` and ``train_sdpa`` are the rates the model uses in training mode, one per
    dropout / SDPA node in graph order (recorded by running the model once in training mode);
    without them the rate written in the graph is used, which an eval-mode capture sets to 0 for
    SDPA and for functional dropout that passes ``p=0`` outside training.
    """
    graph = gm.graph
    if not hasattr(gm, RATE_MODULE):
        gm.add_module(RATE_MODULE, DropoutRate())
    dropouts, sdpas = dropout_nodes(graph)
    drop_p = train_dropout if train_dropout is not None and len(train_dropout) == len(dropouts) else [_dropout_p(n) for n in dropouts]
    sdpa_p = train_sdpa if train_sdpa is not None and len(train_sdpa) == len(sdpas) else [_sdpa_p(n) for n in sdpas]

    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    rates: dict[float, Node] = {}

    def rate_node(p: float) -> Node:
        if p not in rates:
            with graph.inserting_before(anchor):
                rates[p] = rate(graph, p)
        return rates[p]

    for node, p in zip(dropouts, drop_p):
        if p > 0:
            node.target = aten.dropout.default
            node.args, node.kwargs = (node.args[0], rate_node(p), True), {}
    for node, p in zip(sdpas, sdpa_p):
        if p > 0:
            args = list(node.args)
            if len(args) > 4:
                args[4] = rate_node(p)
                node.args = tuple(args)
            else:
                node.kwargs = {**node.kwargs, "dropout_p": rate_node(p)}
    graph.lint()
    gm.recompile()


class _RecordRates(torch.overrides.TorchFunctionMode):
    """Records the rates of functional dropout and SDPA calls, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout: list[float] = []
        self.sdpa: list[float] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.nn.functional.dropout, torch.dropout):
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", kwargs.get("train", True))
            self.dropout.append(float(p) if training else 0.0)
        elif func is torch.nn.functional.scaled_dot_product_attention:
            self.sdpa.append(float(args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)))
        return func(*args, **kwargs)


def record_training_rates(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[float], list[float]]:
    """Run ``model`` once in training mode and record its dropout and SDPA rates, changing nothing.

    The RNG state, the buffers (BatchNorm statistics) and the model's mode are restored afterwards.
    """
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    devices = sorted({b.device.index or 0 for b in model.parameters() if b.device.type == "cuda"})
    recorder = _RecordRates()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), recorder:
            model.train()
            model(*args, **kwargs)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    return recorder.dropout, recorder.sdpa
