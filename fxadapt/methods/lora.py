"""LoRA (Hu et al., 2021), AdapterHub's ``LoRAConfig`` with PEFT's rsLoRA and patterns.

At a projection ``y = W x + b``:  ``y + scaling * B (A (dropout(x)))``; with UniPELT's gate, the
gate replaces ``scaling``. Merged:  ``W + scaling * B A``.

Where: the projections of the roles the config asks for (``attn_matrices`` of self- and
cross-attention, ``ffn_in`` / ``ffn_out``), found by dataflow, plus any linear ``targets`` names;
a fused projection (GPT-2's ``c_attn``) gets one LoRA per role, on that role's columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
import zlib

import torch
from torch import nn

import dataclasses

from ..config import IA3Config, LoRAConfig
from ..errors import CheckpointError, SiteError
from ..formats.common import AdapterHubCheckpoint, Converted, put
from ..naming import LORAS, state_key, weights_path
from ..placement import Placement, describe_sites
from ..sites import Anatomy, Linear, Site, sequence_input
from .base import Emitter, Method, columns_tensor
from .gating import Gate

if TYPE_CHECKING:
    from ..module import AdaptedModule

aten = torch.ops.aten


def init_generator(config: LoRAConfig, site: Site) -> torch.Generator | None:
    if config.init_weights_seed is None:
        return None
    # One stream per site, so that sites do not all start from the same numbers.
    return torch.Generator().manual_seed(zlib.crc32(repr((config.init_weights_seed, site.path, site.role)).encode()))


def weights_dtype(config: LoRAConfig, like: torch.Tensor) -> torch.dtype:
    return getattr(torch, config.dtype) if config.dtype else like.dtype


class LoRAWeights(nn.Module):
    """``lora_A`` (r, in) and ``lora_B`` (out, r) of one site; rank, ``scaling`` (``rank_pattern`` /
    ``alpha_pattern`` per module path) and ``dropout`` from the config."""

    label = "LoRA"  # in fxadapt.draw's pictures

    def __init__(self, site: Site, config: LoRAConfig, like: torch.Tensor):
        super().__init__()
        r = config.rank_for(site.path)
        self.scaling = config.scaling_for(site.path)
        self.dropout = float(config.dropout)
        self.cast = config.dtype is not None  # adapter dtype chosen apart from the model's: cast around it
        kw = dict(device=like.device, dtype=torch.float32)
        a = torch.empty(r, site.in_features, **kw)
        b = torch.empty(site.out_features, r, **kw)
        g = init_generator(config, site)
        if config.init_weights == "lora":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            nn.init.zeros_(b)
        elif config.init_weights == "bert":
            nn.init.normal_(a, std=0.02, generator=g)
            nn.init.normal_(b, std=0.02, generator=g)
        else:  # "ia3"
            nn.init.ones_(a)
            nn.init.ones_(b)
        dtype = weights_dtype(config, like)
        self.lora_A = nn.Parameter(a.to(dtype))
        self.lora_B = nn.Parameter(b.to(dtype))
        self.register_buffer("columns", columns_tensor(site.columns), persistent=False)
        # UniPELT: a gate from the layer input replaces the scaling (as in AdapterHub).
        self.gate = Gate(site.in_features, 1, init_bias=False).to(like.device, dtype) if config.use_gating else None

    def delta(self) -> torch.Tensor:
        """``scaling * B A``, shape (out, in), in float32 or wider."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling


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


# -- folds ------------------------------------------------------------------------------------


def spread_rows(site: Site, values: torch.Tensor, fill: float) -> torch.Tensor:
    """Per-output-row values of a (fused) site, spread over all of the projection's rows."""
    if site.columns is None:
        return values
    full = values.new_full((site.linear.out_features, *values.shape[1:]), fill)
    full[torch.as_tensor(list(site.columns), device=values.device)] = values
    return full


def out_in(weight: torch.Tensor, site: Site) -> torch.Tensor:
    return weight.t() if site.linear.transposed else weight


def as_weight(weight: torch.Tensor, value_out_in: torch.Tensor, site: Site) -> torch.Tensor:
    value = value_out_in.t() if site.linear.transposed else value_out_in
    return torch.empty_like(weight).copy_(value)


def fold_lora(weight, bias, p: Placement, w: LoRAWeights):
    delta = spread_rows(p.site, w.delta(), 0.0)
    merged = out_in(weight, p.site).to(delta.dtype) + delta
    return as_weight(weight, merged, p.site), bias


# -- where ---------------------------------------------------------------------------------


def site_path(name: str, site: Site) -> str:
    """Where the weights of adapter ``name`` at a site live: ``<linear>.loras.<name>[.<role>]``."""
    return weights_path(LORAS, name, site.path, site.role if site.columns is not None else "")


def select_sites(config: LoRAConfig, anatomy: Anatomy) -> list[Site]:
    """The sites of the roles the config asks for, and the linears its targets name (a whole-linear
    target replaces the per-role parts of the same fused projection); ``leave_out`` layers left out."""
    sites, linears, model_name = anatomy.sites, anatomy.linears, anatomy.model_name
    roles: set[str] = set()
    if config.selfattn_lora:
        roles |= set(config.attn_matrices) | {"cross_" + m for m in config.attn_matrices}
    if config.intermediate_lora:
        roles.add("ffn_in")
    if config.output_lora:
        roles.add("ffn_out")
    present = {s.role for s in sites} | {letter for s in sites if s.role and _fused_unknown(s) for letter in s.role}
    missing = sorted(r for r in roles if r not in present and not r.startswith("cross_"))
    if missing:
        raise SiteError(
            f"{type(config).__name__} asks for role(s) {missing} but {model_name} has none; "
            f"its sites: {describe_sites(sites)}. Use targets= to pick linears by module path."
        )

    def wanted(site: Site) -> bool:
        if site.layer is not None and site.layer in config.leave_out:
            return False
        if _fused_unknown(site):
            return any(letter in roles for letter in site.role)
        return site.role in roles

    chosen = [s for s in sites if wanted(s)]
    for field, matches in (("targets", config.matches_target), ("input_scaling_targets", config.matches_input_scaling)):
        if getattr(config, field) is None:
            continue
        matched = [lin for lin in linears.values() if matches(lin.path)]
        if not matched:
            raise SiteError(
                f"{field}={getattr(config, field)!r} matches no linear of {model_name}; its linears: "
                + ", ".join(sorted(linears)[:40])
            )
        by_weight = {s.weight: s for s in sites if s.columns is None}
        for lin in matched:
            site = by_weight.get(lin.weight) or Site(_layer_of(lin, sites), None, lin.path, lin.in_features, lin.out_features, lin)
            if site.layer is not None and site.layer in config.leave_out:
                continue
            # A whole-linear target replaces per-role parts of the same fused projection.
            chosen = [s for s in chosen if s.weight != lin.weight] + [site]
    if not chosen:
        raise SiteError(f"{type(config).__name__} selects no site of {model_name} (leave_out={list(config.leave_out)}); its sites: {describe_sites(sites)}")
    return chosen


def _fused_unknown(site: Site) -> bool:
    # A projection feeding several attention operands through a layout we could not follow.
    return site.role is not None and len(site.role) > 1 and set(site.role) <= {"q", "k", "v"}


def _layer_of(lin: Linear, sites: list[Site]) -> int | None:
    return next((s.layer for s in sites if s.weight == lin.weight), None)


def place(name: str, config: LoRAConfig, anatomy: Anatomy) -> list[Placement]:
    return [Placement(name, "lora", s, site_path(name, s), config) for s in select_sites(config, anatomy)]


def gate_location(p: Placement) -> str:
    """AdapterHub's gate location of a LoRA: by the role of its projection."""
    role = p.site.role if p.site is not None else None
    return {"ffn_in": "intermediate_lora", "ffn_out": "output_lora"}.get(role, "selfattn_lora")


# -- AdapterHub checkpoints ----------------------------------------------------------------


def read_adapterhub(gm: AdaptedModule, ckpt: AdapterHubCheckpoint) -> Converted:
    """AdapterHub LoRA and (IA)^3: ``<module>.loras.<name>.lora_A`` (r, in) / ``lora_B`` (out, r), or
    for (IA)^3 ``lora_B`` (out, 1). A fused projection (GPT-2's ``c_attn``) stores its roles' parts
    stacked in column order: A's rows and B's rows split evenly between fxadapt's per-role sites.
    DoRA (``use_dora``) and VeRA (``vera_d`` / ``vera_b``) checkpoints, of the same architecture
    "lora", are read by :mod:`.dora` and :mod:`.vera` (AdapterHub computes both differently from PEFT)."""
    c = ckpt.config
    if c.get("use_dora", False) is True and c.get("composition_mode", "add") == "add":
        from .dora import read_adapterhub as read_dora
        return read_dora(gm, ckpt)
    if (c.get("vera_d") is not None or c.get("vera_b") is not None) and c.get("composition_mode", "add") == "add":
        from .vera import read_adapterhub as read_vera
        return read_vera(gm, ckpt)
    ia3 = c.get("composition_mode") == "scale"
    return convert_adapterhub(gm, ckpt, IA3Config if ia3 else LoRAConfig, c)[0]


def convert_adapterhub(gm: AdaptedModule, ckpt: AdapterHubCheckpoint, cls: type[LoRAConfig],
                       fields: dict) -> tuple[Converted, dict[str, Placement]]:
    """The LoRA-style conversion: a ``cls`` config of ``fields`` (AdapterHub's, unknown ones dropped) and
    ``ckpt.tensors`` (``<module>.loras.<name>.<param>``) keyed by the placements' state keys, with the
    placement of each key. The DoRA and VeRA readers hand it tensors already renamed to fxadapt's params."""
    ia3 = fields.get("composition_mode") == "scale"
    known = {f.name for f in dataclasses.fields(cls)}
    config = ckpt.make_config(cls, **{k: v for k, v in fields.items() if k in known})
    grouped, rest = ckpt.modules(gm, LORAS)
    placements = ckpt.placements(place, gm, config)
    layer_of = {s.path: s.layer for s in gm._fx_sites}
    if {p.site.path for p in placements} != set(grouped) and {p.site.layer for p in placements} == {layer_of.get(m) for m in grouped}:
        # AdapterHub picks modules by per-model tables (Llama's "intermediate" LoRA is down_proj): take the
        # file's modules as targets, when they cover the same layers (else the checks report what is missing).
        config = config.replace(selfattn_lora=False, intermediate_lora=False, output_lora=False, targets=tuple(sorted(grouped)))
        placements = ckpt.placements(place, gm, config)
    tensors, sources = dict(rest), {k: k for k in rest}
    where: dict[str, Placement] = {}
    by_path: dict[str, list[Placement]] = {}
    for p in placements:
        by_path.setdefault(p.site.path, []).append(p)
    for path, params in grouped.items():
        parts = sorted(by_path.get(path, []), key=lambda p: min(p.site.columns) if p.site.columns is not None else 0)
        for param, (key, tensor) in params.items():
            ours = "scale" if ia3 and param == "lora_B" else param
            if ours == "scale" and tensor.ndim == 2 and tensor.shape[1] == 1:
                tensor = tensor.reshape(-1)
            if len(parts) > 1 and tensor.shape[0] % len(parts):
                raise CheckpointError(f"{ckpt.weights_path}: tensor {key} of shape {tuple(tensor.shape)} does not split into "
                                      f"{len(parts)} roles of {path}", path=ckpt.weights_path, tensor=key)
            chunks = tensor.split(tensor.shape[0] // len(parts)) if len(parts) > 1 else [tensor]
            for p, chunk in zip(parts or [None], chunks):
                k = key if p is None else state_key(p.module, "adapter", ours)
                put(tensors, sources, k, chunk, key, ckpt.weights_path)
                if p is not None:
                    where[k] = p
    return Converted(ckpt.name, config, tensors, ckpt.weights_path, sources), where


METHOD = Method("lora", "lora", LoRAWeights, insert_lora, place, fold_lora, gate_location=gate_location, adapterhub=read_adapterhub)
