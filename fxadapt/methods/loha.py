"""LoHa (Hyeon-Woo et al., 2022, FedPara), PEFT's ``LoHaConfig`` on linear layers.

At a projection ``y = W x + b``:  ``y + x dW^T`` with ``dW = (w1_a w1_b) * (w2_a w2_b) * alpha / r``
(a Hadamard product of two rank-``r`` products, built in the graph as PEFT builds it). Merged:
``W + dW``. Where: as LoRA (``select_sites``); a fused projection (GPT-2's ``c_attn``) gets one
LoHa per role, on that role's columns. The weights live where LoRA's do (``<linear>.loras.<name>``),
with PEFT's parameter names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import LoHaConfig
from ..placement import Placement
from ..sites import Anatomy, Site
from .base import Emitter, Method, columns_tensor
from .lora import fold_lora, init_generator, select_sites, site_path

aten = torch.ops.aten


class LoHaWeights(nn.Module):
    """``hada_w1_a`` / ``hada_w2_a`` (out, r) and ``hada_w1_b`` / ``hada_w2_b`` (r, in) of one site, as
    PEFT shapes and initialises them (Kaiming-uniform; ``hada_w2_b`` zero with ``init_weights=True``)."""

    label = "LoHa"  # in fxadapt.draw's pictures

    def __init__(self, site: Site, config: LoHaConfig, like: torch.Tensor):
        super().__init__()
        r = config.rank_for(site.path)
        self.scaling = config.scaling_for(site.path)
        g = init_generator(config, site)
        shapes = {"hada_w1_a": (site.out_features, r), "hada_w1_b": (r, site.in_features),
                  "hada_w2_a": (site.out_features, r), "hada_w2_b": (r, site.in_features)}
        for name, shape in shapes.items():
            t = torch.empty(shape, device=like.device, dtype=torch.float32)
            if name == "hada_w2_b" and config.init_weights:
                nn.init.zeros_(t)
            else:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)
            setattr(self, name, nn.Parameter(t.to(like.dtype)))
        self.register_buffer("columns", columns_tensor(site.columns), persistent=False)

    def delta(self) -> torch.Tensor:
        """``dW`` (out, in), in float32 or wider."""
        dtype = torch.promote_types(self.hada_w1_a.dtype, torch.float32)
        w1 = self.hada_w1_a.to(dtype) @ self.hada_w1_b.to(dtype)
        w2 = self.hada_w2_a.to(dtype) @ self.hada_w2_b.to(dtype)
        return w1 * w2 * self.scaling


def insert_loha(e: Emitter, p: Placement, w: LoHaWeights) -> None:
    a1, b1, a2, b2 = (e.attr(f"{p.module}.{n}") for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    weight = e.call(aten.mul.Tensor, e.call(aten.mm.default, a1, b1), e.call(aten.mm.default, a2, b2))
    if w.scaling != 1.0:
        weight = e.call(aten.mul.Tensor, weight, w.scaling)
    e.add_to_columns(e.call(aten.linear.default, e.x, weight), p.site, f"{p.module}.columns")


def place(name: str, config: LoHaConfig, anatomy: Anatomy) -> list[Placement]:
    return [Placement(name, "loha", s, site_path(name, s), config) for s in select_sites(config, anatomy)]


METHOD = Method("loha", "loha", LoHaWeights, insert_loha, place, fold_lora)
