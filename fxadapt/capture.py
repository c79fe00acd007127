"""Front ends: a model becomes a graph, with torch.export (any model with example inputs, and
transformers models without) or torch.fx.symbolic_trace (modules it can trace)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.fx import GraphModule
from torch.fx.graph import _PyTreeCodeGen
from torch.utils import _pytree as pytree

from .errors import CaptureError
from .inputs import InputSpec
from .ops import op_name
from .passes.dropout import dropout_nodes, make_mode_aware, record_training_rates

__all__ = ["capture", "trace", "Captured", "InputSpec", "transformers_example_inputs"]

_MISSING = object()


@dataclass(frozen=True)
class Captured:
    """What the capture stage gives: the model's graph, the signature its calls are checked and bound
    by (None: calls pass through unchanged), the model it came from (its parameters are the graph's),
    and the example inputs it ran on (None for a symbolic trace)."""

    graph: GraphModule
    inputs: InputSpec | None
    model: nn.Module
    example: tuple[tuple, dict] | None = None


def capture(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
):
    """Capture ``model`` as an :class:`~fxadapt.AdaptedModule` with no adapters yet (:func:`trace`,
    then the module that holds adapters around the graph).

    With example inputs, or for a transformers model (inputs made from ``model.config``), the front
    end is ``torch.export.export(..., strict=False)`` and every dimension of every tensor input stays
    dynamic unless the model fixes it (``dynamic_shapes`` overrides this, in torch.export's format).
    Other modules go through ``torch.fx.symbolic_trace``. The model's mode and config are restored;
    its parameters are shared with the result, not copied. A transformers model whose forward takes
    ``use_cache`` is captured with ``use_cache=False`` unless the example kwargs set it (no KV cache in
    the outputs, encoder-decoders included). Inputs that only the loss reads (``labels``) may be left
    out of later calls; the loss is then None, as the model gives it.

    >>> import fxadapt, torch
    >>> gm = fxadapt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
    >>> gm(torch.randn(3, 4)).shape
    torch.Size([3, 4])
    """
    from .module import AdaptedModule  # the stage below knows nothing of the module built on it

    if isinstance(model, AdaptedModule):
        raise CaptureError("this model is already an AdaptedModule: add adapters to it with add_adapter()")
    return AdaptedModule.from_captured(trace(model, example_inputs, example_kwargs, dynamic_shapes=dynamic_shapes))


def trace(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
) -> Captured:
    """The capture stage: ``model`` as a graph with its input spec (see :func:`capture` for the
    front ends and what is captured)."""
    if hasattr(model, "_fx_adapters"):
        raise CaptureError("this model is already an AdaptedModule: add adapters to it with add_adapter()")
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture() takes an nn.Module, got {type(model).__name__}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs or ())
    kwargs = dict(example_kwargs or {})
    # torch.export guards on the base of an input that is a view (``ids[:, :8]``), which later inputs lack,
    # and makes one graph input of a tensor passed twice (``labels=ids``), which later calls need not do.
    seen: set[int] = set()

    def own(t: torch.Tensor) -> torch.Tensor:
        again = id(t) in seen
        seen.add(id(t))
        return t.clone() if again or t._is_view() else t

    args, kwargs = pytree.tree_map_only(torch.Tensor, own, (args, kwargs))
    hf = _is_transformers(model)
    spec_defaults: dict = {}
    main = None
    if not args and not kwargs:
        if not hf:
            return Captured(_symbolic_trace(model), None, model)
        kwargs = transformers_example_inputs(model)
        main = model.main_input_name
        spec_defaults = {k: v for k, v in _CALL_DEFAULTS.items() if k in kwargs and k != main}
    elif hf and not args and "input_ids" in kwargs and "attention_mask" not in kwargs and _takes(model, "attention_mask"):
        # Example kwargs without a mask (``input_ids`` and ``labels``, say): capture with one of ones, which is
        # what the model assumes without it, so that calls may still pass one.
        kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
        main, spec_defaults = "input_ids", {"attention_mask": _CALL_DEFAULTS["attention_mask"]}

    # Flags (output_hidden_states=True, ...) are baked into the graph, not made graph inputs.
    constants = {k: v for k, v in kwargs.items() if not any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v))}
    if hf and "use_cache" not in kwargs and _takes(model, "use_cache"):
        # A captured forward serves training and scoring, which have no use for a KV cache; the config's
        # use_cache does not reach every stack (T5's decoder keeps its own copy), the argument does.
        constants["use_cache"] = False
    kwargs = {k: v for k, v in kwargs.items() if k not in constants}
    with _capture_mode(model), _bound(model, constants):
        exported = _export(model, args, kwargs, dynamic_shapes)
        train_dropout, train_sdpa = _training_rates(model, args, kwargs, exported)
    make_mode_aware(exported, train_dropout, train_sdpa)
    optional = _split_loss(exported, _signature(model))

    signature = _signature(model) if hf else None
    sizes, bounds = _dynamic_sizes(exported)
    spec = InputSpec(
        names=tuple(inspect.signature(exported.forward).parameters),
        shapes=_fixed_shapes(exported),
        dtypes=_input_dtypes(exported),
        sizes=sizes,
        bounds=bounds,
        signature=signature,
        defaults=spec_defaults,
        main=main,
        flags={**(_TRANSFORMERS_FLAGS if hf else {}), **{k: (v,) for k, v in constants.items()}},
        optional=optional,
    )
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in inspect.signature(exported.forward).parameters.values()):
        spec = None  # the graph takes *args: calls pass through unchanged
    elif type(exported.graph._codegen) is _PyTreeCodeGen:
        exported.graph._codegen.__class__ = _FlagsCodeGen  # the same generator; see _FlagsCodeGen
    return Captured(exported, spec, model, (args, kwargs))


# What transformers models do with these inputs when they are omitted.
_CALL_DEFAULTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "attention_mask": torch.ones_like,
    "token_type_ids": torch.zeros_like,
}
# Flags a transformers model is captured with; a call may repeat these values.
_TRANSFORMERS_FLAGS = {
    "use_cache": (False,),
    "return_dict": (True,),
    "output_attentions": (False,),
    "output_hidden_states": (False,),
}


class _FlagsCodeGen(_PyTreeCodeGen):
    """The captured graph's code generator with one change, for ``torch.export.export(gm, (), kwargs)``
    with the kwargs of the capture: torch.export runs a GraphModule on the kwargs' values in order, so
    values that are no tensor (flags the capture baked in, e.g. ``use_cache=False``) are left out when
    there are more values than the graph has inputs."""

    def process_inputs(self, *inputs: Any) -> Any:
        """The flat inputs of the graph, flag values left out."""
        flat = super().process_inputs(*inputs)
        count = len(self.pytree_info.orig_args) if self.pytree_info is not None else len(flat)
        if len(flat) > count:
            tensors = [x for x in flat if isinstance(x, torch.Tensor)]
            if len(tensors) == count:
                return tensors
        return flat


def _is_transformers(model: nn.Module) -> bool:
    return getattr(model, "config", None) is not None and isinstance(getattr(model, "main_input_name", None), str)


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _takes(model: nn.Module, name: str) -> bool:
    """Whether the model's forward has a parameter ``name``."""
    signature = _signature(model)
    return signature is not None and name in signature.parameters


def transformers_example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """Example inputs for a transformers model, made from its config and ``main_input_name``."""
    cfg, main = model.config, model.main_input_name
    params = inspect.signature(model.forward).parameters
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    if main == "input_ids":
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        vocab = getattr(text, "vocab_size", None)
        if not vocab:
            raise CaptureError(f"{type(model).__name__}: its config has no vocab_size; pass example_kwargs={{'input_ids': ...}}")
        ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
        inputs = {"input_ids": ids}
        if "attention_mask" in params:
            inputs["attention_mask"] = torch.ones_like(ids)
        if "token_type_ids" in params and getattr(text, "type_vocab_size", 0):
            # Segment embeddings: None and zeros mean the same (not so for GPT-2's token_type_ids).
            inputs["token_type_ids"] = torch.zeros_like(ids)
        if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            inputs["decoder_input_ids"] = ids.clone()
        return inputs
    if main == "pixel_values":
        vision = getattr(cfg, "vision_config", None) or cfg
        size = getattr(vision, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        channels = getattr(vision, "num_channels", 3)
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        return {"pixel_values": torch.randn(batch, channels, height, width, generator=generator).to(device, dtype)}
    raise CaptureError(
        f"{type(model).__name__} takes {main!r}; fxadapt makes example inputs for input_ids and pixel_values "
        f"models only: pass example_kwargs={{{main!r}: <a tensor the model accepts>}}"
    )


@contextlib.contextmanager
def _capture_mode(model: nn.Module):
    """Eval mode and, for transformers decoders, ``use_cache=False``; both restored afterwards."""
    was_training = model.training
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", _MISSING) if cfg is not None else _MISSING
    model.eval()
    if use_cache is not _MISSING:
        cfg.use_cache = False
    try:
        yield
    finally:
        model.train(was_training)
        if use_cache is not _MISSING:
            cfg.use_cache = use_cache


@contextlib.contextmanager
def _bound(model: nn.Module, constants: dict):
    """``model.forward`` with these keyword arguments fixed (its signature kept for torch.export)."""
    if not constants:
        yield
        return
    own = model.__dict__.get("forward")
    forward = model.forward

    @functools.wraps(forward)
    def bound(*args, **kwargs):
        return forward(*args, **kwargs, **constants)

    model.forward = bound
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def _auto_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict):
    auto = torch.export.Dim.AUTO

    def spec(x):
        if not isinstance(x, torch.Tensor):
            return None
        if x.is_floating_point() and x.ndim >= 4:
            # Images (and video) keep their spatial sizes, only the batch is dynamic: vision models fix
            # them (patch grids, position tables), and a symbolic window partition (Swin) costs torch.export
            # minutes. dynamic_shapes makes them dynamic where a model allows it.
            return {0: auto}
        return {i: auto for i in range(x.ndim)}

    signature = _signature(model)
    if signature is None:
        return None
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(f"the example inputs do not fit {type(model).__name__}.forward: {e}") from None
    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes) -> GraphModule:
    if dynamic_shapes is None:
        dynamic_shapes = _auto_dynamic_shapes(model, args, kwargs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch.export raises many types; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {first}\n"
            "Pass example_inputs / example_kwargs that run the model (decoders: with use_cache=False), "
            "or dynamic_shapes in torch.export's format if a dimension must stay fixed."
        ) from e
    with warnings.catch_warnings():  # torch 2.6 warns about its own constant attributes while unlifting them
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*does not reference an nn.Module, nn.Parameter, or buffer", category=UserWarning)
        return program.module()


def _training_rates(model, args, kwargs, exported: GraphModule):
    """Training-mode dropout rates, when the eval capture lost some (SDPA's dropout_p, F.dropout(p=0))."""
    dropouts, sdpas = dropout_nodes(exported.graph)
    lost = any(float(n.args[1] if len(n.args) > 1 else 0.0) == 0.0 for n in dropouts) or bool(sdpas)
    if not lost:
        return None, None
    try:
        train_dropout, train_sdpa = record_training_rates(model, args, kwargs)
    except Exception as e:  # a model that cannot run in training mode keeps the captured rates
        warnings.warn(f"fxadapt: could not run {type(model).__name__} in training mode to read its dropout rates ({e})")
        return None, None
    if len(train_dropout) != len(dropouts) or len(train_sdpa) != len(sdpas):
        warnings.warn(
            f"fxadapt: {type(model).__name__} runs a different number of dropout/attention calls in training mode; "
            "dropout rates that the eval-mode capture set to 0 stay 0 in .train()"
        )
    return train_dropout, train_sdpa


LOSS_PART = "_fx_loss"


class _LossPart(nn.Module):
    """The part of a captured graph that only the loss inputs (``labels``...) feed: it runs when
    every one of them is given and gives None for each of its outputs otherwise, as the model
    returns no loss without labels."""

    def __init__(self, part: GraphModule, optional: int, outputs: int):
        super().__init__()
        self.part, self.optional, self.outputs = part, optional, outputs

    def forward(self, *inputs: Any) -> tuple:
        if any(x is None for x in inputs[: self.optional]):
            return (None,) * self.outputs
        return tuple(self.part(*inputs))


def _split_loss(gm: GraphModule, signature: inspect.Signature | None) -> tuple[str, ...]:
    """Make optional the graph inputs that the model's signature has optional (default None) and
    that feed only outputs named ``loss`` (``labels``; a QA model's ``start_positions`` and
    ``end_positions``): the nodes they reach move into one ``call_module`` (:class:`_LossPart`),
    which gives None without them. The loss stays the model's own ops, as captured; the rest of
    the graph does not change. Returns the names of the inputs made optional.

    Inputs that also feed other outputs (an encoder-decoder captured with ``labels`` and no
    ``decoder_input_ids`` shifts the labels into the decoder) stay required. The capture's shape
    guards on these inputs (and torch.export's guard function, which takes every input) run with
    the loss part only; the InputSpec's own size checks run on every call."""
    out_spec = getattr(gm, "_out_spec", None)
    if signature is None or out_spec is None:
        return ()
    graph = gm.graph
    output = graph.output_node()
    leaves = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    if len(leaves) != out_spec.num_leaves:
        return ()
    paths = [path for path, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(len(leaves))), out_spec))[0]]
    loss = {leaf for leaf, path in zip(leaves, paths) if path and getattr(path[-1], "key", getattr(path[-1], "name", None)) == "loss"}

    def reach(start: torch.fx.Node) -> set[torch.fx.Node]:
        found = {start}
        for node in graph.nodes:  # topological order: one pass finds every node that depends on start
            if node.op != "output" and any(a in found for a in node.all_input_nodes):
                found.add(node)
        return found

    params = signature.parameters
    kept, moved = [], set()
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in params and params[node.name].default is None:
            nodes = reach(node)
            outs = {leaf for leaf in leaves if leaf in nodes}
            if outs and outs <= loss:
                kept.append(node)
                moved |= nodes
    if not kept:
        return ()
    # The loss part as its own graph: the optional inputs, then the values it reads from the rest.
    body = [n for n in graph.nodes if n in moved and n.op != "placeholder"]
    boundary = list(dict.fromkeys(a for n in body for a in n.all_input_nodes if a not in moved))
    results = [leaf for leaf in dict.fromkeys(leaves) if leaf in moved]
    part, env = torch.fx.Graph(), {}
    for node in [*kept, *boundary]:
        env[node] = part.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in body:
        env[node] = part.node_copy(node, env.__getitem__)
    part.output(tuple(env[r] for r in results))
    gm.add_module(LOSS_PART, _LossPart(GraphModule(gm, part, "LossPart"), len(kept), len(results)))
    with graph.inserting_before(output):
        call = graph.call_module(LOSS_PART, tuple([*kept, *boundary]))
        for i, result in enumerate(results):
            item = graph.call_function(operator.getitem, (call, i))
            item.meta = dict(result.meta)
            result.replace_all_uses_with(item, delete_user_cb=lambda user: user is output)
    for node in reversed(body):
        graph.erase_node(node)
    gm.recompile()
    return tuple(n.name for n in kept)


def _fixed_shapes(gm: GraphModule) -> dict[str, tuple[int | None, ...]]:
    shapes = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            shapes[node.name] = tuple(_static(s) for s in val.shape)
    return shapes


def _input_dtypes(gm: GraphModule) -> dict[str, torch.dtype]:
    return {n.name: n.meta["val"].dtype for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)}


def _dynamic_sizes(gm: GraphModule) -> tuple[dict[str, tuple], dict]:
    """Each tensor input's dynamic sizes as sympy symbols or expressions (None where fixed), and each
    symbol's range. The lower bound is at least 1: torch.export reports 2 for sizes it keeps apart
    from 0 and 1, and the graph runs at 1."""
    sizes, bounds = {}, {}
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if not isinstance(val, torch.Tensor):
            continue
        exprs = []
        for s in val.shape:
            expr = s.node.expr if isinstance(s, torch.SymInt) and not s.node.expr.is_number else None
            exprs.append(expr)
            if expr is not None and expr.is_Symbol:
                vr = s.node.shape_env.var_to_range.get(expr)
                low = int(vr.lower) if vr is not None and vr.lower.is_Integer else 1
                high = int(vr.upper) if vr is not None and vr.upper.is_Integer else None
                bounds[expr] = (max(1, low if low > 2 else 1), high)
        sizes[node.name] = tuple(exprs)
    _position_limits(gm, bounds)
    return sizes, bounds


# Ops between an arange of positions and the embedding lookup that keep its values (plus a constant offset).
_INDEX_OPS = frozenset("unsqueeze view reshape _unsafe_view expand clone contiguous to _to_copy type_as add sub".split())


def _position_limits(gm: GraphModule, bounds: dict) -> None:
    """Positions that the model computes with ``arange`` over an input's length and looks up in an
    embedding table (GPT-2's ``wpe``): that length is at most the table's rows less the offset. torch.export
    records no such bound (the lookup is data dependent); a longer input would fail inside the graph."""
    for node in gm.graph.nodes:
        if op_name(node) != "embedding" or len(node.args) < 2:
            continue
        weight, x, offset = node.args[0], node.args[1], 0
        while isinstance(x, torch.fx.Node) and op_name(x) in _INDEX_OPS:
            if op_name(x) in ("add", "sub"):
                if not isinstance(x.args[1], int) or isinstance(x.args[1], bool):
                    break
                offset += x.args[1] if op_name(x) == "add" else -x.args[1]
            x = x.args[0]
        if not isinstance(x, torch.fx.Node) or op_name(x) != "arange" or not 1 <= len(x.args) <= 2:
            continue
        start, end = (0, x.args[0]) if len(x.args) == 1 else x.args
        size = end.meta.get("val") if isinstance(end, torch.fx.Node) else None
        table = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
        if not (isinstance(start, int) and isinstance(size, torch.SymInt) and size.node.expr.is_Symbol and isinstance(table, torch.Tensor)):
            continue
        expr = size.node.expr
        low, high = bounds.get(expr, (1, None))
        limit = int(table.shape[0]) - offset - start
        bounds[expr] = (low, limit if high is None else min(high, limit))


def _static(size) -> int | None:
    if isinstance(size, torch.SymInt):
        return int(size.node.expr) if size.node.expr.is_number else None
    return int(size)


class _Tracer(torch.fx.Tracer):
    # Trace into torch.nn modules too, so linears appear as F.linear on their weight like in aten graphs.
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return False


def _symbolic_trace(model: nn.Module) -> GraphModule:
    was_training = model.training
    model.eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        raise CaptureError(
            f"{type(model).__name__} has no example inputs and torch.fx.symbolic_trace could not trace it "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
            "pass example_inputs=(...) or example_kwargs={...} so fxadapt can capture it with torch.export"
        ) from e
    finally:
        model.train(was_training)
    gm = GraphModule(model, graph, type(model).__name__)
    make_mode_aware(gm)
    return gm
