"""DoRA (Liu et al., 2024, weight-decomposed low-rank adaptation), AdapterHub's ``DoRAConfig`` and
PEFT's ``LoraConfig(use_dora=True)``, computed as PEFT 0.21 computes it.

At a projection ``y = W x + b`` with LoRA's ``B`` (out, r), ``A`` (r, in) and ``scaling``, and a learned
magnitude ``m`` (out,) per output row:

    n = ||W + scaling B A||   (the L2 norm of each output row, over the input dim; a constant in backward)
    y' = y + (m / n - 1) * (W x) + (m / n) * scaling * B A dropout(x)

that is ``(m / n) * (W + scaling B A) x + b`` without dropout. As PEFT, ``W x`` is ``y - b`` without
dropout and ``W dropout(x)`` with it, and ``n`` is detached ("as recommended in section 4.3 of the
paper"), so the gradients are PEFT's. ``m`` starts at ``n`` of the initial weights, so a new adapter
with ``B = 0`` leaves the model as it is. Merged: ``W' = (m / n)[:, None] * (W + scaling B A)``.

Where: as LoRA (``select_sites``, ``site_path``). A fused projection (GPT-2's ``c_attn``) gets one DoRA
per role: the norm and magnitude are per output row, so a role owns its rows of ``W`` (its columns
of the output) and the other rows stay as they are.

AdapterHub 1.3.0 computes DoRA otherwise (``adapters/methods/lora.py``, ``LoRALinear.forward``):
``y = m / ||W + B A|| * (W x + b + scaling B A x)``: its norm leaves ``scaling`` out, and the bias is
inside the magnitude's scale. Its checkpoints (``<linear>.loras.<name>.m.weight`` (out, 1) next to
LoRA's A and B) load with ``m * ||W + scaling B A|| / ||W + B A||`` as the magnitude (the same factor,
so the same outputs) where the projection has no bias (or a zero one); with a bias no fxadapt DoRA
computes AdapterHub's ``(m / n) * b``, and :func:`read_adapterhub` refuses the checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import DoRAConfig, LoRAConfig
from ..errors import CheckpointError, ConfigError
from ..formats.common import AdapterHubCheckpoint, Converted
from ..placement import Placement
from ..sites import Anatomy, Site
from .base import Emitter, Method
from .lora import PEFT, LoRAWeights, as_weight, convert_adapterhub, gate_location, out_in, select_sites, site_path, weights_dtype

if TYPE_CHECKING:
    from ..module import AdaptedModule

aten = torch.ops.aten


def _rows(weight_out_in: torch.Tensor, site: Site) -> torch.Tensor:
    """The site's rows of a projection's (out, in) weight (all of them, or a fused role's)."""
    if site.columns is None:
        return weight_out_in
    return weight_out_in[torch.as_tensor(list(site.columns), device=weight_out_in.device)]


class DoRAWeights(LoRAWeights):
    """LoRA's ``lora_A`` (r, in) and ``lora_B`` (out, r), and ``magnitude`` (out,): the norm of each
    output row of ``W + scaling B A`` at initialisation (``like`` is the projection's weight; on the meta
    device, while the memory is planned, the magnitude is left empty)."""

    label = "DoRA"  # in fxadapt.draw's pictures

    def __init__(self, site: Site, config: LoRAConfig, like: torch.Tensor):
        super().__init__(site, config, like)
        dtype = weights_dtype(config, like)
        if like.device.type == "meta" or like.numel() == 0:
            magnitude = torch.empty(site.out_features, device=like.device, dtype=dtype)
        else:
            with torch.no_grad():
                delta = self.delta()
                rows = _rows(out_in(like.detach(), site), site).to(device=delta.device, dtype=delta.dtype)
                magnitude = torch.linalg.norm(rows + delta, dim=1).to(dtype)
        self.magnitude = nn.Parameter(magnitude)

    def factor(self, weight_out_in: torch.Tensor) -> torch.Tensor:
        """``m / ||W + scaling B A||`` per output row of the site, with ``W`` the (out, in) weight's rows."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        norm = torch.linalg.norm(weight_out_in.to(dtype) + self.delta(), dim=1)
        return self.magnitude.to(dtype) / norm


# -- rewrite rule -----------------------------------------------------------------------------


def _columns_of(e: Emitter, t, site: Site, index_path: str, dim: int):
    """The site's columns (along ``dim``) of a tensor over all of a fused projection's outputs."""
    cols = site.columns
    if cols is None:
        return t
    if isinstance(cols, range):
        return e.call(aten.slice.Tensor, t, dim, cols.start, cols.stop)
    return e.call(aten.index_select.default, t, dim, e.attr(index_path))


def insert_dora(e: Emitter, p: Placement, w: DoRAWeights) -> None:
    site, lin = p.site, p.site.linear
    index_path = f"{p.module}.columns"
    a, b, m = e.attr(f"{p.module}.lora_A"), e.attr(f"{p.module}.lora_B"), e.attr(f"{p.module}.magnitude")
    # PEFT casts the input to the adapter's dtype (a dtype of its own: float32 on a half-precision model).
    x = e.call(aten.type_as.default, e.x, a) if w.cast else e.x
    # The site's rows of W (out, in), in the input's dtype, as PEFT's ``weight.to(x.dtype)``.
    weight = e.attr(lin.weight)
    if lin.transposed:
        weight = e.call(aten.t.default, weight)
    weight = _columns_of(e, weight, site, index_path, 0)
    if w.cast:
        weight = e.call(aten.type_as.default, weight, a)
    # n = ||W + scaling B A|| per row, detached: no gradient flows through the norm.
    lora_weight = e.call(aten.detach.default, e.call(aten.mm.default, b, a))
    norm = e.call(aten.linalg_vector_norm.default, e.call(aten.add.Tensor, weight, e.call(aten.mul.Tensor, lora_weight, w.scaling)), 2, [1])
    factor = e.call(aten.div.Tensor, m, e.call(aten.detach.default, norm))
    if w.dropout > 0:
        x = e.call(aten.dropout.default, x, e.rate(w.dropout), True)
        base = e.call(aten.linear.default, x, weight)  # W dropout(x), no bias
    else:
        base = _columns_of(e, e.y, site, index_path, -1)  # W x = y - b
        if lin.bias is not None:
            base = e.call(aten.sub.Tensor, base, _columns_of(e, e.attr(lin.bias), site, index_path, 0))
        if w.cast:
            base = e.call(aten.type_as.default, base, a)
    lora = e.call(aten.linear.default, e.call(aten.linear.default, x, a), b)
    delta = e.call(aten.add.Tensor,
                   e.call(aten.mul.Tensor, e.call(aten.sub.Tensor, factor, 1), base),
                   e.call(aten.mul.Tensor, e.call(aten.mul.Tensor, factor, lora), w.scaling))
    if not w.cast:
        e.add_to_columns(delta, site, index_path)
        return
    y = e.y
    e.y = e.call(aten.type_as.default, y, delta)
    e.add_to_columns(delta, site, index_path)
    e.y = e.call(aten.type_as.default, e.y, y)


# -- fold -------------------------------------------------------------------------------------


def fold_dora(weight, bias, p: Placement, w: DoRAWeights):
    """``(m / ||W + scaling B A||)[:, None] * (W + scaling B A)`` on the site's rows; the bias unchanged."""
    site = p.site
    delta = w.delta()
    full = out_in(weight, site).to(delta.dtype)
    rows = _rows(full, site)
    merged = w.factor(rows)[:, None] * (rows + delta)
    if site.columns is None:
        full = merged
    else:
        full = full.clone()
        full[torch.as_tensor(list(site.columns), device=full.device)] = merged
    return as_weight(weight, full, site), bias


# -- where ------------------------------------------------------------------------------------


def place(name: str, config: LoRAConfig, anatomy: Anatomy) -> list[Placement]:
    if config.use_gating:
        raise ConfigError(f"{type(config).__name__}.use_gating: DoRA takes no gate (UniPELT gates plain LoRA); set use_gating=False, "
                          f"got {config.use_gating!r}", field="use_gating", value=config.use_gating)
    return [Placement(name, "dora", s, site_path(name, s), config) for s in select_sites(config, anatomy)]


# -- AdapterHub checkpoints ----------------------------------------------------------------


def read_adapterhub(gm: AdaptedModule, ckpt: AdapterHubCheckpoint) -> Converted:
    """AdapterHub's DoRA (a "lora" config with ``use_dora``): LoRA's A and B as they are, and the magnitude
    ``m.weight`` (out, 1) made fxadapt's (PEFT's) ``magnitude`` (out,), times ``||W + scaling B A|| /
    ||W + B A||`` (the model's W) when ``scaling != 1``, so that ``magnitude / ||W + scaling B A||`` is
    AdapterHub's factor ``m / ||W + B A||``. A projection with a nonzero bias is a CheckpointError:
    AdapterHub scales the bias by that factor too, which fxadapt's (PEFT's) DoRA does not."""
    marker = f".loras.{ckpt.name}.m.weight"
    tensors = {(k[: -len("m.weight")] + "magnitude" if k.endswith(marker) else k): (t.reshape(-1) if k.endswith(marker) else t)
               for k, t in ckpt.tensors.items()}
    converted, where = convert_adapterhub(gm, dataclasses.replace(ckpt, tensors=tensors), DoRAConfig, ckpt.config)
    for key, p in where.items():
        if key.endswith(".lora_A"):
            _check_bias(gm, ckpt, p)
    config = converted.config
    for key, p in where.items():
        scaling = config.scaling_for(p.site.path)
        if not key.endswith(".magnitude") or scaling == 1.0:
            continue
        prefix = key[: -len("magnitude")]
        a, b, m = (converted.tensors.get(prefix + n) for n in ("lora_A", "lora_B", "magnitude"))
        if a is None or b is None or m.shape != (p.site.out_features,):
            continue  # load_adapter reports what is missing or misshapen
        with torch.no_grad():
            w = _rows(out_in(gm.get_parameter(p.site.weight).detach(), p.site), p.site).double()
            ba = b.double() @ a.double()
            ratio = torch.linalg.norm(w + scaling * ba, dim=1) / torch.linalg.norm(w + ba, dim=1)
            converted.tensors[key] = (m.double() * ratio).to(m.dtype)
    return converted


def _check_bias(gm: AdaptedModule, ckpt: AdapterHubCheckpoint, p: Placement) -> None:
    lin = p.site.linear
    if lin.bias is None:
        return
    bias = gm.get_parameter(lin.bias).detach()
    if p.site.columns is not None:
        bias = bias[torch.as_tensor(list(p.site.columns), device=bias.device)]
    if bool((bias != 0).any()):
        raise CheckpointError(
            f"{ckpt.config_path}: AdapterHub's DoRA cannot be read exactly on {p.site.path}, which has a bias: AdapterHub computes "
            f"y = m / ||W + B A|| * (W x + b + scaling B A x), scaling the bias by the magnitude factor, while fxadapt's DoRA (as PEFT's) "
            f"computes y = m / ||W + scaling B A|| * (W x + scaling B A x) + b; no magnitude makes the two agree while b != 0",
            path=ckpt.config_path)


# PEFT: a LORA with use_dora, read and written by LoRA's conversion.
METHOD = Method("dora", "lora", DoRAWeights, insert_dora, place, fold_dora, gate_location=gate_location, peft=PEFT)
