"""AdapterHub's format (read): ``adapter_config.json`` with ``config`` and ``adapter.safetensors`` or
``pytorch_adapter.bin``. Each method converts its own architecture's checkpoints
(``Method.adapterhub``); ``ADAPTERHUB_CONVERTERS`` holds those, the union's, and any registered
with :func:`register_adapterhub_converter`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import ConfigUnion
from ..errors import CheckpointError
from ..methods import METHODS
from ..naming import owner
from .common import ADAPTERHUB_WEIGHTS, HUB_CONFIG, AdapterHubCheckpoint, Converted, first_file, put, read_json, read_tensors, translate

if TYPE_CHECKING:
    from ..module import AdaptedModule

#: AdapterHub architecture (``config["architecture"]``) -> converter(gm, AdapterHubCheckpoint) -> Converted.
ADAPTERHUB_CONVERTERS: dict[str, Callable[[AdaptedModule, AdapterHubCheckpoint], Converted]] = {}


def register_adapterhub_converter(architecture: str):
    """Register how AdapterHub checkpoints of an architecture (``config["architecture"]`` in their
    ``adapter_config.json``: "lora", "bottleneck", "prefix_tuning", "union", ...) become fxadapt
    adapters. The converter gets the model and an :class:`AdapterHubCheckpoint`, builds the fxadapt
    config from ``ckpt.config`` (``ckpt.make_config``), renames the file's tensors to the model's
    ``adapter_state_dict`` keys (``ckpt.modules`` groups them by the model's linears; ``ckpt.plan`` and
    :func:`state_key` give the keys of LoRA-style placements), reshapes them where the layouts differ,
    and returns a :class:`Converted`. It need not check shapes or completeness: ``load_adapter``
    checks the result against the adapter it adds. For example (the LoRA converter is longer)::

        @register_adapterhub_converter("bottleneck")
        def convert(gm, ckpt):
            config = ckpt.make_config(BnConfig, **{k: v for k, v in ckpt.config.items() if k != "architecture"})
            tensors = {rename(key): tensor for key, tensor in ckpt.tensors.items()}
            return Converted(ckpt.name, config, tensors, ckpt.weights_path, sources={rename(k): k for k in ckpt.tensors})
    """

    def register(fn):
        ADAPTERHUB_CONVERTERS[architecture] = fn
        return fn

    return register


def read(gm: AdaptedModule, directory: str, key_mapping) -> Converted:
    path = os.path.join(directory, HUB_CONFIG)
    meta = read_json(path)
    config = meta.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: AdapterHub's config must be an object, got {config!r}", path=path)
    architecture = config.get("architecture") or "bottleneck"  # AdapterHub's bottleneck configs leave it unset
    converter = ADAPTERHUB_CONVERTERS.get(architecture) if isinstance(architecture, str) else None
    if converter is None:
        raise CheckpointError(f"{path}: no converter for AdapterHub architecture {architecture!r} "
                              f"(registered: {sorted(ADAPTERHUB_CONVERTERS)})", path=path)
    weights = first_file(directory, ADAPTERHUB_WEIGHTS, "AdapterHub")
    if not isinstance(meta.get("name", ""), str):
        raise CheckpointError(f"{path}: name must be a string, got {meta['name']!r}", path=path)
    ckpt = AdapterHubCheckpoint(meta.get("name") or architecture, config, read_tensors(weights), path, weights, key_mapping)
    converted = converter(gm, ckpt)
    return dataclasses.replace(converted, config=translate(gm, converted.config, key_mapping), config_path=path)


@register_adapterhub_converter("union")
def _adapterhub_union(gm: AdaptedModule, ckpt: AdapterHubCheckpoint) -> Converted:
    """AdapterHub ConfigUnion (MAM, UniPELT): each part's converter on its own tensors."""
    configs, tensors, sources = [], {}, {}
    parts = ckpt.config.get("configs", [])
    if not isinstance(parts, list) or not all(isinstance(p, dict) and (p.get("architecture") or "bottleneck") in ("lora", "bottleneck", "prefix_tuning")
                                              for p in parts):
        raise CheckpointError(f"{ckpt.config_path}: a union's configs must be a list of configs of known architectures, got {parts!r}",
                              path=ckpt.config_path)
    for part in parts:
        architecture = part.get("architecture") or "bottleneck"
        mine = {k: t for k, t in ckpt.tensors.items() if owner(k, ckpt.name) == architecture}
        converted = ADAPTERHUB_CONVERTERS[architecture](gm, dataclasses.replace(ckpt, config=part, tensors=mine))
        configs.append(converted.config)
        for key, tensor in converted.tensors.items():
            put(tensors, sources, key, tensor, converted.sources.get(key, key), ckpt.weights_path)
    leftover = [k for k in ckpt.tensors if owner(k, ckpt.name) is None]
    if leftover:
        raise CheckpointError(f"{ckpt.weights_path}: unexpected tensor {leftover[0]}", path=ckpt.weights_path, tensor=leftover[0])
    config = ckpt.make_config(ConfigUnion, *configs)
    return Converted(ckpt.name, config, tensors, ckpt.weights_path, sources)


ADAPTERHUB_CONVERTERS.update({m.architecture: m.adapterhub for m in METHODS.values() if m.adapterhub is not None})
