"""(IA)^3 (Liu et al., 2022), AdapterHub's ``IA3Config`` (a LoRAConfig with ``composition_mode="scale"``).

At a projection:  ``y * (scaling * l)``, or ``W (x * l) + b`` for the linears ``input_scaling_targets``
names (PEFT's ``feedforward_modules``). Merged:  ``diag(l) W`` and ``l * b``, or ``W diag(l)``.
Where: as LoRA (k, v and the feed-forward input by default). At E experts the vectors are (E, out) or
(E, in), each row scaled by its expert's, found as the graph finds its rows' experts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LoRAConfig
from ..errors import ConfigError
from ..placement import Placement
from ..sites import Anatomy, Site, expert_read
from .base import Emitter, Method, PeftFormat, columns_tensor
from .lora import as_weight, init_generator, out_in, read_peft, select_sites, site_path, spread_rows, weights_dtype, write_peft

aten = torch.ops.aten


class IA3Weights(nn.Module):
    """The (IA)^3 vector ``scale`` of one site (AdapterHub's ``lora_B``), times ``scaling``."""

    label = "(IA)^3"  # in fxadapt.draw's pictures

    def __init__(self, site: Site, config: LoRAConfig, like: torch.Tensor, features: int | None = None):
        super().__init__()
        self.scaling = config.scaling_for(site.path)
        self.cast = config.dtype is not None
        experts = (site.linear.experts,) if site.linear.experts else ()
        scale = torch.empty(*experts, features or site.out_features, device=like.device, dtype=torch.float32)
        if config.init_weights == "ia3":
            nn.init.ones_(scale)
        elif config.init_weights == "bert":
            nn.init.normal_(scale, std=0.02, generator=init_generator(config, site))
        else:  # "lora": zeros, as AdapterHub does
            nn.init.zeros_(scale)
        self.scale = nn.Parameter(scale.to(weights_dtype(config, like)))
        self.register_buffer("columns", columns_tensor(site.columns), persistent=False)

    def vector(self) -> torch.Tensor:
        return self.scale * self.scaling if self.scaling != 1.0 else self.scale


def build(site: Site, config: LoRAConfig, like: torch.Tensor) -> IA3Weights:
    # The linears of input_scaling_targets are scaled on the input side: one value per input feature.
    return IA3Weights(site, config, like, site.in_features if config.matches_input_scaling(site.path) else None)


def insert_ia3(e: Emitter, p: Placement, w: IA3Weights) -> None:
    # A 1x1 convolution holds its channels in dim channel_dim: the vector is viewed to scale that dim.
    channel_dim = p.site.linear.channel_dim
    if p.site.linear.experts:
        _scale_experts(e, p, w)
        return
    if p.side == "input" and channel_dim != -1:
        _scale_conv_input(e, f"{p.module}.scale", w, channel_dim)
        return
    if p.side == "input":
        e.scale_input(f"{p.module}.scale", w.scaling, w.cast)
        return
    scale = e.attr(f"{p.module}.scale")
    if w.scaling != 1.0:
        scale = e.call(aten.mul.Tensor, scale, w.scaling)
    scale = e.full_vector(scale, p.site, f"{p.module}.columns", 1.0)
    if channel_dim != -1:
        scale = e.call(aten.view.default, scale, [-1] + [1] * (-1 - channel_dim))
    scaled = e.call(aten.mul.Tensor, e.y, scale)
    # A vector in a dtype of their own: the product is taken in the wider dtype and rounded once (as PEFT).
    e.y = e.call(aten.type_as.default, scaled, e.y) if w.cast else scaled


def _scale_experts(e: Emitter, p: Placement, w: IA3Weights) -> None:
    """Each row of an expert projection's input or output times its expert's vector: the rows' experts
    are the ids that index the weight, or, for a grouped matmul, the groups its offsets delimit."""
    node = e.node
    _, x_i, _, index = expert_read(node)
    before = p.side == "input"
    call = e.pre if before else e.call
    x = node.args[x_i]
    if index is not None:
        ids = index.args[1][0]
    else:  # row i belongs to the expert whose offsets range holds it: the count of offsets <= i
        offs = node.args[2] if len(node.args) > 2 else node.kwargs["offs"]
        rows = call(aten.arange.default, call(aten.sym_size.int, x, 0), device=offs.meta["val"].device if "val" in offs.meta else None)
        ids = call(aten.searchsorted.Tensor, call(aten._to_copy.default, offs, dtype=torch.int64), rows, right=True)
        ids = call(aten.clamp.default, ids, None, p.site.linear.experts - 1)  # rows past the last offset (unrouted) read none
    s = e._new("get_attr", f"{p.module}.scale", (), before=True) if before else e.attr(f"{p.module}.scale")
    if w.scaling != 1.0:
        s = call(aten.mul.Tensor, s, w.scaling)
    s = call(aten.index.Tensor, s, [ids])  # (rows, features)
    if index is not None:  # bmm's x and y: (rows, features, 1) for W[ids] @ x, (rows, 1, features) for x @ W[ids]
        s = call(aten.unsqueeze.default, s, -1 if x_i == 1 else 1)
    if before:
        scaled = e.pre(aten.mul.Tensor, x, s)
        if w.cast:
            scaled = e.pre(aten.type_as.default, scaled, x)
        node.args = (*node.args[:x_i], scaled, *node.args[x_i + 1:])
        return
    scaled = e.call(aten.mul.Tensor, e.y, s)
    e.y = e.call(aten.type_as.default, scaled, e.y) if w.cast else scaled


def _scale_conv_input(e: Emitter, path: str, w: IA3Weights, channel_dim: int) -> None:
    """Emitter.scale_input for a 1x1 convolution: its input's channels, in dim ``channel_dim``, times the vector."""
    x = e.node.args[e.x_index]
    s = e._new("get_attr", path, (), before=True)
    if w.scaling != 1.0:
        s = e.pre(aten.mul.Tensor, s, w.scaling)
    scaled = e.pre(aten.mul.Tensor, x, e.pre(aten.view.default, s, [-1] + [1] * (-1 - channel_dim)))
    if w.cast:
        scaled = e.pre(aten.type_as.default, scaled, x)
    e.node.args = (*e.node.args[:e.x_index], scaled, *e.node.args[e.x_index + 1:])


def fold_ia3(weight, bias, p: Placement, w: IA3Weights):
    vec = w.vector().to(torch.promote_types(weight.dtype, torch.float32))
    w_oi = out_in(weight, p.site).to(vec.dtype)
    if p.side == "input":  # (E, in) vectors at experts scale each expert's columns
        return as_weight(weight, w_oi * vec.unsqueeze(-2), p.site), bias
    full = spread_rows(p.site, vec, 1.0)
    new_bias = None if bias is None else (bias.to(vec.dtype) * full).to(bias.dtype)
    return as_weight(weight, w_oi * full[..., None], p.site), new_bias


def place(name: str, config: LoRAConfig, anatomy: Anatomy) -> list[Placement]:
    if config.use_gating:
        raise ConfigError(f"{type(config).__name__}.use_gating=True: (IA)^3 cannot gate", field="use_gating", value=True)
    return [Placement(name, "ia3", s, site_path(name, s), config, side="input" if config.matches_input_scaling(s.path) else "output")
            for s in select_sites(config, anatomy)]


METHOD = Method("ia3", "lora", build, insert_ia3, place, fold_ia3, peft=PeftFormat("IA3", read_peft, write_peft))
