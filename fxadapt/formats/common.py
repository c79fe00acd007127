"""What the checkpoint formats share: file names, the :class:`Converted` adapter every reader
returns, safe reading of tensors and JSON, matching a file's module paths to the model's, and the
checks every method's PEFT conversion (``Method.peft``) makes."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..config import AdapterConfig, ConfigUnion, LoRAConfig
from ..errors import CheckpointError, ConfigError, SiteError
from ..placement import Placement, check_layers
from ..sites import Anatomy

if TYPE_CHECKING:
    from ..module import AdaptedModule

NATIVE_CONFIG, NATIVE_WEIGHTS = "fxadapt_config.json", "fxadapt_model.safetensors"
HUB_CONFIG = "adapter_config.json"  # PEFT's and AdapterHub's
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTERHUB_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
PEFT_PREFIX = "base_model.model."  # of every module path in PEFT's weights files
#: Every file of a checkpoint in any format fxadapt reads (with AdapterHub's head files): saving
#: replaces all of them, so that no stale file of another format is left for ``load_adapter`` to prefer.
CHECKPOINT_FILES = frozenset({NATIVE_CONFIG, NATIVE_WEIGHTS, HUB_CONFIG, *PEFT_WEIGHTS, *ADAPTERHUB_WEIGHTS,
                              "head_config.json", "pytorch_model_head.bin", "model_head.safetensors"})


@dataclass
class Converted:
    """An adapter read from a file, in fxadapt's terms: its ``config`` and its ``tensors`` keyed as
    ``adapter_state_dict`` keys. ``sources`` maps a key to the tensor's name in the file (``path``),
    ``config_path`` names the file the config was read from, for error messages."""

    name: str
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    path: str
    sources: dict[str, str] = field(default_factory=dict)
    config_path: str | None = None


@dataclass
class AdapterHubCheckpoint:
    """What an AdapterHub converter gets: the adapter ``name`` and ``config`` (the ``config`` entry of
    ``adapter_config.json``) and the weights file's ``tensors``, keyed as AdapterHub stored them."""

    name: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    config_path: str
    weights_path: str
    key_mapping: dict[str, str] | None = None

    def make_config(self, cls: type[AdapterConfig], *args: Any, **fields: Any) -> AdapterConfig:
        """``cls(*args, **fields)``, a ConfigError turned into a CheckpointError naming the config file."""
        try:
            return cls(*args, **fields)
        except (ConfigError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.config_path}: AdapterHub config cannot be used: {e}", path=self.config_path) from e

    def modules(self, gm: AdaptedModule, container: str) -> tuple[dict[str, dict[str, tuple[str, torch.Tensor]]], dict[str, torch.Tensor]]:
        """Tensors ``<module>.<container>.<name>.<param>`` grouped by the model's linear they belong to:
        ``{linear path: {param: (file key, tensor)}}``, and the tensors that fit no linear (by file key)."""
        marker = f".{container}.{self.name}."
        grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        rest: dict[str, torch.Tensor] = {}
        for key, tensor in self.tensors.items():
            module, sep, param = key.partition(marker)
            path = resolve_module(gm, module, self.key_mapping) if sep else None
            if path is None:
                rest[key] = tensor
            elif param in grouped.setdefault(path, {}):
                raise CheckpointError(f"{self.weights_path}: tensors {grouped[path][param][0]} and {key} are both {path}'s {param}",
                                      path=self.weights_path, tensor=key)
            else:
                grouped[path][param] = (key, tensor)
        return grouped, rest

    def placements(self, place: Callable[[str, AdapterConfig, Anatomy], list[Placement]], gm: AdaptedModule,
                   config: AdapterConfig) -> list[Placement]:
        """What the method's rule ``place`` makes of ``config`` on ``gm`` (``add_adapter`` plans again, with
        everything); a config the model cannot take is a CheckpointError naming the config file."""
        try:
            check_layers(config, gm._fx_anatomy)
            return place("adapter", config, gm._fx_anatomy)
        except (ConfigError, SiteError) as e:
            raise CheckpointError(f"{self.config_path}: the adapter does not fit {gm._fx_model_name}: {e}", path=self.config_path) from e


# PEFT config fields that change what the adapter computes and that fxadapt cannot express: they must be off.
PEFT_UNSUPPORTED = ("lora_bias", "modules_to_save", "layers_to_transform", "exclude_modules", "target_parameters",
                    "layer_replication", "trainable_token_indices", "alora_invocation_tokens", "use_bdlora")
_JSON_NAMES = {int: "an integer", float: "a number", bool: "true or false", list: "a list", str: "a string", dict: "an object",
               type(None): "null"}


def check_peft(path: str, meta: dict[str, Any], fields: dict[str, tuple[type, ...]], refuse: tuple[str, ...] = (),
               bias: bool = False) -> None:
    """Refuse a PEFT config (``meta``, read from ``path``) that turns on an option fxadapt cannot express
    (``PEFT_UNSUPPORTED``, then ``refuse``, then with ``bias`` a ``bias`` other than "none"), or whose
    ``fields`` have other JSON types than those given (true/false is no number here, "false" no boolean)."""
    bad = [f for f in (*PEFT_UNSUPPORTED, *refuse) if meta.get(f)] + (["bias"] if bias and meta.get("bias", "none") != "none" else [])
    if bad:
        raise CheckpointError(f"{path}: PEFT option {bad[0]}={meta[bad[0]]!r} is not supported by fxadapt", path=path)
    for name, types in fields.items():
        value = meta.get(name)
        if name in meta and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            raise CheckpointError(f"{path}: {name} must be {' or '.join(_JSON_NAMES[t] for t in types)}, got {value!r}", path=path)


def whole_modules(gm: AdaptedModule, name: str):
    """Adapter ``name``, refused when a part of it sits on one role of a fused projection: PEFT adapts
    whole modules, so only a method that can write such parts as one whole-module adapter (LoRA) may."""
    adapter = gm._adapter(name)
    fused = next((p for p in adapter.placements if p.site.columns is not None), None)
    if fused is not None:
        raise CheckpointError(f"adapter {name!r}: a {type(adapter.config).__name__.removesuffix('Config')} on one role of the fused "
                              f"projection {fused.site.name} has no PEFT form (PEFT adapts whole modules); use targets= with the whole "
                              "module, or fxadapt's format")
    return adapter


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a torch pickle read with ``weights_only=True`` (which
    refuses any object but tensors and plain containers, so no code from the file runs).

    Raises CheckpointError naming the file when it is missing, truncated, corrupt or unsafe.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist", path=path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # SafetensorError, OSError: truncated, corrupt, not safetensors
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})", path=path) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = "weights only load failed" in str(e).lower()
        why = ("holds objects other than tensors (refused: fxadapt never unpickles code; "
               f"{str(e).splitlines()[-1].strip()})") if unsafe else f"cannot be read ({type(e).__name__}: {e})"
        raise CheckpointError(f"{path} {why}", path=path) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise CheckpointError(f"{path} is not a mapping of names to tensors", path=path)
    return data


def read_json(path: str) -> dict[str, Any]:
    def refuse(constant: str):
        raise CheckpointError(f"{path} holds {constant}, which is not a JSON number", path=path)

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, parse_constant=refuse)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist", path=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})", path=path) from None
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be an adapter config", path=path) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object", path=path)
    return data


def put(tensors: dict[str, torch.Tensor], sources: dict[str, str], key: str, tensor: torch.Tensor, source: str, path: str) -> None:
    """Keep the file's tensor ``source`` as the adapter's ``key``; two tensors for one weight is a corrupt file."""
    if key in tensors:
        raise CheckpointError(f"{path}: tensors {sources[key]} and {source} both give the adapter's {key}", path=path, tensor=source)
    tensors[key], sources[key] = tensor, source


def first_file(directory: str, names: Iterable[str], what: str) -> str:
    for name in names:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise CheckpointError(f"{directory} has no {what} weights file (looked for {', '.join(names)})", path=directory)


def resolve_module(gm: AdaptedModule, path: str, key_mapping: dict[str, str] | None = None) -> str | None:
    """The path of the model's linear a file's module path names: after ``key_mapping``, the same
    path, or the only linear whose path ends with it (or that it ends with); None when none fits."""
    return by_suffix(mapped(path, key_mapping), {lin.path for lin in gm._fx_linears.values()})


def mapped(path: str, key_mapping: dict[str, str] | None) -> str:
    for pattern, replacement in (key_mapping or {}).items():
        path = re.sub(pattern, replacement, path)
    return path


def by_suffix(name: str, names: Iterable[str]) -> str | None:
    """``name`` itself, or the only one of ``names`` that ends with it or that it ends with (at a dot)."""
    names = set(names)
    if name in names:
        return name
    hits = [n for n in names if n.endswith("." + name) or name.endswith("." + n)]
    return hits[0] if len(hits) == 1 else None


def translate(gm: AdaptedModule, config: AdapterConfig, key_mapping: dict[str, str] | None) -> AdapterConfig:
    """``config`` with the module paths it names (``targets``, ``input_scaling_targets`` lists,
    ``rank_pattern`` / ``alpha_pattern`` keys) rewritten to the model's where, as written, they name
    none of its linears but one by suffix or after ``key_mapping`` (a file saved from a model with a
    head, loaded into the base model, or the other way round). Names that match stay as they are."""
    if isinstance(config, ConfigUnion):
        parts = tuple(translate(gm, c, key_mapping) for c in config.configs)
        return config if parts == config.configs else dataclasses.replace(config, configs=parts)
    if not isinstance(config, LoRAConfig):
        return config
    paths = [lin.path for lin in gm._fx_linears.values()]

    def name(entry: str) -> str:  # a list entry: PEFT's suffix match
        if any(p == entry or p.endswith("." + entry) for p in paths):
            return entry
        return resolve_module(gm, entry, key_mapping) or entry

    def pattern(key: str) -> str:  # a pattern key: PEFT's regex on the path's tail; a path written plain or escaped
        if any(re.match(rf"(.*\.)?({key})$", p) for p in paths):
            return key
        plain = re.sub(r"\\(.)", r"\1", key)
        found = resolve_module(gm, plain, key_mapping) if key in (plain, re.escape(plain)) else None
        return key if found is None else re.escape(found) if key != plain else found

    changes = {f: tuple(name(t) for t in getattr(config, f)) for f in ("targets", "input_scaling_targets")
               if isinstance(getattr(config, f), tuple)}
    changes.update({f: tuple((pattern(k), v) for k, v in getattr(config, f)) for f in ("rank_pattern", "alpha_pattern")})
    return config.replace(**changes)


def layer_and_location(key: str, container: str) -> tuple[int | None, str]:
    """AdapterHub's bottleneck keys name the layer by its index and the block by "attention" in
    the path before the container (``encoder.layer.0.attention.output.adapters``,
    ``h.0.attention_adapters.adapters``) or not (``encoder.layer.0.output.adapters``)."""
    before = key.split(f".{container}.")[0].split(".")
    layer = next((int(part) for part in before if part.isdigit()), None)
    return layer, "mh" if any("attention" in part for part in before) else "output"


def known_fields(cls: type[AdapterConfig], config: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in config.items() if k in known}
