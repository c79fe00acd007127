"""PEFT's format, both ways, for LoRA and (IA)^3: ``adapter_config.json`` with ``peft_type`` and
``adapter_model.safetensors`` (or ``adapter_model.bin``), keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` / ``.ia3_l``."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import TYPE_CHECKING

import torch

from ..config import DoRAConfig, IA3Config, LoHaConfig, LoKrConfig, LoRAConfig
from ..errors import CheckpointError, ConfigError
from ..placement import Placement
from .common import HUB_CONFIG, PEFT_WEIGHTS, Converted, first_file, put, read_json, read_tensors, resolve_module, translate

if TYPE_CHECKING:
    from ..module import AdaptedModule

_PEFT_PREFIX = "base_model.model."

# PEFT config fields that change what the adapter computes and that fxadapt cannot express: they must be off.
_PEFT_UNSUPPORTED = ("lora_bias", "modules_to_save", "layers_to_transform", "exclude_modules", "target_parameters",
                     "layer_replication", "trainable_token_indices", "alora_invocation_tokens", "use_bdlora")


# The PEFT config fields fxadapt reads and the JSON types each must have (true/false is no number here,
# and "false" is no boolean), with the fxadapt field each becomes.
_PEFT_FIELDS = {"r": ((int,), "r"), "lora_alpha": ((int, float), "alpha"), "lora_dropout": ((int, float), "dropout"),
                "use_rslora": ((bool,), "use_rslora"), "use_dora": ((bool,), "use_dora"),
                "target_modules": ((list, str, type(None)), "targets"),
                "feedforward_modules": ((list, str, type(None)), "input_scaling_targets"),
                "rank_pattern": ((dict, type(None)), "rank_pattern"), "alpha_pattern": ((dict, type(None)), "alpha_pattern")}
_JSON_NAMES = {int: "an integer", float: "a number", bool: "true or false", list: "a list", str: "a string", dict: "an object",
               type(None): "null"}


# LoHa and LoKr (PEFT's LyCORIS methods): their config class, the fields fxadapt reads with the JSON
# types each must have (named alike in both), and their tensors' names.
_LYCORIS = {"LOHA": LoHaConfig, "LOKR": LoKrConfig}
_LYCORIS_FIELDS = {"r": (int,), "alpha": (int, float), "rank_dropout": (int, float), "module_dropout": (int, float),
                   "init_weights": (bool, str), "decompose_both": (bool,), "decompose_factor": (int,), "rank_dropout_scale": (bool,),
                   "rank_pattern": (dict, type(None)), "alpha_pattern": (dict, type(None))}
_LYCORIS_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                   "lokr_w2_b")


def read(gm: AdaptedModule, directory: str, key_mapping) -> Converted:
    path = os.path.join(directory, HUB_CONFIG)
    meta = read_json(path)
    kind = meta.get("peft_type")
    if kind == "VERA":
        return _read_vera(gm, directory, path, meta, key_mapping)
    if not isinstance(kind, str) or kind not in ("LORA", "IA3", *_LYCORIS):
        raise CheckpointError(f"{path}: peft_type {kind!r} is not supported (fxadapt reads LORA, IA3, LOHA and LOKR)", path=path)
    if kind in _LYCORIS:
        return _read_lycoris(gm, directory, path, meta, key_mapping)
    bad = [f for f in _PEFT_UNSUPPORTED if meta.get(f)] + (["bias"] if meta.get("bias", "none") != "none" else [])
    if bad:
        raise CheckpointError(f"{path}: PEFT option {bad[0]}={meta[bad[0]]!r} is not supported by fxadapt", path=path)
    for name, (types, _) in _PEFT_FIELDS.items():
        value = meta.get(name)
        if name in meta and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            raise CheckpointError(f"{path}: {name} must be {' or '.join(_JSON_NAMES[t] for t in types)}, got {value!r}", path=path)
    listed = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()}
    try:
        if kind == "LORA":
            # DoRA (use_dora): PEFT's LORA with a magnitude per output row, fxadapt's DoRAConfig.
            cls = DoRAConfig if meta.get("use_dora") is True else LoRAConfig
            config = cls(selfattn_lora=False, targets=listed.get("target_modules"), r=meta.get("r", 8), alpha=meta.get("lora_alpha", 8),
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
    for key, tensor in read_tensors(weights).items():
        suffix = next((s for s in params if key.endswith(s)), None)
        module = resolve_module(gm, key.removeprefix(_PEFT_PREFIX)[: -len(suffix)], key_mapping) if suffix else None
        ours = key if module is None else f"{module}.{params[suffix]}"
        if module is not None and params[suffix] == "scale" and tensor.ndim == 2:
            # PEFT: (out, 1) scales the output, (1, in) the input of a feedforward module.
            if tensor.shape[0 if config.matches_input_scaling(module) else 1] == 1:
                tensor = tensor.reshape(-1)
        put(tensors, sources, ours, tensor, key, weights)
    return Converted(config.method if kind == "LORA" else "ia3", config, tensors, weights, sources, path)


def _read_lycoris(gm: AdaptedModule, directory: str, path: str, meta: dict, key_mapping) -> Converted:
    """A PEFT LoHa or LoKr adapter: ``base_model.model.<module>.hada_w1_a`` ... / ``.lokr_w1`` ..."""
    kind = meta["peft_type"]
    bad = [f for f in (*_PEFT_UNSUPPORTED, "use_dora", "layers_pattern") if meta.get(f)]
    if bad:
        raise CheckpointError(f"{path}: PEFT option {bad[0]}={meta[bad[0]]!r} is not supported by fxadapt", path=path)
    cls = _LYCORIS[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, types in _LYCORIS_FIELDS.items():
        value = meta.get(name)
        if name in meta and name in fields and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            raise CheckpointError(f"{path}: {name} must be {' or '.join(_JSON_NAMES[t] for t in types)}, got {value!r}", path=path)
    target = meta.get("target_modules")
    if not isinstance(target, (list, str)):
        raise CheckpointError(f"{path}: target_modules must be a list or a string, got {target!r}", path=path)
    given = {k: meta[k] or {} if k.endswith("_pattern") else meta[k] for k in _LYCORIS_FIELDS if k in meta and k in fields}
    try:
        config = cls(selfattn_lora=False, targets=tuple(target) if isinstance(target, list) else target, **given)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e.field}: {e}", path=path) from e
    config = translate(gm, config, key_mapping)
    weights = first_file(directory, PEFT_WEIGHTS, "PEFT")
    tensors, sources = {}, {}
    for key, tensor in read_tensors(weights).items():
        module, _, param = key.removeprefix(_PEFT_PREFIX).rpartition(".")
        found = resolve_module(gm, module, key_mapping) if param in _LYCORIS_PARAMS else None
        put(tensors, sources, key if found is None else f"{found}.{param}", tensor, key, weights)
    return Converted(kind.lower(), config, tensors, weights, sources, path)


def _write_lycoris(gm: AdaptedModule, name: str) -> tuple[str, dict, str, dict[str, torch.Tensor]]:
    adapter = gm._adapter(name)
    config = adapter.config
    fused = next((p for p in adapter.placements if p.site.columns is not None), None)
    if fused is not None:
        raise CheckpointError(f"adapter {name!r}: a {type(config).__name__} on one role of the fused projection {fused.site.name} has no "
                              "PEFT form (PEFT adapts whole modules); use targets= with the whole module, or fxadapt's format")
    tensors = {f"{_PEFT_PREFIX}{p.site.path}.{param}": tensor
               for p in adapter.placements for param, tensor in gm.get_submodule(p.module).named_parameters()}
    fields = {f: getattr(config, f) for f in _LYCORIS_FIELDS if hasattr(config, f)}
    fields["rank_pattern"], fields["alpha_pattern"] = dict(config.rank_pattern), dict(config.alpha_pattern)
    meta = {"peft_type": type(config).__name__.removesuffix("Config").upper(), "target_modules": sorted({p.site.path for p in adapter.placements}),
            **fields, "use_effective_conv2d": False, "modules_to_save": None, "inference_mode": True, "task_type": None,
            "base_model_name_or_path": None}
    return HUB_CONFIG, meta, PEFT_WEIGHTS[0], tensors


# VeRA: the PEFT config fields fxadapt reads, with the JSON types each must have; its tensors' names.
_VERA_FIELDS = {"r": (int,), "target_modules": (list, str), "projection_prng_key": (int,), "save_projection": (bool,),
                "vera_dropout": (int, float), "d_initial": (int, float), "fan_in_fan_out": (bool,), "init_weights": (bool,)}
_VERA_PARAMS = ("vera_lambda_d", "vera_lambda_b")
_VERA_SHARED = {"base_model.vera_A": "shared_parameters.vera_A", "base_model.vera_B": "shared_parameters.vera_B"}


def _read_vera(gm: AdaptedModule, directory: str, path: str, meta: dict, key_mapping) -> Converted:
    """A PEFT VeRA adapter: ``base_model.model.<module>.vera_lambda_d`` / ``.vera_lambda_b`` and, saved with
    ``save_projection`` (PEFT's default), the shared ``base_model.vera_A`` / ``base_model.vera_B``; without
    them A and B are drawn again from ``projection_prng_key`` as PEFT does (PEFT warns that this may
    differ between systems). fxadapt's config: ``VeraConfig`` with ``alpha = r`` (PEFT scales by 1)."""
    from ..config import VeraConfig

    bad = [f for f in (*_PEFT_UNSUPPORTED, "layers_pattern") if meta.get(f)] + (["bias"] if meta.get("bias", "none") != "none" else [])
    if bad:
        raise CheckpointError(f"{path}: PEFT option {bad[0]}={meta[bad[0]]!r} is not supported by fxadapt", path=path)
    for name, types in _VERA_FIELDS.items():
        value = meta.get(name)
        if name in meta and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            raise CheckpointError(f"{path}: {name} must be {' or '.join(_JSON_NAMES[t] for t in types)}, got {value!r}", path=path)
    target = meta.get("target_modules")
    if target is None:
        raise CheckpointError(f"{path}: target_modules must be a list or a string, got None", path=path)
    r = meta.get("r", 256)
    try:
        config = VeraConfig(selfattn_lora=False, targets=tuple(target) if isinstance(target, list) else target, r=r, alpha=r,
                            dropout=meta.get("vera_dropout", 0.0), vera_d=meta.get("d_initial", 0.1), vera_b=0.0,
                            init_weights_seed=meta.get("projection_prng_key", 0))
    except ConfigError as e:
        field = {"dropout": "vera_dropout", "vera_d": "d_initial", "init_weights_seed": "projection_prng_key", "targets": "target_modules"}
        raise CheckpointError(f"{path}: {field.get(e.field, e.field)}: {e}", path=path) from e
    config = translate(gm, config, key_mapping)
    weights = first_file(directory, PEFT_WEIGHTS, "PEFT")
    tensors, sources = {}, {}
    for key, tensor in read_tensors(weights).items():
        if key in _VERA_SHARED:
            put(tensors, sources, _VERA_SHARED[key], tensor, key, weights)
            continue
        module, _, param = key.removeprefix(_PEFT_PREFIX).rpartition(".")
        found = resolve_module(gm, module, key_mapping) if param in _VERA_PARAMS else None
        put(tensors, sources, key if found is None else f"{found}.{param}", tensor, key, weights)
    missing = [k for k in _VERA_SHARED.values() if k not in tensors]
    if missing and len(missing) < len(_VERA_SHARED):
        raise CheckpointError(f"{weights}: has {'base_model.vera_B' if missing[0].endswith('A') else 'base_model.vera_A'} but not the other",
                              path=weights)
    if missing:  # save_projection=False: PEFT's draw from projection_prng_key, of the largest widths
        from ..errors import SiteError
        from ..methods.vera import projections
        from ..plan import plan

        try:
            sites = [p.site for p in plan("adapter", config, gm._fx_anatomy)]
        except (ConfigError, SiteError) as e:
            raise CheckpointError(f"{path}: the adapter does not fit {gm._fx_model_name}: {e}", path=path) from e
        a, b = projections(config, max(s.in_features for s in sites), max(s.out_features for s in sites))
        dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
        for key, value in zip(_VERA_SHARED.values(), (a, b)):
            tensors[key], sources[key] = value.to(dtype), f"{key} (drawn from projection_prng_key={config.init_weights_seed})"
    return Converted("vera", config, tensors, weights, sources, path)


def _write_vera(gm: AdaptedModule, name: str) -> tuple[str, dict, str, dict[str, torch.Tensor]]:
    """PEFT's VERA with ``save_projection=True``: ``vera_lambda_b`` carries fxadapt's ``scaling`` (PEFT has none)."""
    adapter = gm._adapter(name)
    config = adapter.config
    fused = next((p for p in adapter.placements if p.site.columns is not None), None)
    if fused is not None:
        raise CheckpointError(f"adapter {name!r}: a {type(config).__name__} on one role of the fused projection {fused.site.name} has no "
                              "PEFT form (PEFT adapts whole modules); use targets= with the whole module, or fxadapt's format")
    tensors: dict[str, torch.Tensor] = {}
    for p in adapter.placements:
        w = gm.get_submodule(p.module)
        key = f"{_PEFT_PREFIX}{p.site.path}."
        tensors[key + "vera_lambda_d"] = w.vera_lambda_d
        tensors[key + "vera_lambda_b"] = w.vera_lambda_b if w.scaling == 1.0 else (w.vera_lambda_b.detach() * w.scaling)
    shared = gm.get_submodule(adapter.placements[0].shared[0])
    tensors["base_model.vera_A"], tensors["base_model.vera_B"] = shared.vera_A, shared.vera_B
    meta = {"peft_type": "VERA", "target_modules": sorted({p.site.path for p in adapter.placements}), "r": config.r,
            "projection_prng_key": config.init_weights_seed or 0, "save_projection": True, "vera_dropout": config.dropout,
            "d_initial": config.vera_d, "fan_in_fan_out": any(p.site.linear.transposed for p in adapter.placements), "bias": "none",
            "init_weights": True, "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None, "inference_mode": True,
            "task_type": None, "base_model_name_or_path": None}
    return HUB_CONFIG, meta, PEFT_WEIGHTS[0], tensors


def write(gm: AdaptedModule, name: str) -> tuple[str, dict, str, dict[str, torch.Tensor]]:
    adapter = gm._adapter(name)
    config = adapter.config
    if isinstance(config, (LoHaConfig, LoKrConfig)):
        return _write_lycoris(gm, name)
    if getattr(config, "method", None) == "vera":
        return _write_vera(gm, name)
    if not isinstance(config, LoRAConfig) or config.use_gating:
        raise CheckpointError(f"adapter {name!r} ({type(config).__name__}) has no PEFT form: PEFT's format holds LoRA, (IA)^3, "
                              "LoHa and LoKr")
    by_path: dict[str, list[Placement]] = {}
    for p in adapter.placements:
        by_path.setdefault(p.site.path, []).append(p)
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas, feedforward = {}, {}, []
    for path, parts in by_path.items():
        weights = [gm.get_submodule(p.module) for p in parts]
        site = parts[0].site
        key = _PEFT_PREFIX + path
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
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = weights[0].lora_A, weights[0].lora_B
            if config.method == "dora":
                tensors[key + ".lora_magnitude_vector"] = weights[0].magnitude
        elif config.method == "dora":
            raise CheckpointError(f"adapter {name!r}: a DoRA on one role of the fused projection {parts[0].site.name} has no PEFT form "
                                  "(PEFT adapts whole modules); use targets= with the whole module, or fxadapt's format")
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
    common = {"target_modules": list(by_path), "fan_in_fan_out": any(p.site.linear.transposed for p in adapter.placements),
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
