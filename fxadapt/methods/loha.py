"""LoHa (Hyeon-Woo et al., 2022, FedPara), PEFT's ``LoHaConfig`` on linear layers.

At a projection ``y = W x + b``:  ``y + x dW^T`` with ``dW = (w1_a w1_b) * (w2_a w2_b) * alpha / r``
(a Hadamard product of two rank-``r`` products, built in the graph as PEFT builds it). Merged:
``W + dW``. Where: as LoRA (``select_sites``); a fused projection (GPT-2's ``c_attn``) gets one
LoHa per role, on that role's columns. The weights live where LoRA's do (``<linear>.loras.<name>``),
with PEFT's parameter names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import LoHaConfig
from ..errors import CheckpointError, ConfigError
from ..formats.common import (HUB_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, Converted, check_peft, first_file, put, read_tensors,
                              resolve_module, translate, whole_modules)
from ..placement import Placement
from ..sites import Anatomy, Site
from .base import Emitter, Method, PeftFormat, columns_tensor
from .lora import fold_lora, init_generator, select_sites, site_path

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..module import AdaptedModule

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


# -- PEFT checkpoints (LoHa's and LoKr's) --------------------------------------------------------

# PEFT's LyCORIS methods: the config fields fxadapt reads, with the JSON types each must have (named alike
# in PEFT and fxadapt; a method reads those its config has), and their tensors' names (fxadapt's too).
_LYCORIS_FIELDS = {"r": (int,), "alpha": (int, float), "rank_dropout": (int, float), "module_dropout": (int, float),
                   "init_weights": (bool, str), "decompose_both": (bool,), "decompose_factor": (int,), "rank_dropout_scale": (bool,),
                   "rank_pattern": (dict, type(None)), "alpha_pattern": (dict, type(None))}
_LYCORIS_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                   "lokr_w2_b")


def lycoris_peft(cls: type[AdapterConfig]) -> PeftFormat:
    """PEFT's format of a LyCORIS method (LoHa, LoKr) whose config class is ``cls``: peft_type LOHA / LOKR,
    keys ``base_model.model.<module>.hada_w1_a`` ... / ``.lokr_w1`` ..."""
    kind = cls.__name__.removesuffix("Config").upper()
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: types for k, types in _LYCORIS_FIELDS.items() if k in names}

    def read(gm: AdaptedModule, directory: str, path: str, meta: dict, key_mapping) -> Converted:
        check_peft(path, meta, fields, refuse=("use_dora", "layers_pattern"))
        target = meta.get("target_modules")
        if not isinstance(target, (list, str)):
            raise CheckpointError(f"{path}: target_modules must be a list or a string, got {target!r}", path=path)
        given = {k: meta[k] or {} if k.endswith("_pattern") else meta[k] for k in fields if k in meta}
        try:
            config = cls(selfattn_lora=False, targets=tuple(target) if isinstance(target, list) else target, **given)
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e.field}: {e}", path=path) from e
        config = translate(gm, config, key_mapping)
        weights = first_file(directory, PEFT_WEIGHTS, "PEFT")
        tensors, sources = {}, {}
        for key, tensor in read_tensors(weights).items():
            module, _, param = key.removeprefix(PEFT_PREFIX).rpartition(".")
            found = resolve_module(gm, module, key_mapping) if param in _LYCORIS_PARAMS else None
            put(tensors, sources, key if found is None else f"{found}.{param}", tensor, key, weights)
        return Converted(kind.lower(), config, tensors, weights, sources, path)

    def write(gm: AdaptedModule, name: str) -> tuple[str, dict, str, dict[str, torch.Tensor]]:
        adapter = whole_modules(gm, name)
        config = adapter.config
        tensors = {f"{PEFT_PREFIX}{p.site.path}.{param}": tensor
                   for p in adapter.placements for param, tensor in gm.get_submodule(p.module).named_parameters()}
        given = {f: getattr(config, f) for f in fields}
        given["rank_pattern"], given["alpha_pattern"] = dict(config.rank_pattern), dict(config.alpha_pattern)
        meta = {"peft_type": kind, "target_modules": sorted({p.site.path for p in adapter.placements}), **given,
                "use_effective_conv2d": False, "modules_to_save": None, "inference_mode": True, "task_type": None,
                "base_model_name_or_path": None}
        return HUB_CONFIG, meta, PEFT_WEIGHTS[0], tensors

    return PeftFormat(kind, read, write)


METHOD = Method("loha", "loha", LoHaWeights, insert_loha, place, fold_lora, peft=lycoris_peft(LoHaConfig))
