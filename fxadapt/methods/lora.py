"""LoRA (Hu et al., 2021), AdapterHub's ``LoRAConfig`` with PEFT's rsLoRA and patterns.

At a projection ``y = W x + b``:  ``y + scaling * B (A (dropout(x)))``; with UniPELT's gate, the
gate replaces ``scaling``. Merged:  ``W + scaling * B A``.

Where: the projections of the roles the config asks for (``attn_matrices`` of self- and
cross-attention, ``ffn_in`` / ``ffn_out``), found by dataflow, plus any linear ``targets`` names;
a fused projection (GPT-2's ``c_attn``) gets one LoRA per role, on that role's columns. A mixture of
experts' 3-D weight (E, out, in) gets one LoRA per expert, A (E, r, in) and B (E, out, r), computed
by the graph's own grouped matmul (same offsets) or indexing (same expert ids): PEFT's
``target_parameters``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import dataclasses
import math
import re
import zlib

import torch
from torch import nn
from torch.fx import Node

from .. import composition
from ..config import DoRAConfig, IA3Config, LoRAConfig
from ..errors import AdapterError, CheckpointError, ConfigError, MergeError, SiteError
from ..formats.common import (HUB_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, AdapterHubCheckpoint, Converted, check_peft, first_file, mapped, put,
                              read_tensors, resolve_module, translate, whole_modules)
from ..naming import LORAS, state_key, weights_path
from ..placement import Placement, describe_sites
from ..sites import Anatomy, Linear, Site, expert_read, sequence_input
from .base import Emitter, Method, PeftFormat, columns_tensor
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


def init_factors(a: torch.Tensor, b: torch.Tensor, init_weights: str, generator: torch.Generator | None) -> None:
    """AdapterHub's initialisations of LoRA's A and B, in place: ``"lora"`` (A Kaiming-uniform with
    a = sqrt(5), per expert on a 3-D A; B zero), ``"bert"`` (normal, std 0.02), ``"ia3"`` (ones)."""
    with torch.no_grad():
        if init_weights == "lora":
            for a_e in (a if a.ndim == 3 else [a]):  # each expert's A as a linear's (fan-in = in)
                nn.init.kaiming_uniform_(a_e, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(b)
        elif init_weights == "bert":
            nn.init.normal_(a, std=0.02, generator=generator)
            nn.init.normal_(b, std=0.02, generator=generator)
        else:  # "ia3"
            nn.init.ones_(a)
            nn.init.ones_(b)


class LoRAWeights(nn.Module):
    """``lora_A`` (r, in) and ``lora_B`` (out, r) of one site, (E, r, in) and (E, out, r) at E experts;
    rank, ``scaling`` (``rank_pattern`` / ``alpha_pattern`` per module path) and ``dropout`` from the config."""

    label = "LoRA"  # in fxadapt.draw's pictures

    def __init__(self, site: Site, config: LoRAConfig, like: torch.Tensor):
        super().__init__()
        r = config.rank_for(site.path)
        self.scaling = config.scaling_for(site.path)
        self.dropout = float(config.dropout)
        self.cast = config.dtype is not None  # adapter dtype chosen apart from the model's: cast around it
        kw = dict(device=like.device, dtype=torch.float32)
        experts = (site.linear.experts,) if site.linear.experts else ()
        a = torch.empty(*experts, r, site.in_features, **kw)
        # At a grouped 1x1 convolution B is grouped as the convolution (PEFT's lora_B): each group of
        # output channels reads its own r / groups of the rank.
        b = torch.empty(*experts, site.out_features, r // site.linear.groups, **kw)
        init_factors(a, b, config.init_weights, init_generator(config, site))
        dtype = weights_dtype(config, like)
        self.lora_A = nn.Parameter(a.to(dtype))
        self.lora_B = nn.Parameter(b.to(dtype))
        self.register_buffer("columns", columns_tensor(site.columns), persistent=False)
        # UniPELT: a gate from the layer input replaces the scaling (as in AdapterHub).
        self.gate = Gate(site.in_features, 1, init_bias=False).to(like.device, dtype) if config.use_gating else None

    def delta(self) -> torch.Tensor:
        """``scaling * B A``, shape (out, in) ((E, out, in) at experts), in float32 or wider (B
        block-diagonal when grouped)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        b = self.lora_B.to(dtype)
        if b.ndim == 3:
            return torch.bmm(b, self.lora_A.to(dtype)) * self.scaling
        groups = self.lora_A.shape[0] // b.shape[1]
        if groups > 1:
            b = torch.block_diag(*b.split(b.shape[0] // groups))
        return (b @ self.lora_A.to(dtype)) * self.scaling


# -- rewrite rules ----------------------------------------------------------------------------


def insert_lora(e: Emitter, p: Placement, w: LoRAWeights) -> None:
    a, b = e.attr(f"{p.module}.lora_A"), e.attr(f"{p.module}.lora_B")
    # Weights in a dtype of their own (float32 on a half-precision model): as PEFT, the input is cast
    # to it before dropout, the sum is taken in it and rounded to the model's dtype once.
    read = expert_read(e.node) if p.site.linear.experts else None
    x = e.node.args[read[1]] if read else e.x
    x = e.call(aten.type_as.default, x, a) if w.cast else x
    if w.dropout > 0:
        x = e.call(aten.dropout.default, x, e.rate(w.dropout), True)
    if read:
        delta = _expert_delta(e, read, x, a, b)
    elif p.site.linear.conv:
        delta = _conv_delta(e, p, w, x, a, b)
    else:
        delta = e.call(aten.linear.default, e.call(aten.linear.default, x, a), b)
    if w.gate is not None:
        gate_in = sequence_input(e.x)
        if w.cast:
            gate_in = e.call(aten.type_as.default, gate_in, a)
        delta = e.call(aten.mul.Tensor, delta, _gate_rows(e, e.module(f"{p.module}.gate", gate_in), e.x))
    elif w.scaling != 1.0:
        delta = e.call(aten.mul.Tensor, delta, w.scaling)
    y = e.y
    if w.cast:
        e.y = e.call(aten.type_as.default, y, delta)
    if p.site.linear.conv or read:  # already over all output channels
        e.y = e.call(aten.add.Tensor, e.y, delta)
    else:
        e.add_to_columns(delta, p.site, f"{p.module}.columns")
    if w.cast:
        e.y = e.call(aten.type_as.default, e.y, y)


def _expert_delta(e: Emitter, read, x, a, b):
    """``B_e A_e x`` for each row's expert e, batched as the graph reads the expert weight: the same
    grouped matmul with the same offsets, or the weights indexed by the same expert ids."""
    node, (_, x_i, _, index) = e.node, read
    if index is None:  # grouped: rows sorted by expert, the op takes (E, in, out) weights
        rest = node.args[2:]
        h = e.call(node.target, x, e.call(aten.transpose.int, a, 1, 2), *rest, **node.kwargs)
        return e.call(node.target, h, e.call(aten.transpose.int, b, 1, 2), *rest, **node.kwargs)
    a_rows, b_rows = (e.call(aten.index.Tensor, t, list(index.args[1])) for t in (a, b))
    if x_i == 1:  # W[ids] @ x[..., None]
        return e.call(aten.bmm.default, b_rows, e.call(aten.bmm.default, a_rows, x))
    h = e.call(aten.bmm.default, x, e.call(aten.transpose.int, a_rows, 1, 2))  # x[:, None] @ W[ids], W (E, in, out)
    return e.call(aten.bmm.default, h, e.call(aten.transpose.int, b_rows, 1, 2))


def conv_weight(e: Emitter, weight, shape, lin: Linear):
    """A 2-D (out, in) weight node viewed as the kernel of a 1x1 convolution like ``lin``'s."""
    return e.call(aten.view.default, weight, [*shape, *[1] * (-1 - lin.channel_dim)])


def conv(e: Emitter, x, kernel, lin: Linear, groups: int = 1):
    """A 1x1 convolution (stride 1, no padding) over ``lin``'s spatial dims."""
    k = -1 - lin.channel_dim
    return e.call(aten.convolution.default, x, kernel, None, [1] * k, [0] * k, [1] * k, False, [0] * k, groups)


def _conv_delta(e: Emitter, p: Placement, w: LoRAWeights, x, a, b):
    """``B A x`` at a 1x1 convolution, as PEFT computes it: A a convolution over every input channel,
    B one grouped as the base's; B's rows spread over all output channels of a fused projection."""
    lin, site = p.site.linear, p.site
    b_shape = list(w.lora_B.shape)
    if site.columns is not None:
        cols, width = site.columns, lin.out_features
        if isinstance(cols, range):
            b = e.call(aten.constant_pad_nd.default, b, [0, 0, cols.start, width - cols.stop], 0.0)
        else:
            b = e.call(aten.index_copy.default, e.call(aten.new_zeros.default, b, [width, b_shape[1]]), 0,
                       e.attr(f"{p.module}.columns"), b)
        b_shape[0] = width
    h = conv(e, x, conv_weight(e, a, list(w.lora_A.shape), lin), lin)
    return conv(e, h, conv_weight(e, b, b_shape, lin), lin, lin.groups)


def _gate_rows(e: Emitter, gate, x):
    """A (batch, 1) gate shaped to scale rows of the projection's output (3-D, or GPT-2's flat 2-D)."""
    x3 = sequence_input(x)
    if x3 is x:
        return e.call(aten.view.default, gate, [-1, 1, 1])
    return e.call(aten.repeat_interleave.self_int, gate, e.call(aten.sym_size.int, x3, 1), 0)


class _LoRAState(NamedTuple):
    """AdapterHub's ``LoRAState``: the layer input, the adapters' running output (None before the first),
    the projection's output over the same rows (a node, or a list of slices to concatenate when needed),
    the last method."""

    x: Node
    hidden: Node | None
    y: Node | list
    last: str | None
    batched: bool = False  # hidden has rows (a LoRA output), not one vector for all ((IA)^3)


class Composer(composition.Composer):
    """LoRA and (IA)^3 in a composition at one projection, as AdapterHub's ``LoRALayer``: the first adapter
    reads the layer input, each next one of a Stack reads the previous one's output (LoRA: ``B A h``;
    (IA)^3: ``h * l``), and the last adapter's method combines it with the projection's output (LoRA adds,
    (IA)^3 scales)."""

    def __init__(self, e: Emitter, placements, weights):
        super().__init__(e, placements, weights)
        p = next(iter(placements.values()))
        self.site, self.where = p.site, p.describe()
        for q in placements.values():
            lin = q.site.linear
            if lin.experts or lin.conv or q.side != "output" or q.method not in ("lora", "ia3"):
                raise AdapterError(f"adapter {q.adapter!r} at {q.describe()}: only LoRA and output-side (IA)^3 on plain linear "
                                   "projections compose in blocks (not experts, convolutions or input scaling)")
        # GPT-2's Conv1D reads its input flattened to (batch * seq, features): the state holds the
        # (batch, seq, ...) views, so that slices take whole rows; ``finish`` flattens the output back.
        self.flat = sequence_input(e.x) is not e.x

    def initial(self):
        if not self.flat:
            return _LoRAState(self.e.x, None, self.e.node, None)
        x = sequence_input(self.e.x)
        size = [self.e.call(aten.sym_size.int, x, 0), self.e.call(aten.sym_size.int, x, 1), -1]
        return _LoRAState(x, None, self.e.call(aten.view.default, self.e.node, size), None)

    def rows(self, state):
        return self.e.call(aten.sym_size.int, state.x, 0)

    def single(self, name, state):
        p, w, e = self.placements[name], self.weights[name], self.e
        if p.method == "ia3":
            vec = e.attr(f"{p.module}.scale")
            if w.scaling != 1.0:
                vec = e.call(aten.mul.Tensor, vec, w.scaling)
            hidden = vec if state.hidden is None else e.call(aten.mul.Tensor, state.hidden, vec)
            return state._replace(hidden=hidden, last="ia3", batched=state.batched)
        a, b = e.attr(f"{p.module}.lora_A"), e.attr(f"{p.module}.lora_B")
        h = state.x if state.hidden is None else state.hidden
        h = e.call(aten.type_as.default, h, a) if w.cast else h
        if w.dropout > 0:
            h = e.call(aten.dropout.default, h, e.rate(w.dropout), True)
        delta = e.call(aten.linear.default, e.call(aten.linear.default, h, a), b)
        if w.gate is not None:
            gate_in = sequence_input(state.x)
            gate_in = e.call(aten.type_as.default, gate_in, a) if w.cast else gate_in
            delta = e.call(aten.mul.Tensor, delta, _gate_rows(e, e.module(f"{p.module}.gate", gate_in), state.x))
        elif w.scaling != 1.0:
            delta = e.call(aten.mul.Tensor, delta, w.scaling)
        return state._replace(hidden=delta, last="lora", batched=True)

    def vslice(self, state, start, stop):
        hidden = self.slice(state.hidden, 0, start, stop) if state.batched else state.hidden
        return _LoRAState(self.slice(state.x, 0, start, stop), hidden, self.slice(self._y(state), 0, start, stop), state.last, state.batched)

    def _y(self, state) -> Node:
        return self.e.call(aten.cat.default, state.y, 0) if isinstance(state.y, list) else state.y

    def cat(self, states):
        if len({s.last for s in states if s.hidden is not None}) > 1:
            # One combination finishes all rows (AdapterHub's rule, which adds (IA)^3's scales as LoRA updates).
            raise AdapterError(f"at {self.where} some slices of a Parallel / BatchSplit end with a LoRA and some with an (IA)^3 "
                               "adapter: their rows cannot be finished alike; adapter_names runs each row through its own adapter")
        last = states[-1].last or next((s.last for s in reversed(states) if s.last), None)
        x = self.e.call(aten.cat.default, [s.x for s in states], 0)
        y = [s.y for s in states]
        if all(s.hidden is None for s in states):
            return _LoRAState(x, None, y, last)
        parts = []
        for s in states:  # each slice's output over its rows: a missing one is neutral, a vector spread over its rows
            rows = self._y(s)
            if self.site.columns is not None:  # a fused projection's output: as wide as this site's columns
                rows = self.e.call(aten.slice.Tensor, rows, -1, 0, len(self.site.columns))
            if s.hidden is None:
                parts.append(self.e.call(aten.zeros_like.default if last == "lora" else aten.ones_like.default, rows))
            else:
                parts.append(self.e.call(aten.expand_as.default, s.hidden, rows))
        return _LoRAState(x, self.e.call(aten.cat.default, parts, 0), y, last, True)

    def mean(self, outs, state):
        # AdapterHub: torch.mean(stack(outputs) * weights, 0): the weighted sum over the number of outputs
        total = None
        for w, out in outs:
            if out.hidden is None:
                continue
            term = self.e.call(aten.mul.Tensor, out.hidden, w)
            total = term if total is None else self.e.call(aten.add.Tensor, total, term)
        hidden = None if total is None else self.e.call(aten.div.Tensor, total, len(outs))
        return state._replace(hidden=hidden, last=outs[-1][1].last, batched=any(out.batched for _, out in outs))

    def finish(self, state):
        if state.hidden is None:
            return
        e, y = self.e, self.e.y
        hidden = e.call(aten.type_as.default, state.hidden, y)
        if self.flat and state.batched:
            hidden = e.call(aten.flatten.using_ints, hidden, 0, 1)
        if state.last == "ia3":
            e.y = e.call(aten.mul.Tensor, y, e.full_vector(hidden, self.site, f"{next(iter(self.placements.values())).module}.columns", 1.0))
        else:
            p = next(q for q in self.placements.values() if q.method == "lora")
            e.add_to_columns(hidden, self.site, f"{p.module}.columns")


# -- folds ------------------------------------------------------------------------------------


def spread_rows(site: Site, values: torch.Tensor, fill: float) -> torch.Tensor:
    """Per-output-row values of a (fused) site, spread over all of the projection's rows."""
    if site.columns is None:
        return values
    full = values.new_full((site.linear.out_features, *values.shape[1:]), fill)
    full[torch.as_tensor(list(site.columns), device=values.device)] = values
    return full


def out_in(weight: torch.Tensor, site: Site) -> torch.Tensor:
    """The weight as an (out, in) matrix: a 1x1 convolution's kernel flattened, block-diagonal when grouped."""
    lin = site.linear
    if lin.conv:
        w = weight.reshape(weight.shape[0], weight.shape[1])
        return torch.block_diag(*w.split(lin.out_features // lin.groups)) if lin.groups > 1 else w
    return weight.transpose(-2, -1) if lin.transposed else weight  # (E, out, in) at experts


def as_weight(weight: torch.Tensor, value_out_in: torch.Tensor, site: Site) -> torch.Tensor:
    """An (out, in) matrix back in the weight's layout; a grouped convolution keeps only its diagonal
    blocks, so the value must be zero off them (MergeError otherwise)."""
    lin = site.linear
    value = value_out_in.transpose(-2, -1) if lin.transposed else value_out_in
    if lin.conv and lin.groups > 1:
        rows, cols = lin.out_features // lin.groups, lin.in_features // lin.groups
        blocks = [value[g * rows:(g + 1) * rows, g * cols:(g + 1) * cols] for g in range(lin.groups)]
        if torch.count_nonzero(value).item() != sum(torch.count_nonzero(b).item() for b in blocks):
            raise MergeError(f"{site.path} is a convolution with groups={lin.groups}: the merged weight is not block-diagonal")
        value = torch.cat(blocks)
    return torch.empty_like(weight).copy_(value.reshape(weight.shape))


def fold_lora(weight, bias, p: Placement, w: LoRAWeights):
    if p.site.linear.groups > 1:
        # B A reads every input channel; the grouped kernel holds only its diagonal blocks (PEFT refuses too).
        raise MergeError(f"LoRA at {p.site.path}, a convolution with groups={p.site.linear.groups}, cannot be merged: "
                         "its update reads every input channel, the grouped kernel only its own group's")
    delta = spread_rows(p.site, w.delta(), 0.0)
    merged = out_in(weight, p.site).to(delta.dtype) + delta
    return as_weight(weight, merged, p.site), bias


# -- where ---------------------------------------------------------------------------------


def site_path(name: str, site: Site) -> str:
    """Where the weights of adapter ``name`` at a site live: ``<linear>.loras.<name>[.<role>]``; at an
    expert tensor ``<experts module>.loras.<name>.<tensor>`` (state keys ``<tensor path>.lora_A``)."""
    if site.linear.experts:
        module, _, leaf = site.path.rpartition(".")
        return weights_path(LORAS, name, module, leaf)
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
    for site in chosen:
        if site.linear.conv:
            _check_conv(config, site)
        if site.linear.experts and (config.method not in ("lora", "ia3") or getattr(config, "use_gating", False)):
            raise SiteError(f"{type(config).__name__}{' with use_gating' if getattr(config, 'use_gating', False) else ''} cannot adapt "
                            f"{site.path}, the weights of {site.linear.experts} experts: only LoRA and (IA)^3 adapt experts; "
                            "leave them out with targets= or intermediate_lora/output_lora=False")
    return chosen


def _check_conv(config, site: Site) -> None:
    """What LoRA and (IA)^3 need to adapt a 1x1 convolution; other methods compute on features last."""
    name, lin = type(config).__name__, site.linear
    if config.method not in ("lora", "ia3"):
        raise SiteError(f"{name} cannot adapt {site.path}, a 1x1 convolution (channels in dim {lin.channel_dim}): only LoRA "
                        "and (IA)^3 adapt convolutions; leave it out with targets= or leave_out")
    if getattr(config, "use_gating", False):
        raise ConfigError(f"{name}.use_gating=True: the gate reads features last, {site.path} is a 1x1 convolution",
                          field="use_gating", value=True)
    if lin.groups > 1 and site.columns is not None:
        raise SiteError(f"{name} cannot adapt {site.name}: one role's channels of a convolution with groups={lin.groups}")
    r = config.rank_for(site.path) if config.method == "lora" else lin.groups
    if r % lin.groups:
        raise ConfigError(f"{name}.r={r} at {site.path}: a convolution with groups={lin.groups} needs a rank divisible by "
                          "its groups (B is grouped as the convolution, as in PEFT)", field="r", value=r)


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


# -- PEFT checkpoints --------------------------------------------------------------------------

# The PEFT config fields the LORA / IA3 reader reads, the JSON types each must have, and the fxadapt field each becomes.
_PEFT_FIELDS = {"r": ((int,), "r"), "lora_alpha": ((int, float), "alpha"), "lora_dropout": ((int, float), "dropout"),
                "use_rslora": ((bool,), "use_rslora"), "use_dora": ((bool,), "use_dora"),
                "target_modules": ((list, str, type(None)), "targets"), "target_parameters": ((list, type(None)), "targets"),
                "feedforward_modules": ((list, str, type(None)), "input_scaling_targets"),
                "rank_pattern": ((dict, type(None)), "rank_pattern"), "alpha_pattern": ((dict, type(None)), "alpha_pattern")}


def read_peft(gm: AdaptedModule, directory: str, path: str, meta: dict, key_mapping) -> Converted:
    """PEFT's LORA and IA3: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (with
    ``use_dora`` DoRA's ``.lora_magnitude_vector``) or ``.ia3_l``."""
    kind = meta["peft_type"]
    # PEFT_UNSUPPORTED lists target_parameters for the other methods; LoRA reads it (expert tensors).
    plain_lora = kind == "LORA" and meta.get("use_dora") is not True
    check_peft(path, {k: v for k, v in meta.items() if not (plain_lora and k == "target_parameters")},
               {k: types for k, (types, _) in _PEFT_FIELDS.items()}, bias=True)
    listed = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()}
    try:
        if kind == "LORA":
            # DoRA (use_dora): PEFT's LORA with a magnitude per output row, fxadapt's DoRAConfig.
            cls = DoRAConfig if meta.get("use_dora") is True else LoRAConfig
            # target_parameters (experts' 3-D tensors) are linears of fxadapt's, named by parameter path.
            targets = listed.get("target_modules")
            if meta.get("target_parameters"):
                targets = (*(targets or ()), *meta["target_parameters"]) if not isinstance(targets, str) else targets
            config = cls(selfattn_lora=False, targets=targets, r=meta.get("r", 8), alpha=meta.get("lora_alpha", 8),
                         dropout=meta.get("lora_dropout", 0.0), use_rslora=meta.get("use_rslora", False),
                         rank_pattern=meta.get("rank_pattern") or {}, alpha_pattern=meta.get("alpha_pattern") or {})
        else:
            config = IA3Config(selfattn_lora=False, intermediate_lora=False, targets=listed.get("target_modules"),
                               input_scaling_targets=listed.get("feedforward_modules") or None)
    except ConfigError as e:
        field = next((peft for peft, (_, ours) in _PEFT_FIELDS.items() if ours == e.field), e.field)
        raise CheckpointError(f"{path}: {field}: {e}", path=path) from e
    config = translate(gm, config, key_mapping)
    weights = first_file(directory, PEFT_WEIGHTS, "PEFT")
    # DoRA's magnitude: PEFT writes ``.lora_magnitude_vector`` (its module's ``.weight`` left out).
    params = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".ia3_l": "scale", ".lora_magnitude_vector.weight": "magnitude",
              ".lora_magnitude_vector": "magnitude"}
    tensors, sources = {}, {}
    experts = {lin.path: lin.experts for lin in gm._fx_linears.values() if lin.experts}
    for key, tensor in read_tensors(weights).items():
        suffix = next((s for s in params if key.endswith(s)), None)
        named = key.removeprefix(PEFT_PREFIX)[: -len(suffix)] if suffix else None
        if named is not None and meta.get("target_parameters"):
            named = _peft_parameter(gm, named, meta["target_parameters"], key_mapping)
        module = resolve_module(gm, named, key_mapping) if suffix else None
        ours = key if module is None else f"{module}.{params[suffix]}"
        if module in experts and params[suffix] in ("lora_A", "lora_B") and tensor.ndim == 2:
            # PEFT's ParamWrapper: lora_A (E r, in) expert-major, lora_B (out, r E) expert-minor.
            e = experts[module]
            tensor = tensor.reshape(e, -1, tensor.shape[1]) if params[suffix] == "lora_A" else tensor.reshape(tensor.shape[0], -1, e).permute(2, 0, 1)
        if module is not None and params[suffix] in ("lora_A", "lora_B") and tensor.ndim > 2 and all(n == 1 for n in tensor.shape[2:]):
            tensor = tensor.reshape(tensor.shape[:2])  # a 1x1 convolution's LoRA: PEFT keeps the kernel dims
        if module is not None and params[suffix] == "scale" and tensor.ndim == 2:
            # PEFT: (out, 1) scales the output, (1, in) the input of a feedforward module.
            if tensor.shape[0 if config.matches_input_scaling(module) else 1] == 1:
                tensor = tensor.reshape(-1)
        put(tensors, sources, ours, tensor, key, weights)
    return Converted(config.method if kind == "LORA" else "ia3", config, tensors, weights, sources, path)


def _peft_parameter(gm: AdaptedModule, named: str, target_parameters, key_mapping) -> str:
    """The parameter path a PEFT ``target_parameters`` key names: ``<module>(.base_layer)*``, one
    ParamWrapper per targeted parameter of the module nested in the order the module registers them
    (the first innermost, under the most ``base_layer``)."""
    depth = 0
    while named.endswith(".base_layer"):
        named, depth = named.removesuffix(".base_layer"), depth + 1
    try:
        owner = gm.get_submodule(mapped(named, key_mapping))
    except AttributeError:
        return named
    targeted = [leaf for leaf, p in owner.named_parameters(recurse=False)
                if p.ndim == 3 and any(f"{named}.{leaf}" == t or f"{named}.{leaf}".endswith("." + t) for t in target_parameters)]
    return f"{named}.{targeted[len(targeted) - 1 - depth]}" if depth < len(targeted) else named


def _peft_expert_key(gm: AdaptedModule, path: str, targeted: set[str]) -> str:
    """PEFT's module key of the LoRA of expert tensor ``path`` (see _peft_parameter)."""
    module, _, leaf = path.rpartition(".")
    order = [l for l, _ in gm.get_submodule(module).named_parameters(recurse=False) if f"{module}.{l}" in targeted]
    return module + ".base_layer" * (len(order) - 1 - order.index(leaf))


def write_peft(gm: AdaptedModule, name: str) -> tuple[str, dict, str, dict[str, torch.Tensor]]:
    """PEFT's LORA (DoRA: ``use_dora``) or IA3 of a LoRA, DoRA or (IA)^3 adapter. LoRA's per-role parts of
    a fused projection become one LoRA of the whole module (PEFT adapts whole modules)."""
    adapter = gm._adapter(name)
    config = adapter.config
    if config.use_gating:
        raise CheckpointError(f"adapter {name!r} ({type(config).__name__} with use_gating) has no PEFT form: PEFT has no gates")
    if config.method == "dora":
        whole_modules(gm, name)  # refuses DoRA parts on a fused projection's roles (LoRA's become one, below)
    by_path: dict[str, list[Placement]] = {}
    for p in adapter.placements:
        by_path.setdefault(p.site.path, []).append(p)
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas, feedforward = {}, {}, []
    parameters = {p.site.path for p in adapter.placements if p.site.linear.experts}
    if parameters and (config.method != "lora" or config.dropout):
        raise CheckpointError(f"adapter {name!r}: a {type(config).__name__}{' with dropout' if config.dropout else ''} on expert tensors "
                              f"({sorted(parameters)[0]}, ...) has no PEFT form (PEFT's target_parameters holds LoRA without dropout); "
                              "use fxadapt's format")
    for path, parts in by_path.items():
        weights = [gm.get_submodule(p.module) for p in parts]
        site = parts[0].site
        key = PEFT_PREFIX + path
        if site.linear.experts:  # PEFT's ParamWrapper: A (E r, in) expert-major, B (out, r E) expert-minor
            a, b = weights[0].lora_A.detach(), weights[0].lora_B.detach()
            key = PEFT_PREFIX + _peft_expert_key(gm, path, parameters)
            tensors[key + ".lora_A.weight"] = a.reshape(-1, a.shape[-1])
            tensors[key + ".lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], -1)
            continue
        if site.linear.conv and (config.method != "lora" or len(parts) > 1 or site.columns is not None):
            raise CheckpointError(f"adapter {name!r}: a {type(config).__name__} on the 1x1 convolution {site.name} has no PEFT form fxadapt "
                                  "writes (PEFT's format holds a LoRA of a whole convolution); use fxadapt's format")
        if config.method == "ia3":
            if parts[0].side == "input":
                tensors[key + ".ia3_l"] = weights[0].vector().detach().reshape(1, -1)
                feedforward.append(path)
                continue
            full = torch.ones(site.linear.out_features, dtype=weights[0].scale.dtype)
            for p, w in zip(parts, weights):
                full[_columns(p)] = w.vector().detach()
            tensors[key + ".ia3_l"] = full.reshape(-1, 1)
        elif len(parts) == 1 and site.columns is None:
            a, b = weights[0].lora_A, weights[0].lora_B
            if site.linear.conv:  # PEFT's LoRA of a convolution: kernels of size 1 over -channel_dim - 1 dims
                kernel = (1,) * (-site.linear.channel_dim - 1)
                a, b = a.detach().reshape(*a.shape, *kernel), b.detach().reshape(*b.shape, *kernel)
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a, b
            if config.method == "dora":
                tensors[key + ".lora_magnitude_vector"] = weights[0].magnitude
        else:
            # Per-role parts of a fused projection: one LoRA on the whole linear with block structure,
            # A = [A_q; A_v] and B block-diagonal (B_q on q's rows and columns 0..r, ...). Exact, rank n*r;
            # in training, one dropout mask instead of one per role.
            scale = weights[0].scaling
            a = torch.cat([w.lora_A.detach() for w in weights])
            b = torch.zeros(site.linear.out_features, a.shape[0], dtype=a.dtype)
            start = 0
            for p, w in zip(parts, weights):
                r = w.lora_A.shape[0]
                b[_columns(p), start:start + r] = w.lora_B.detach() * (w.scaling / scale) if w.scaling != scale else w.lora_B.detach()
                start += r
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a, b
            ranks[re.escape(path)] = a.shape[0]
            alphas[re.escape(path)] = scale * (math.sqrt(a.shape[0]) if config.use_rslora else a.shape[0])
    common = {"target_modules": [p for p in by_path if p not in parameters], **({"target_parameters": sorted(parameters)} if parameters else {}),
              "fan_in_fan_out": any(p.site.linear.transposed and not p.site.linear.experts for p in adapter.placements),
              "modules_to_save": None, "inference_mode": True, "task_type": None, "base_model_name_or_path": None}
    if config.method == "ia3":
        meta = {"peft_type": "IA3", **common, "feedforward_modules": feedforward, "init_ia3_weights": True}
    else:
        # Block entries first: PEFT takes the first pattern that matches.
        for k, v in config.rank_pattern:
            ranks.setdefault(k, v)
        for k, v in config.alpha_pattern:
            alphas.setdefault(k, v)
        meta = {"peft_type": "LORA", **common, "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
                "use_rslora": config.use_rslora, "use_dora": config.method == "dora", "bias": "none", "rank_pattern": ranks,
                "alpha_pattern": alphas, "init_lora_weights": True}
    return HUB_CONFIG, meta, PEFT_WEIGHTS[0], tensors


def _columns(p: Placement) -> list[int] | slice:
    cols = p.site.columns
    return slice(None) if cols is None else list(cols)


#: PEFT's LORA, DoRA's too (``use_dora``); (IA)^3's IA3 shares the reader and writer.
PEFT = PeftFormat("LORA", read_peft, write_peft)

METHOD = Method("lora", "lora", LoRAWeights, insert_lora, place, fold_lora, gate_location=gate_location, adapterhub=read_adapterhub,
                peft=PEFT)
