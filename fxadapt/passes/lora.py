"""LoRA and (IA)^3: insert rules and constant folds.

LoRA at a projection ``y = W x + b``:   ``y + scaling * B (A (dropout(x)))``  (Hu et al., 2021)
(IA)^3 at a projection:                 ``y * (scaling * l)``, or ``W (x * l) + b`` on the input side
Folding into the weight:                ``W + scaling * B A``;  ``diag(l) W`` and ``l * b``;  ``W diag(l)``
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from ..config import LoRAConfig
from ..plan import Placement
from ..sites import Site, sequence_input
from . import METHODS, Emitter, Method, columns_tensor
from .gating import Gate

aten = torch.ops.aten


def _generator(config: LoRAConfig, site: Site) -> torch.Generator | None:
    if config.init_weights_seed is None:
        return None
    # One stream per site, so that sites do not all start from the same numbers.
    return torch.Generator().manual_seed(zlib.crc32(repr((config.init_weights_seed, site.path, site.role)).encode()))


def _dtype(config: LoRAConfig, like: torch.Tensor) -> torch.dtype:
    return getattr(torch, config.dtype) if config.dtype else like.dtype


class LoRAWeights(nn.Module):
    """``lora_A`` (r, in) and ``lora_B`` (out, r) of one site; rank, ``scaling`` (``rank_pattern`` /
    ``alpha_pattern`` per module path) and ``dropout`` from the config."""

    def __init__(self, site: Site, config: LoRAConfig, like: torch.Tensor):
        super().__init__()
        r = config.rank_for(site.path)
        self.scaling = config.scaling_for(site.path)
        self.dropout = float(config.dropout)
        self.cast = config.dtype is not None  # adapter dtype chosen apart from the model's: cast around it
        kw = dict(device=like.device, dtype=torch.float32)
        a = torch.empty(r, site.in_features, **kw)
        b = torch.empty(site.out_features, r, **kw)
        g = _generator(config, site)
        if config.init_weights == "lora":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            nn.init.zeros_(b)
        elif config.init_weights == "bert":
            nn.init.normal_(a, std=0.02, generator=g)
            nn.init.normal_(b, std=0.02, generator=g)
        else:  # "ia3"
            nn.init.ones_(a)
            nn.init.ones_(b)
        dtype = _dtype(config, like)
        self.lora_A = nn.Parameter(a.to(dtype))
        self.lora_B = nn.Parameter(b.to(dtype))
        self.register_buffer("columns", columns_tensor(site.columns), persistent=False)
        # UniPELT: a gate from the layer input replaces the scaling (as in AdapterHub).
        self.gate = Gate(site.in_features, 1, init_bias=False).to(like.device, dtype) if config.use_gating else None

    def delta(self) -> torch.Tensor:
        """``scaling * B A``, shape (out, in), in float32 or wider."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling


class IA3Weights(nn.Module):
    """The (IA)^3 vector ``scale`` of one site (AdapterHub's ``lora_B``), times ``scaling``."""

    def __init__(self, site: Site, config: LoRAConfig, like: torch.Tensor, features: int | None = None):
        super().__init__()
        self.scaling = config.scaling_for(site.path)
        self.cast = config.dtype is not None
        scale = torch.empty(features or site.out_features, device=like.device, dtype=torch.float32)
        if config.init_weights == "ia3":
            nn.init.ones_(scale)
        elif config.init_weights == "bert":
            nn.init.normal_(scale, std=0.02, generator=_generator(config, site))
        else:  # "lora": zeros, as AdapterHub does
            nn.init.zeros_(scale)
        self.scale = nn.Parameter(scale.to(_dtype(config, like)))
        self.register_buffer("columns", columns_tensor(site.columns), persistent=False)

    def vector(self) -> torch.Tensor:
        return self.scale * self.scaling if self.scaling != 1.0 else self.scale


def _build_ia3(site: Site, config: LoRAConfig, like: torch.Tensor) -> IA3Weights:
    # plan.py places the linears of input_scaling_targets on the input side: one value per input feature.
    return IA3Weights(site, config, like, site.in_features if config.matches_input_scaling(site.path) else None)


# -- rewrite rules ----------------------------------------------------------------------------


def insert_lora(e: Emitter, p: Placement, w: LoRAWeights) -> None:
    a, b = e.attr(f"{p.module}.lora_A"), e.attr(f"{p.module}.lora_B")
    # Weights in a dtype of their own (float32 on a half-precision model): as PEFT, the input is cast
    # to it before dropout, the sum is taken in it and rounded to the model's dtype once.
    x = e.call(aten.type_as.default, e.x, a) if w.cast else e.x
    if w.dropout > 0:
        x = e.call(aten.dropout.default, x, e.rate(w.dropout), True)
    delta = e.call(aten.linear.default, e.call(aten.linear.default, x, a), b)
    if w.gate is not None:
        gate_in = sequence_input(e.x)
        if w.cast:
            gate_in = e.call(aten.type_as.default, gate_in, a)
        delta = e.call(aten.mul.Tensor, delta, _gate_rows(e, e.module(f"{p.module}.gate", gate_in), e.x))
    elif w.scaling != 1.0:
        delta = e.call(aten.mul.Tensor, delta, w.scaling)
    if not w.cast:
        e.add_to_columns(delta, p.site, f"{p.module}.columns")
        return
    y = e.y
    e.y = e.call(aten.type_as.default, y, delta)
    e.add_to_columns(delta, p.site, f"{p.module}.columns")
    e.y = e.call(aten.type_as.default, e.y, y)


def _gate_rows(e: Emitter, gate, x):
    """A (batch, 1) gate shaped to scale rows of the projection's output (3-D, or GPT-2's flat 2-D)."""
    x3 = sequence_input(x)
    if x3 is x:
        return e.call(aten.view.default, gate, [-1, 1, 1])
    return e.call(aten.repeat_interleave.self_int, gate, e.call(aten.sym_size.int, x3, 1), 0)


def insert_ia3(e: Emitter, p: Placement, w: IA3Weights) -> None:
    if p.side == "input":
        e.scale_input(f"{p.module}.scale", w.scaling, w.cast)
        return
    scale = e.attr(f"{p.module}.scale")
    if w.scaling != 1.0:
        scale = e.call(aten.mul.Tensor, scale, w.scaling)
    scaled = e.call(aten.mul.Tensor, e.y, e.full_vector(scale, p.site, f"{p.module}.columns", 1.0))
    # A vector in a dtype of their own: the product is taken in the wider dtype and rounded once (as PEFT).
    e.y = e.call(aten.type_as.default, scaled, e.y) if w.cast else scaled


# -- folds ------------------------------------------------------------------------------------


def _rows(site: Site, values: torch.Tensor, fill: float) -> torch.Tensor:
    """Per-output-row values of a (fused) site, spread over all of the projection's rows."""
    if site.columns is None:
        return values
    full = values.new_full((site.linear.out_features, *values.shape[1:]), fill)
    full[torch.as_tensor(list(site.columns), device=values.device)] = values
    return full


def _out_in(weight: torch.Tensor, site: Site) -> torch.Tensor:
    return weight.t() if site.linear.transposed else weight


def _like(weight: torch.Tensor, value_out_in: torch.Tensor, site: Site) -> torch.Tensor:
    value = value_out_in.t() if site.linear.transposed else value_out_in
    return torch.empty_like(weight).copy_(value)


def fold_lora(weight, bias, p: Placement, w: LoRAWeights):
    delta = _rows(p.site, w.delta(), 0.0)
    merged = _out_in(weight, p.site).to(delta.dtype) + delta
    return _like(weight, merged, p.site), bias


def fold_ia3(weight, bias, p: Placement, w: IA3Weights):
    vec = w.vector().to(torch.promote_types(weight.dtype, torch.float32))
    w_oi = _out_in(weight, p.site).to(vec.dtype)
    if p.side == "input":
        return _like(weight, w_oi * vec[None, :], p.site), bias
    full = _rows(p.site, vec, 1.0)
    new_bias = None if bias is None else (bias.to(vec.dtype) * full).to(bias.dtype)
    return _like(weight, w_oi * full[:, None], p.site), new_bias


METHODS["lora"] = Method("lora", LoRAWeights, insert_lora, fold_lora)
METHODS["ia3"] = Method("lora", _build_ia3, insert_ia3, fold_ia3)
