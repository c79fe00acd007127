"""PEFT's ``modules_to_save``: an adapter's own copy of whole modules (a classification head).

A LoRA-family config with ``modules_to_save=["classifier"]`` gives its adapter a copy of every
parameter of the modules it names (a module path or its tail, at a dot, as PEFT matches them). While
the adapter is active the graph reads the copies: the rule rewrites the ``get_attr`` nodes of those
parameters, so the base parameters stay as they are, ``train_adapter`` trains only the copies, and
another adapter (or none) sees the base module again. Merged, the copies replace the base parameters
(``merge_and_unload`` returns a model whose classifier is the copy). One active adapter at a time may
keep a copy of a parameter (PEFT's rule).

Where: ``<owner>.modules_to_save.<adapter>.<leaf>`` for the parameter ``<owner>.<leaf>``, one module
per parameter holding ``value``; state key ``<owner>.modules_to_save.<leaf>.value``. PEFT's files hold
the copy under the base parameter's own path (``base_model.model.classifier.dense.weight``, the adapter
name and ``modules_to_save`` dropped, as ``get_peft_model_state_dict`` writes them).

The placements hang off the adapter's own method (``fxadapt.plan.plan`` adds them for any config with
``modules_to_save``); the PEFT conversions of the methods never see them (:func:`hidden`), and
:func:`read_peft` / :func:`write_peft` add the copies' tensors and config field.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import AdapterError, CheckpointError, ConfigError, SiteError
from ..naming import SAVED, state_key, weights_path
from ..placement import Placement
from ..sites import Anatomy, Linear, Site
from .base import Emitter, Method

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from ..formats.common import Converted
    from ..module import AdaptedModule

NAME = "saved_modules"


class SavedParameter(nn.Module):
    """An adapter's copy of one base parameter, ``value`` (made from the parameter as it is when the
    adapter is added, as PEFT deep-copies the module)."""

    label = "copy"  # in fxadapt.draw's pictures

    def __init__(self, where: Site, config: AdapterConfig, like: torch.Tensor):
        super().__init__()
        self.value = nn.Parameter(like.detach().clone())


def modules(config: AdapterConfig, anatomy: Anatomy) -> dict[str, str]:
    """Every parameter the config's ``modules_to_save`` covers -> the module path it was matched by.
    Entries that match nothing are skipped, as PEFT does (its SEQ_CLS configs list both "classifier"
    and "score"); SiteError when no entry matches a module whose parameters the graph reads."""
    out: dict[str, str] = {}
    for target in config.modules_to_save:
        for path in anatomy.parameters:
            parts = path.split(".")
            owner = next((m for m in (".".join(parts[:i]) for i in range(1, len(parts))) if m == target or m.endswith("." + target)), None)
            if owner is not None:
                out.setdefault(path, owner)
    if not out:
        raise SiteError(f"{type(config).__name__}.modules_to_save={list(config.modules_to_save)} names no module of "
                        f"{anatomy.model_name} whose parameters the graph reads")
    return out


def place(name: str, config: AdapterConfig, anatomy: Anatomy) -> list[Placement]:
    """One placement per covered parameter, at the ``get_attr`` nodes that read it; a linear's weight
    before the rest (a merge folds a linear's weight with its bias: the bias's own copy comes after)."""
    weights = {lin.weight for lin in anatomy.linears.values()}
    paths = sorted(modules(config, anatomy), key=lambda p: p not in weights)
    placements = []
    for path in paths:
        owner, _, leaf = path.rpartition(".")
        linear = Linear(owner, path, None, False, 0, 0, anatomy.parameters[path])
        placements.append(Placement(name, NAME, Site(None, None, path, 0, 0, linear), weights_path(SAVED, name, owner, leaf), config))
    return placements


def insert(e: Emitter, p: Placement, w: SavedParameter) -> None:
    """The parameter's readers read the copy instead."""
    if e.y is not e.node:  # another active adapter's copy already stands in
        raise AdapterError(f"adapters {e.y.target.split('.')[-2]!r} and {p.adapter!r} both keep a copy of {p.site.path} "
                           "(modules_to_save): activate one of them at a time")
    e.y = e.attr(f"{p.module}.value")


def fold(weight: torch.Tensor, bias: torch.Tensor | None, p: Placement, w: SavedParameter):
    """Merged: the copy in place of the parameter (a linear's bias, when copied too, has its own placement)."""
    return w.value.detach().clone(), bias


METHOD = Method(NAME, "lora", SavedParameter, insert, place, fold)


# -- PEFT checkpoints --------------------------------------------------------------------------------------


def saved_placements(gm: AdaptedModule, name: str) -> list[Placement]:
    return [p for p in gm._adapter(name).placements if p.method == NAME]


@contextlib.contextmanager
def hidden(gm: AdaptedModule, name: str):
    """Adapter ``name`` without its copies while a method's PEFT writer reads its placements."""
    adapter = gm._adapter(name)
    placements = adapter.placements
    adapter.placements = [p for p in placements if p.method != NAME]
    try:
        yield
    finally:
        adapter.placements = placements


def write_peft(gm: AdaptedModule, name: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Add the copies to a PEFT checkpoint: ``base_model.model.<parameter path>`` and the config's
    ``modules_to_save``."""
    from ..formats.common import PEFT_PREFIX

    saved = saved_placements(gm, name)
    if not saved:
        return
    meta["modules_to_save"] = list(gm._adapter(name).config.modules_to_save)
    for p in saved:
        tensors[PEFT_PREFIX + p.site.path] = gm.get_submodule(p.module).value.detach()


def read_peft(gm: AdaptedModule, converted: Converted, saved: list[str], path: str, key_mapping) -> Converted:
    """A method's reading of a PEFT checkpoint with ``modules_to_save``: the config field set and the
    copies (under their base parameters' paths in the file) keyed as the adapter's."""
    from ..formats.common import PEFT_PREFIX, by_suffix, mapped

    if not isinstance(saved, list) or not all(isinstance(s, str) for s in saved):
        raise CheckpointError(f"{path}: modules_to_save must be null or a list of module names, got {saved!r}", path=path)
    try:
        config = converted.config.replace(modules_to_save=tuple(saved))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: modules_to_save: {e}", path=path) from e
    try:
        covered = modules(config, gm._fx_anatomy)
    except SiteError as e:
        raise CheckpointError(f"{path}: the adapter does not fit {gm._fx_model_name}: {e}", path=path) from e
    tensors, sources = {}, dict(converted.sources)
    for key, tensor in converted.tensors.items():
        source = converted.sources.get(key, key)
        param = by_suffix(mapped(source.removeprefix(PEFT_PREFIX), key_mapping), covered) if key == source else None
        if param is None:
            tensors[key] = tensor
            continue
        owner, _, leaf = param.rpartition(".")
        ours = state_key(weights_path(SAVED, "adapter", owner, leaf), "adapter", "value")
        if ours in tensors:
            raise CheckpointError(f"{converted.path}: tensors {sources[ours]} and {source} are both the copy of {param}",
                                  path=converted.path, tensor=source)
        tensors[ours], sources[ours] = tensor, source
        sources.pop(key, None)
    return dataclasses.replace(converted, config=config, tensors=tensors, sources=sources)
