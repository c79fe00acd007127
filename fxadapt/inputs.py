"""What a captured graph takes: :class:`InputSpec` binds a call with the model's own signature to
the graph's inputs, checks them against what the capture allows and casts them as the model would."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import InputError

__all__ = ["InputSpec"]


@dataclass
class InputSpec:
    """What the captured graph takes, and how a call to it is checked and completed."""

    names: tuple[str, ...]
    shapes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)  # fixed sizes (None: dynamic)
    signature: inspect.Signature | None = None  # the model's own forward, to bind positional arguments
    defaults: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    main: str | None = None
    flags: dict[str, tuple] = field(default_factory=dict)  # non-tensor kwargs and the values the capture used
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # each tensor input's dtype in the graph
    sizes: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # dynamic sizes as symbols or expressions (None: fixed)
    bounds: dict[Any, tuple[int, int | None]] = field(default_factory=dict)  # each size symbol's range
    optional: tuple[str, ...] = ()  # inputs a call may leave out (labels): the graph then takes None, as the model does

    def __post_init__(self) -> None:
        # Made once, here: a call's checks then only read plain data (torch.compile traces them).
        self._known = frozenset(self.known())
        self._plan = self._size_plan()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def bind(self, model_name: str, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The graph's inputs from a call with the model's own signature; InputError naming the input,
        what the graph was captured with and what to do when it cannot take them.

        Inputs of another dtype are cast as the model would cast them (a bool or float 0/1
        ``attention_mask`` to the captured integer dtype, any floating input to the captured float
        dtype); sizes are checked against the captured graph's (the model's position limit, lengths
        that must agree between inputs, no empty dimension). Inputs in ``optional`` may be left out
        (the graph gets None: no loss without labels). Keyword-only calls take plain dictionary
        steps (torch.compile traces them whole)."""
        self._check_names(model_name, kwargs)
        values = self._bind_positional(model_name, args, kwargs) if args else dict(kwargs)
        for name in [n for n in values if n not in self.names]:
            value = values.pop(name)
            if value is None or (name in self.flags and not isinstance(value, torch.Tensor) and value in self.flags[name]):
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
                elif name in self.optional:
                    values[name] = None
                    continue
                else:
                    raise InputError(f"{model_name} needs input {name!r} (captured inputs: {', '.join(self.names)})")
            self._check_shape(model_name, name, values[name])
            values[name] = self._cast(model_name, name, values[name])
        self._check_sizes(model_name, values)
        return {name: values[name] for name in self.names}

    def known(self) -> list[str]:
        """Every keyword a call may pass: the graph's inputs, the model's own parameters, the flags."""
        params = [] if self.signature is None else [n for n, p in self.signature.parameters.items()
                                                     if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        return list(dict.fromkeys([*self.names, *params, *self.flags]))

    def _check_names(self, model_name: str, kwargs: dict) -> None:
        for name in kwargs:
            if name not in self._known:
                close = difflib.get_close_matches(name, self.known(), n=1)
                hint = f"did you mean {close[0]}?" if close else "no such input"
                raise InputError(f"{model_name}: {name}: {hint} (captured inputs: {', '.join(self.names)})")

    def forward_signature(self) -> inspect.Signature:
        """The signature the graph's forward shows: its inputs, then the flags a call may repeat
        (so ``torch.export.export(gm, (), kwargs)`` takes the kwargs the model was captured with)."""
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in self.names]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=v[0]) for n, v in self.flags.items()
                   if n not in self.names and v]
        return inspect.Signature(params)

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

    def _cast(self, model_name: str, name: str, value: Any) -> Any:
        """``value`` in the dtype the graph was captured with, where the cast changes no value (bool
        or 0/1 masks to integers) or the model casts it too (floating inputs to its float dtype)."""
        want = self.dtypes.get(name)
        if want is None or not isinstance(value, torch.Tensor) or value.dtype == want:
            return value
        if want.is_complex or value.is_complex():
            raise InputError(f"{model_name}: input {name!r} is {value.dtype}; the captured graph takes {want}: pass it as {want}")
        cast = value.to(want)
        if want.is_floating_point or value.device.type == "meta" or torch.equal(cast.to(value.dtype), value):
            return cast
        raise InputError(f"{model_name}: input {name!r} is {value.dtype} with values {want} cannot hold exactly; the graph was "
                         f"captured with {want} (as the model takes it): pass {name} as {want}")

    def _size_plan(self) -> list[tuple[str, int, list[tuple]]]:
        """The size checks as plain data: per input, its rank and per dynamic dimension
        (dim, symbol or None, lowest, highest, expression of other sizes or None)."""
        return [(name, len(exprs), [(dim, e if e.is_Symbol else None, *self.bounds.get(e, (1, None)), None if e.is_Symbol else e)
                                    for dim, e in enumerate(exprs) if e is not None])
                for name, exprs in self.sizes.items()]

    def _check_sizes(self, model_name: str, values: dict[str, Any]) -> None:
        """Each dynamic size within the range the capture allows, sizes that share a symbol equal,
        sizes given by an expression of other inputs' sizes equal to it."""
        seen: dict[Any, tuple[str, int, int]] = {}
        derived = []
        for name, ndim, dims in self._plan:
            value = values.get(name)
            if not isinstance(value, torch.Tensor) or value.ndim != ndim:
                continue
            shape = value.shape
            for dim, symbol, low, high, expr in dims:
                size = shape[dim]
                if size == 0:
                    raise InputError(f"{model_name}: input {name!r} has shape {tuple(shape)}, empty in dimension {dim}; "
                                     "the captured graph takes at least 1 there (leave empty batches out)")
                if symbol is None:
                    derived.append((name, dim, expr, size))
                    continue
                if high is not None and size > high:
                    raise InputError(f"{model_name}: input {name!r} has {size} in dimension {dim}, the captured graph takes at most {high} "
                                     f"there (the model's limit, e.g. its max_position_embeddings): truncate it to {high}")
                if size < low:
                    raise InputError(f"{model_name}: input {name!r} has {size} in dimension {dim}, the captured graph takes at least {low} there")
                first = seen.setdefault(symbol, (name, dim, size))
                if first[2] != size:
                    raise InputError(f"{model_name}: input {name!r} has {size} in dimension {dim} but {first[0]!r} has {first[2]} in "
                                     f"dimension {first[1]}; the captured graph needs them equal: pass inputs of matching shapes")
        for name, dim, expr, size in derived:
            if expr.free_symbols <= seen.keys():
                want = int(expr.xreplace({sym: seen[sym][2] for sym in expr.free_symbols}))
                if want != size:
                    raise InputError(f"{model_name}: input {name!r} has {size} in dimension {dim}, the captured graph needs {want} there "
                                     f"({expr} in the sizes of the other inputs): pass inputs of matching shapes")
