"""fxadapt's own format: ``fxadapt_config.json`` (``format``, ``fxadapt_version``, adapter
``name``, ``config`` as ``AdapterConfig.to_dict()``, the ``modules`` it adapts) and
``fxadapt_model.safetensors`` (the tensors of ``adapter_state_dict``), for every method. Round
trips are bit for bit."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from ..config import AdapterConfig
from ..errors import CheckpointError, ConfigError
from .common import NATIVE_CONFIG, NATIVE_WEIGHTS, Converted, mapped, put, read_json, read_tensors, translate

if TYPE_CHECKING:
    from ..module import AdaptedModule


def read(gm: AdaptedModule, directory: str, key_mapping) -> Converted:
    path = os.path.join(directory, NATIVE_CONFIG)
    meta = read_json(path)
    if meta.get("format") != "fxadapt" or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f'{path} is not an fxadapt adapter config (needs "format": "fxadapt" and a "config" object)', path=path)
    if not isinstance(meta.get("name", ""), str):
        raise CheckpointError(f"{path}: name must be a string, got {meta['name']!r}", path=path)
    try:
        config = AdapterConfig.from_dict(meta["config"])
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config: {e}", path=path) from e
    weights = os.path.join(directory, NATIVE_WEIGHTS)
    # Keys are matched to the model's by suffix when the adapter is checked (_match_keys).
    tensors, sources = {}, {}
    for key, tensor in read_tensors(weights).items():
        put(tensors, sources, mapped(key, key_mapping), tensor, key, weights)
    return Converted(meta.get("name") or config.architecture, translate(gm, config, key_mapping), tensors, weights, sources, path)


def write(gm: AdaptedModule, name: str) -> tuple[str, dict, str, dict[str, torch.Tensor]]:
    from .. import __version__

    adapter = gm._adapter(name)
    meta = {"format": "fxadapt", "fxadapt_version": __version__, "name": name, "config": adapter.config.to_dict(),
            "modules": sorted({p.site.name if p.site is not None else p.module for p in adapter.placements} - {None})}
    return NATIVE_CONFIG, meta, NATIVE_WEIGHTS, dict(gm.adapter_state_dict(name))
