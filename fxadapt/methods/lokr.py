"""LoKr (Edalati et al., 2022; LyCORIS), PEFT's ``LoKrConfig`` on linear layers.

At a projection ``y = W x + b``:  ``y + x dW^T`` with ``dW = kron(w1, w2) * alpha / r``. The output
and input sizes are factored as PEFT's ``factorization`` does, ``out = a * b`` and ``in = c * d``:
``w1`` is (a, c), ``w2`` (b, d); ``w2`` is the product ``w2_a w2_b`` of rank ``r`` when ``r`` is
below half its larger side, ``w1`` too when ``decompose_both`` asks and ``r`` is below half of its.
Merged: ``W + dW``. Where: as LoRA; a fused projection's role gets its own LoKr on its columns.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import LoKrConfig
from ..placement import Placement
from ..sites import Anatomy, Site
from .base import Emitter, Method, columns_tensor
from .loha import lycoris_peft
from .lora import fold_lora, init_generator, select_sites, site_path

aten = torch.ops.aten


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS's) split of ``dimension`` into ``m * n``, ``m <= n``: ``factor`` itself when it
    divides, else the divisor pair nearest the square root (-1) or with ``m`` at most ``factor``.

    >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
    ((16, 16), (8, 16), (1, 127), (4, 32))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


class LoKrWeights(nn.Module):
    """``lokr_w1`` (a, c) or ``lokr_w1_a`` (a, r) / ``lokr_w1_b`` (r, c), and ``lokr_w2`` (b, d) or
    ``lokr_w2_a`` (b, r) / ``lokr_w2_b`` (r, d), of one site: PEFT's choice of factors and init."""

    label = "LoKr"  # in fxadapt.draw's pictures

    def __init__(self, site: Site, config: LoKrConfig, like: torch.Tensor):
        super().__init__()
        r = config.rank_for(site.path)
        self.scaling = config.scaling_for(site.path)
        in_m, in_n = factorization(site.in_features, config.decompose_factor)
        out_l, out_k = factorization(site.out_features, config.decompose_factor)
        self.use_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
        self.use_w2 = not (r < max(out_k, in_n) / 2)
        shapes = {"lokr_w1": (out_l, in_m)} if self.use_w1 else {"lokr_w1_a": (out_l, r), "lokr_w1_b": (r, in_m)}
        shapes.update({"lokr_w2": (out_k, in_n)} if self.use_w2 else {"lokr_w2_a": (out_k, r), "lokr_w2_b": (r, in_n)})
        # PEFT's init: True zeroes w1 (or w1_a), "lycoris" w2 (or w2_b), False none; the rest Kaiming-uniform.
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[config.init_weights]
        g = init_generator(config, site)
        for name, shape in shapes.items():
            t = torch.empty(shape, device=like.device, dtype=torch.float32)
            if name in zero:
                nn.init.zeros_(t)
            else:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)
            setattr(self, name, nn.Parameter(t.to(like.dtype)))
        self.register_buffer("columns", columns_tensor(site.columns), persistent=False)

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        def get(name: str) -> torch.Tensor:
            t = getattr(self, name)
            return t if dtype is None else t.to(dtype)
        w1 = get("lokr_w1") if self.use_w1 else get("lokr_w1_a") @ get("lokr_w1_b")
        w2 = get("lokr_w2") if self.use_w2 else get("lokr_w2_a") @ get("lokr_w2_b")
        return w1, w2

    def delta(self) -> torch.Tensor:
        """``dW`` (out, in), in float32 or wider."""
        w1, w2 = self.factors(torch.promote_types(next(self.parameters()).dtype, torch.float32))
        return torch.kron(w1, w2) * self.scaling


def insert_lokr(e: Emitter, p: Placement, w: LoKrWeights) -> None:
    def factor(i: int) -> object:
        if getattr(w, f"use_w{i}"):
            return e.attr(f"{p.module}.lokr_w{i}")
        return e.call(aten.mm.default, e.attr(f"{p.module}.lokr_w{i}_a"), e.attr(f"{p.module}.lokr_w{i}_b"))

    weight = e.call(aten.kron.default, factor(1), factor(2))
    if w.scaling != 1.0:
        weight = e.call(aten.mul.Tensor, weight, w.scaling)
    e.add_to_columns(e.call(aten.linear.default, e.x, weight), p.site, f"{p.module}.columns")


def place(name: str, config: LoKrConfig, anatomy: Anatomy) -> list[Placement]:
    return [Placement(name, "lokr", s, site_path(name, s), config) for s in select_sites(config, anatomy)]


METHOD = Method("lokr", "lokr", LoKrWeights, insert_lokr, place, fold_lora, peft=lycoris_peft(LoKrConfig))
