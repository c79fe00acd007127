"""Front ends: a model becomes a graph, with torch.export (any model with example inputs, and
transformers models without) or torch.fx.symbolic_trace (modules it can trace)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from .errors import CaptureError, InputError
from .passes.dropout import dropout_nodes, make_mode_aware, record_training_rates

__all__ = ["capture", "InputSpec", "transformers_example_inputs"]

_MISSING = object()


@dataclass
class InputSpec:
    """What the captured graph takes, and how a call to it is checked and completed."""

    names: tuple[str, ...]
    shapes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)  # fixed sizes (None: dynamic)
    signature: inspect.Signature | None = None  # the model's own forward, to bind positional arguments
    defaults: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    main: str | None = None
    flags: dict[str, tuple] = field(default_factory=dict)  # non-tensor kwargs and the values the capture used

    def bind(self, model_name: str, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The graph's inputs from a call with the model's own signature; InputError if it cannot.

        Keyword-only calls take plain dictionary steps (torch.compile traces them whole)."""
        values = self._bind_positional(model_name, args, kwargs) if args else dict(kwargs)
        for name in [n for n in values if n not in self.names]:
            value = values.pop(name)
            if value is None or (name in self.flags and value in self.flags[name]):
                continue
            shown = f"<tensor {tuple(value.shape)}>" if isinstance(value, torch.Tensor) else repr(value)
            raise InputError(
                f"{model_name} was captured without {name}={shown}; capture it with "
                f"example_kwargs={{..., {name!r}: ...}} to use that input (captured inputs: {', '.join(self.names)})"
            )
        for name in self.names:
            if values.get(name) is None:
                if name in self.defaults and values.get(self.main) is not None:
                    values[name] = self.defaults[name](values[self.main])
                else:
                    raise InputError(f"{model_name} needs input {name!r} (captured inputs: {', '.join(self.names)})")
            self._check_shape(model_name, name, values[name])
        return {name: values[name] for name in self.names}

    def _bind_positional(self, model_name: str, args: tuple, kwargs: dict) -> dict[str, Any]:
        if self.signature is None:
            if len(args) > len(self.names):
                raise InputError(f"{model_name} takes {len(self.names)} inputs ({', '.join(self.names)}), got {len(args)} positional")
            return {**dict(zip(self.names, args)), **kwargs}
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise InputError(f"{model_name}: {e}") from None
        values = {}
        for name, value in bound.arguments.items():
            if self.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                values.update(value)
            else:
                values[name] = value
        return values

    def _check_shape(self, model_name: str, name: str, value: Any) -> None:
        fixed = self.shapes.get(name)
        if fixed is None or not isinstance(value, torch.Tensor):
            return
        if value.ndim != len(fixed) or any(f is not None and f != s for f, s in zip(fixed, value.shape)):
            want = "x".join("*" if f is None else str(f) for f in fixed)
            raise InputError(
                f"{model_name}: input {name!r} has shape {tuple(value.shape)}, the captured graph takes {want} "
                "(* = any size); capture with example inputs of the shapes you need"
            )


def capture(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
):
    """Capture ``model`` as an :class:`~fxadapt.AdaptedModule` with no adapters yet.

    With example inputs, or for a transformers model (inputs made from ``model.config``), the front
    end is ``torch.export.export(..., strict=False)`` and every dimension of every tensor input stays
    dynamic unless the model fixes it (``dynamic_shapes`` overrides this, in torch.export's format).
    Other modules go through ``torch.fx.symbolic_trace``. The model's mode and config are restored;
    its parameters are shared with the result, not copied.

    >>> import fxadapt, torch
    >>> gm = fxadapt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
    >>> gm(torch.randn(3, 4)).shape
    torch.Size([3, 4])
    """
    from .module import AdaptedModule

    if isinstance(model, AdaptedModule):
        raise CaptureError("this model is already an AdaptedModule: add adapters to it with add_adapter()")
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture() takes an nn.Module, got {type(model).__name__}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs or ())
    kwargs = dict(example_kwargs or {})
    hf = _is_transformers(model)
    spec_defaults: dict = {}
    main = None
    if not args and not kwargs:
        if not hf:
            return AdaptedModule._create(_symbolic_trace(model), None, model)
        kwargs = transformers_example_inputs(model)
        main = model.main_input_name
        spec_defaults = {k: v for k, v in _CALL_DEFAULTS.items() if k in kwargs and k != main}

    # Flags (output_hidden_states=True, ...) are baked into the graph, not made graph inputs.
    constants = {k: v for k, v in kwargs.items() if not any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v))}
    kwargs = {k: v for k, v in kwargs.items() if k not in constants}
    with _capture_mode(model), _bound(model, constants):
        exported = _export(model, args, kwargs, dynamic_shapes)
        train_dropout, train_sdpa = _training_rates(model, args, kwargs, exported)
    make_mode_aware(exported, train_dropout, train_sdpa)

    signature = _signature(model) if hf else None
    spec = InputSpec(
        names=tuple(inspect.signature(exported.forward).parameters),
        shapes=_fixed_shapes(exported),
        signature=signature,
        defaults=spec_defaults,
        main=main,
        flags={**(_TRANSFORMERS_FLAGS if hf else {}), **{k: (v,) for k, v in constants.items()}},
    )
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in inspect.signature(exported.forward).parameters.values()):
        spec = None  # the graph takes *args: calls pass through unchanged
    gm = AdaptedModule._create(exported, spec, model)
    gm._fx_example = (args, kwargs)  # fxadapt.export's default example inputs
    return gm


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


def _is_transformers(model: nn.Module) -> bool:
    return getattr(model, "config", None) is not None and isinstance(getattr(model, "main_input_name", None), str)


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


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
        return {i: auto for i in range(x.ndim)} if isinstance(x, torch.Tensor) else None

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


def _fixed_shapes(gm: GraphModule) -> dict[str, tuple[int | None, ...]]:
    shapes = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            shapes[node.name] = tuple(_static(s) for s in val.shape)
    return shapes


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
