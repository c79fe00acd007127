"""PEFT's format, both ways: ``adapter_config.json`` with ``peft_type`` and ``adapter_model.safetensors``
(or ``adapter_model.bin``), keys ``base_model.model.<module>.<param>``. Each method converts its own
checkpoints (``Method.peft``: LoRA's file LORA and IA3, DoRA's as LORA with ``use_dora``, LoHa's LOHA
and LOKR, VeRA's VERA); this file reads by ``peft_type`` and writes by the adapter's method.
``fxadapt.formats.common`` holds the checks and names the conversions share."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError
from ..methods import METHODS, saved_modules
from ..methods.base import PeftFormat
from .common import HUB_CONFIG, Converted, read_json

if TYPE_CHECKING:
    from ..module import AdaptedModule


def formats() -> dict[str, PeftFormat]:
    """Every PEFT type fxadapt reads and writes, by ``peft_type``: the methods' ``Method.peft``."""
    return {m.peft.peft_type: m.peft for m in METHODS.values() if m.peft is not None}


def read(gm: AdaptedModule, directory: str, key_mapping) -> Converted:
    path = os.path.join(directory, HUB_CONFIG)
    meta = read_json(path)
    kind, table = meta.get("peft_type"), formats()
    if not isinstance(kind, str) or kind not in table:
        raise CheckpointError(f"{path}: peft_type {kind!r} is not supported (fxadapt reads {', '.join(table)})", path=path)
    # modules_to_save (PEFT's per-adapter copies, written by SEQ_CLS adapters) is read apart from the method.
    saved = meta.get("modules_to_save")
    converted = table[kind].read(gm, directory, path, {**meta, "modules_to_save": None} if saved else meta, key_mapping)
    return saved_modules.read_peft(gm, converted, saved, path, key_mapping) if saved else converted


def write(gm: AdaptedModule, name: str) -> tuple[str, dict, str, dict[str, torch.Tensor]]:
    config = gm._adapter(name).config
    method = METHODS.get(config.method)
    if method is None or method.peft is None:
        raise CheckpointError(f"adapter {name!r} ({type(config).__name__}) has no PEFT form: PEFT's format holds "
                              f"{', '.join(formats())}")
    with saved_modules.hidden(gm, name):  # the method's writer sees its own placements only
        config_name, meta, weights_name, tensors = method.peft.write(gm, name)
    saved_modules.write_peft(gm, name, meta, tensors)
    return config_name, meta, weights_name, tensors
