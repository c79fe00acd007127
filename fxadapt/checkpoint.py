"""Adapter checkpoints: the native format, PEFT's format both ways, AdapterHub import, safe loading.

:class:`CheckpointMixin` gives :class:`~fxadapt.AdaptedModule` ``save_adapter``, ``load_adapter`` and
``average_adapter``. ``load_adapter`` tells the formats apart by the files in the directory:

- fxadapt: ``fxadapt_config.json`` (``format``, ``fxadapt_version``, adapter ``name``, ``config`` as
  ``AdapterConfig.to_dict()``, the ``modules`` it adapts) + ``fxadapt_model.safetensors`` (the
  tensors of ``adapter_state_dict``). Round trips are bit for bit.
- PEFT (LoRA, (IA)^3): ``adapter_config.json`` with ``peft_type`` + ``adapter_model.safetensors``
  (or ``adapter_model.bin``); keys ``base_model.model.<module>.lora_A.weight`` / ``.ia3_l``.
- AdapterHub: ``adapter_config.json`` with ``config`` + ``adapter.safetensors`` or
  ``pytorch_adapter.bin``, converted by ``ADAPTERHUB_CONVERTERS[config["architecture"]]``.

Saving is crash-safe: the files are written into a temporary directory beside the target, which
replaces the target's checkpoint files (of every format: ``CHECKPOINT_FILES``) in one step only when
all are complete; the directory's other files are kept.

Loading never runs code from a file: safetensors, or ``torch.load(weights_only=True)``. Before anything
is allocated, the config's field types, the tensors' dtypes and values (finite) and the adapter the
config asks for (planned on the meta device: every tensor present, none extra, same shapes) are checked
against the file; only then is the adapter added and filled in. Any failure raises
:class:`~fxadapt.errors.CheckpointError` naming the file, the field or tensor, and leaves the model
exactly as it was (a failure while filling in deletes the new adapter again).

Module paths are matched to the model's exactly, or by suffix, in every format: a file saved from
``BertForSequenceClassification`` names ``bert.encoder...``, a ``BertModel`` has ``encoder...`` (and
the other way round); the same holds for the module paths a config names (``targets``, patterns).
``key_mapping`` (regex -> replacement, as transformers' ``from_pretrained``) renames module paths
first, for models whose modules were renamed since the file was written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .config import DTYPES, AdapterConfig, BnConfig, ConfigUnion, IA3Config, LoRAConfig, PrefixTuningConfig
from .errors import AdapterError, CheckpointError, ConfigError, SiteError
from .fsutil import atomic_directory
from .passes import METHODS
from .plan import Placement, plan

if TYPE_CHECKING:
    from .module import AdaptedModule

__all__ = ["CheckpointMixin", "Converted", "AdapterHubCheckpoint", "ADAPTERHUB_CONVERTERS", "register_adapterhub_converter",
           "read_tensors", "detect_format", "resolve_module", "state_key", "AVERAGE_IGNORES", "CHECKPOINT_FILES"]

NATIVE_CONFIG, NATIVE_WEIGHTS = "fxadapt_config.json", "fxadapt_model.safetensors"
HUB_CONFIG = "adapter_config.json"  # PEFT's and AdapterHub's
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTERHUB_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
_PEFT_PREFIX = "base_model.model."
#: Every file of a checkpoint in any format fxadapt reads (with AdapterHub's head files): saving
#: replaces all of them, so that no stale file of another format is left for ``load_adapter`` to prefer.
CHECKPOINT_FILES = frozenset({NATIVE_CONFIG, NATIVE_WEIGHTS, HUB_CONFIG, *PEFT_WEIGHTS, *ADAPTERHUB_WEIGHTS,
                              "head_config.json", "pytorch_model_head.bin", "model_head.safetensors"})

#: Config fields ``average_adapter`` lets differ between its inputs (they do not change the function:
#: AdapterHub ignores dropout and init_weights; the init seed is init only).
AVERAGE_IGNORES = ("dropout", "init_weights", "init_weights_seed")


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

    def plan(self, gm: AdaptedModule, config: AdapterConfig) -> list[Placement]:
        """The LoRA-style placements of ``config`` on ``gm`` (``add_adapter`` plans again, with everything);
        a config the model cannot take is a CheckpointError naming the config file."""
        try:
            return plan("adapter", config, gm._fx_sites, gm._fx_linears, gm._fx_model_name)
        except (ConfigError, SiteError) as e:
            raise CheckpointError(f"{self.config_path}: the adapter does not fit {gm._fx_model_name}: {e}", path=self.config_path) from e


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


# -- files ------------------------------------------------------------------------------------


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


def _read_json(path: str) -> dict[str, Any]:
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


def _put(tensors: dict[str, torch.Tensor], sources: dict[str, str], key: str, tensor: torch.Tensor, source: str, path: str) -> None:
    """Keep the file's tensor ``source`` as the adapter's ``key``; two tensors for one weight is a corrupt file."""
    if key in tensors:
        raise CheckpointError(f"{path}: tensors {sources[key]} and {source} both give the adapter's {key}", path=path, tensor=source)
    tensors[key], sources[key] = tensor, source


def _first_file(directory: str, names: Iterable[str], what: str) -> str:
    for name in names:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise CheckpointError(f"{directory} has no {what} weights file (looked for {', '.join(names)})", path=directory)


def detect_format(directory: str) -> str:
    """``"fxadapt"``, ``"peft"`` or ``"adapterhub"``: which format the adapter in ``directory`` has."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is not a directory", path=directory)
    if os.path.isfile(os.path.join(directory, NATIVE_CONFIG)):
        return "fxadapt"
    path = os.path.join(directory, HUB_CONFIG)
    if os.path.isfile(path):
        data = _read_json(path)
        if "peft_type" in data:
            return "peft"
        if "config" in data:
            return "adapterhub"
        raise CheckpointError(f"{path} is neither PEFT's (no peft_type) nor AdapterHub's (no config) adapter config", path=path)
    raise CheckpointError(f"{directory} holds no adapter: expected {NATIVE_CONFIG} (fxadapt) or {HUB_CONFIG} (PEFT, AdapterHub)",
                          path=directory)


# -- matching files to the model ----------------------------------------------------------------


def resolve_module(gm: AdaptedModule, path: str, key_mapping: dict[str, str] | None = None) -> str | None:
    """The path of the model's linear a file's module path names: after ``key_mapping``, the same
    path, or the only linear whose path ends with it (or that it ends with); None when none fits."""
    return _by_suffix(_mapped(path, key_mapping), {lin.path for lin in gm._fx_linears.values()})


def _mapped(path: str, key_mapping: dict[str, str] | None) -> str:
    for pattern, replacement in (key_mapping or {}).items():
        path = re.sub(pattern, replacement, path)
    return path


def _by_suffix(name: str, names: Iterable[str]) -> str | None:
    """``name`` itself, or the only one of ``names`` that ends with it or that it ends with (at a dot)."""
    names = set(names)
    if name in names:
        return name
    hits = [n for n in names if n.endswith("." + name) or name.endswith("." + n)]
    return hits[0] if len(hits) == 1 else None


def _translate(gm: AdaptedModule, config: AdapterConfig, key_mapping: dict[str, str] | None) -> AdapterConfig:
    """``config`` with the module paths it names (``targets``, ``input_scaling_targets`` lists,
    ``rank_pattern`` / ``alpha_pattern`` keys) rewritten to the model's where, as written, they name
    none of its linears but one by suffix or after ``key_mapping`` (a file saved from a model with a
    head, loaded into the base model, or the other way round). Names that match stay as they are."""
    if isinstance(config, ConfigUnion):
        parts = tuple(_translate(gm, c, key_mapping) for c in config.configs)
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


def state_key(placement: Placement, name: str, param: str) -> str:
    """The ``adapter_state_dict`` key of a placement's parameter (``<module path>[.<role>].<param>``)."""
    from .module import _without_name

    key = _without_name(placement.module, name)
    return f"{key}.{param}" if key else param


# -- readers ------------------------------------------------------------------------------------


def _read_native(gm: AdaptedModule, directory: str, key_mapping) -> Converted:
    path = os.path.join(directory, NATIVE_CONFIG)
    meta = _read_json(path)
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
        _put(tensors, sources, _mapped(key, key_mapping), tensor, key, weights)
    return Converted(meta.get("name") or config.architecture, _translate(gm, config, key_mapping), tensors, weights, sources, path)


# PEFT config fields that change what the adapter computes and that fxadapt cannot express: they must be off.
_PEFT_UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save", "layers_to_transform", "exclude_modules", "target_parameters",
                     "layer_replication", "trainable_token_indices", "alora_invocation_tokens", "use_bdlora")


# The PEFT config fields fxadapt reads and the JSON types each must have (true/false is no number here,
# and "false" is no boolean), with the fxadapt field each becomes.
_PEFT_FIELDS = {"r": ((int,), "r"), "lora_alpha": ((int, float), "alpha"), "lora_dropout": ((int, float), "dropout"),
                "use_rslora": ((bool,), "use_rslora"), "target_modules": ((list, str, type(None)), "targets"),
                "feedforward_modules": ((list, str, type(None)), "input_scaling_targets"),
                "rank_pattern": ((dict, type(None)), "rank_pattern"), "alpha_pattern": ((dict, type(None)), "alpha_pattern")}
_JSON_NAMES = {int: "an integer", float: "a number", bool: "true or false", list: "a list", str: "a string", dict: "an object",
               type(None): "null"}


def _read_peft(gm: AdaptedModule, directory: str, key_mapping) -> Converted:
    path = os.path.join(directory, HUB_CONFIG)
    meta = _read_json(path)
    kind = meta.get("peft_type")
    if kind not in ("LORA", "IA3") or not isinstance(kind, str):
        raise CheckpointError(f"{path}: peft_type {kind!r} is not supported (fxadapt reads LORA and IA3)", path=path)
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
            config = LoRAConfig(selfattn_lora=False, targets=listed.get("target_modules"), r=meta.get("r", 8), alpha=meta.get("lora_alpha", 8),
                                dropout=meta.get("lora_dropout", 0.0), use_rslora=meta.get("use_rslora", False),
                                rank_pattern=meta.get("rank_pattern") or {}, alpha_pattern=meta.get("alpha_pattern") or {})
        else:
            config = IA3Config(selfattn_lora=False, intermediate_lora=False, targets=listed.get("target_modules"),
                               input_scaling_targets=listed.get("feedforward_modules") or None)
    except ConfigError as e:
        field = next((peft for peft, (_, ours) in _PEFT_FIELDS.items() if ours == e.field), e.field)
        raise CheckpointError(f"{path}: {field}: {e}", path=path) from e
    config = _translate(gm, config, key_mapping)
    weights = _first_file(directory, PEFT_WEIGHTS, "PEFT")
    params = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".ia3_l": "scale"}
    tensors, sources = {}, {}
    for key, tensor in read_tensors(weights).items():
        suffix = next((s for s in params if key.endswith(s)), None)
        module = resolve_module(gm, key.removeprefix(_PEFT_PREFIX)[: -len(suffix)], key_mapping) if suffix else None
        ours = key if module is None else f"{module}.{params[suffix]}"
        if module is not None and params[suffix] == "scale" and tensor.ndim == 2:
            # PEFT: (out, 1) scales the output, (1, in) the input of a feedforward module.
            if tensor.shape[0 if config.matches_input_scaling(module) else 1] == 1:
                tensor = tensor.reshape(-1)
        _put(tensors, sources, ours, tensor, key, weights)
    return Converted("lora" if kind == "LORA" else "ia3", config, tensors, weights, sources, path)


def _read_adapterhub(gm: AdaptedModule, directory: str, key_mapping) -> Converted:
    path = os.path.join(directory, HUB_CONFIG)
    meta = _read_json(path)
    config = meta.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: AdapterHub's config must be an object, got {config!r}", path=path)
    architecture = config.get("architecture") or "bottleneck"  # AdapterHub's bottleneck configs leave it unset
    converter = ADAPTERHUB_CONVERTERS.get(architecture) if isinstance(architecture, str) else None
    if converter is None:
        raise CheckpointError(f"{path}: no converter for AdapterHub architecture {architecture!r} "
                              f"(registered: {sorted(ADAPTERHUB_CONVERTERS)})", path=path)
    weights = _first_file(directory, ADAPTERHUB_WEIGHTS, "AdapterHub")
    if not isinstance(meta.get("name", ""), str):
        raise CheckpointError(f"{path}: name must be a string, got {meta['name']!r}", path=path)
    ckpt = AdapterHubCheckpoint(meta.get("name") or architecture, config, read_tensors(weights), path, weights, key_mapping)
    converted = converter(gm, ckpt)
    return dataclasses.replace(converted, config=_translate(gm, converted.config, key_mapping), config_path=path)


_READERS = {"fxadapt": _read_native, "peft": _read_peft, "adapterhub": _read_adapterhub}


@register_adapterhub_converter("lora")
def _adapterhub_lora(gm: AdaptedModule, ckpt: AdapterHubCheckpoint) -> Converted:
    """AdapterHub LoRA and (IA)^3: ``<module>.loras.<name>.lora_A`` (r, in) / ``lora_B`` (out, r), or
    for (IA)^3 ``lora_B`` (out, 1). A fused projection (GPT-2's ``c_attn``) stores its roles' parts
    stacked in column order: A's rows and B's rows split evenly between fxadapt's per-role sites."""
    c = ckpt.config
    for name, off in (("use_dora", False), ("vera_d", None), ("vera_b", None)):
        if c.get(name, off) != off:
            raise CheckpointError(f"{ckpt.config_path}: AdapterHub LoRA option {name}={c[name]!r} is not supported", path=ckpt.config_path)
    ia3 = c.get("composition_mode") == "scale"
    cls = IA3Config if ia3 else LoRAConfig
    known = {f.name for f in dataclasses.fields(cls)}
    config = ckpt.make_config(cls, **{k: v for k, v in c.items() if k in known})
    grouped, rest = ckpt.modules(gm, "loras")
    placements = ckpt.plan(gm, config)
    layer_of = {s.path: s.layer for s in gm._fx_sites}
    if {p.site.path for p in placements} != set(grouped) and {p.site.layer for p in placements} == {layer_of.get(m) for m in grouped}:
        # AdapterHub picks modules by per-model tables (Llama's "intermediate" LoRA is down_proj): take the
        # file's modules as targets, when they cover the same layers (else the checks report what is missing).
        config = config.replace(selfattn_lora=False, intermediate_lora=False, output_lora=False, targets=tuple(sorted(grouped)))
        placements = ckpt.plan(gm, config)
    tensors, sources = dict(rest), {k: k for k in rest}
    by_path: dict[str, list[Placement]] = {}
    for p in placements:
        by_path.setdefault(p.site.path, []).append(p)
    for path, params in grouped.items():
        parts = sorted(by_path.get(path, []), key=lambda p: min(p.site.columns) if p.site.columns is not None else 0)
        for param, (key, tensor) in params.items():
            ours = "scale" if ia3 and param == "lora_B" else param
            if ours == "scale" and tensor.ndim == 2 and tensor.shape[1] == 1:
                tensor = tensor.reshape(-1)
            if len(parts) > 1 and tensor.shape[0] % len(parts):
                raise CheckpointError(f"{ckpt.weights_path}: tensor {key} of shape {tuple(tensor.shape)} does not split into "
                                      f"{len(parts)} roles of {path}", path=ckpt.weights_path, tensor=key)
            chunks = tensor.split(tensor.shape[0] // len(parts)) if len(parts) > 1 else [tensor]
            for p, chunk in zip(parts or [None], chunks):
                k = key if p is None else state_key(p, "adapter", ours)
                _put(tensors, sources, k, chunk, key, ckpt.weights_path)
    return Converted(ckpt.name, config, tensors, ckpt.weights_path, sources)


def _bottleneck_key(key: str, name: str, blocks: dict[tuple[int, str], Placement]) -> str:
    for container in ("invertible_adapters", "shared_parameters"):
        _, sep, param = key.partition(f"{container}.{name}.")
        if sep:
            return f"{container}.{param}"
    _, sep, param = f".{key}".partition(f".adapters.{name}.")
    p = blocks.get(_layer_and_location(key, "adapters")) if sep else None
    return state_key(p, "adapter", param) if p is not None else key


def _layer_and_location(key: str, container: str) -> tuple[int | None, str]:
    """AdapterHub's bottleneck keys name the layer by its index and the block by "attention" in
    the path before the container (``encoder.layer.0.attention.output.adapters``,
    ``h.0.attention_adapters.adapters``) or not (``encoder.layer.0.output.adapters``)."""
    before = key.split(f".{container}.")[0].split(".")
    layer = next((int(part) for part in before if part.isdigit()), None)
    return layer, "mh" if any("attention" in part for part in before) else "output"


def _plan(gm: AdaptedModule, ckpt: AdapterHubCheckpoint, config: AdapterConfig) -> list[Placement]:
    try:
        return plan("adapter", config, gm._fx_sites, gm._fx_linears, gm._fx_model_name, gm._fx_blocks, gm._fx_attentions)
    except (ConfigError, SiteError) as e:
        raise CheckpointError(f"{ckpt.config_path}: the adapter does not fit {gm._fx_model_name}: {e}", path=ckpt.config_path) from e


def _fields(cls: type[AdapterConfig], config: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in config.items() if k in known}


@register_adapterhub_converter("bottleneck")
def _adapterhub_bottleneck(gm: AdaptedModule, ckpt: AdapterHubCheckpoint) -> Converted:
    """AdapterHub bottleneck adapters: ``<block>.adapters.<name>.<param>`` by layer and block
    (the same parameter names as fxadapt's), ``invertible_adapters.<name>.<param>`` and the
    Compacter rule ``shared_parameters.<name>.phm_rule``."""
    config = ckpt.make_config(BnConfig, **_fields(BnConfig, ckpt.config))
    placements = _plan(gm, ckpt, config)
    blocks = {(p.block.layer, p.block.location): p for p in placements if p.method == "bottleneck"}
    tensors, sources = {}, {}
    for key, tensor in ckpt.tensors.items():
        if ".adapter_norm_before." in key:
            continue  # AdapterHub's alias of adapter_down.0 (ln_before), stored twice
        ours = _bottleneck_key(key, ckpt.name, blocks)
        _put(tensors, sources, ours, tensor, key, ckpt.weights_path)
    if config.phm_layer and config.shared_phm_rule and not any(k.startswith("shared_parameters.") for k in tensors):
        # AdapterHub 1.3.0's save_adapter leaves the shared rule out of the file (its own loading
        # then starts from a new one too): say so, and start from AdapterHub's initialisation.
        warnings.warn(f"{ckpt.weights_path} has no Compacter PHM rule (shared_parameters.{ckpt.name}.phm_rule): AdapterHub 1.3.0 "
                      "does not save it. The adapter starts from a new rule, so its outputs differ from the saved model's; "
                      "load the rule you trained with into adapter_state_dict()['shared_parameters.phm_rule']", stacklevel=4)
        with torch.random.fork_rng(devices=[]):
            n = config.phm_dim
            tensors["shared_parameters.phm_rule"] = torch.empty(n, n, n).normal_(0, config.phm_init_range)
    return Converted(ckpt.name, config, tensors, ckpt.weights_path, sources)


@register_adapterhub_converter("prefix_tuning")
def _adapterhub_prefix(gm: AdaptedModule, ckpt: AdapterHubCheckpoint) -> Converted:
    """AdapterHub prefix tuning: the generator ``prefix_tuning.prefix_tunings.<name>.self_prefix.<param>``
    (its aliases under every attention's ``prefix_tuning.pool`` are the same tensors) and the
    gates ``<attention>.prefix_tuning.prefix_gates.<name>.<param>``, by layer."""
    config = ckpt.make_config(PrefixTuningConfig, **_fields(PrefixTuningConfig, ckpt.config))
    gates = {p.attention.layer: p for p in _plan(gm, ckpt, config) if p.module is not None}
    tensors, sources = {}, {}
    for key, tensor in ckpt.tensors.items():
        if ".pool." in key:
            continue
        _, sep, param = key.partition(f"prefix_tunings.{ckpt.name}.self_prefix.")
        if sep:
            ours = f"prefix_tunings.{param}"
        else:
            _, sep, param = key.partition(f"prefix_gates.{ckpt.name}.")
            p = gates.get(_layer_and_location(key, "prefix_tuning")[0]) if sep else None
            ours = state_key(p, "adapter", param) if p is not None else key
        if "cross_prefix" in key:
            raise CheckpointError(f"{ckpt.weights_path}: tensor {key}: cross-attention prefixes are not supported",
                                  path=ckpt.weights_path, tensor=key)
        _put(tensors, sources, ours, tensor, key, ckpt.weights_path)
    return Converted(ckpt.name, config, tensors, ckpt.weights_path, sources)


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
        mine = {k: t for k, t in ckpt.tensors.items() if _owner_of(k, ckpt.name) == architecture}
        converted = ADAPTERHUB_CONVERTERS[architecture](gm, dataclasses.replace(ckpt, config=part, tensors=mine))
        configs.append(converted.config)
        for key, tensor in converted.tensors.items():
            _put(tensors, sources, key, tensor, converted.sources.get(key, key), ckpt.weights_path)
    leftover = [k for k in ckpt.tensors if _owner_of(k, ckpt.name) is None]
    if leftover:
        raise CheckpointError(f"{ckpt.weights_path}: unexpected tensor {leftover[0]}", path=ckpt.weights_path, tensor=leftover[0])
    config = ckpt.make_config(ConfigUnion, *configs)
    return Converted(ckpt.name, config, tensors, ckpt.weights_path, sources)


def _owner_of(key: str, name: str) -> str | None:
    """Which method of a union an AdapterHub tensor belongs to, by its container."""
    if f"loras.{name}." in key:
        return "lora"
    if f"prefix_tunings.{name}." in key or f"prefix_gates.{name}." in key:
        return "prefix_tuning"
    if f"adapters.{name}." in key or f"shared_parameters.{name}." in key:
        return "bottleneck"
    return None


# -- writers ------------------------------------------------------------------------------------


def _write_native(gm: AdaptedModule, name: str) -> tuple[str, dict, str, dict[str, torch.Tensor]]:
    from . import __version__

    adapter = gm._adapter(name)
    meta = {"format": "fxadapt", "fxadapt_version": __version__, "name": name, "config": adapter.config.to_dict(),
            "modules": sorted({p.site.name if p.site is not None else p.module for p in adapter.placements} - {None})}
    return NATIVE_CONFIG, meta, NATIVE_WEIGHTS, dict(gm.adapter_state_dict(name))


def _write_peft(gm: AdaptedModule, name: str) -> tuple[str, dict, str, dict[str, torch.Tensor]]:
    adapter = gm._adapter(name)
    config = adapter.config
    if not isinstance(config, LoRAConfig) or config.use_gating:
        raise CheckpointError(f"adapter {name!r} ({type(config).__name__}) has no PEFT form: PEFT's format holds LoRA and (IA)^3")
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
                "use_rslora": config.use_rslora, "bias": "none", "rank_pattern": ranks, "alpha_pattern": alphas, "init_lora_weights": True}
    return HUB_CONFIG, meta, PEFT_WEIGHTS[0], tensors


def _columns(p: Placement) -> list[int] | slice:
    cols = p.site.columns
    return slice(None) if cols is None else list(cols)


_WRITERS = {"fxadapt": _write_native, "peft": _write_peft}


# -- the mixin ----------------------------------------------------------------------------------


class CheckpointMixin:
    """Saving, loading and combining adapters (mixed into AdaptedModule)."""

    def save_adapter(self: AdaptedModule, directory: str | os.PathLike, name: str, format: str = "fxadapt") -> None:
        """Write adapter ``name`` to ``directory`` (created if needed).

        ``format="fxadapt"``: ``fxadapt_config.json`` + ``fxadapt_model.safetensors``, for every method;
        loading it back gives bit-identical outputs. ``format="peft"``: ``adapter_config.json`` +
        ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained(model, directory)`` loads,
        for LoRA and (IA)^3. PEFT adapts whole modules, so fxadapt's per-role LoRA on a fused projection
        (GPT-2's ``c_attn`` q and v parts) is written as one LoRA on the whole module with block
        structure (stacked A, block-diagonal B, rank = sum of the parts' ranks, alpha keeping the
        scaling): the same function, exactly. (IA)^3 with ``alpha != 1`` is written with the vector
        multiplied by ``alpha`` (PEFT has no alpha).

        The directory is replaced in one step when every file is complete: an error or a crash
        part-way leaves what was there before, whole. The checkpoint files of every format
        (``CHECKPOINT_FILES``) in it are replaced, its other files kept. Weights that are not finite,
        a config JSON cannot hold and I/O failures raise CheckpointError naming the path.

        >>> gm.save_adapter("out/lora", "lora")                    # doctest: +SKIP
        >>> gm.save_adapter("out/lora-peft", "lora", format="peft")  # doctest: +SKIP
        """
        self._adapter(name)
        if format not in _WRITERS:
            raise CheckpointError(f"format must be one of {list(_WRITERS)}, got {format!r}", path=str(directory))
        config_name, meta, weights_name, tensors = _WRITERS[format](self, name)
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        target = os.path.abspath(os.fspath(directory))
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        for key, tensor in tensors.items():
            if not torch.isfinite(tensor).all():  # a checkpoint load_adapter would refuse
                raise CheckpointError(f"adapter {name!r}: tensor {key} holds NaN or infinite values; nothing was written",
                                      path=target, tensor=key)
        config_path, weights_path = os.path.join(target, config_name), os.path.join(target, weights_name)
        with atomic_directory(target, owned=CHECKPOINT_FILES.__contains__) as tmp:
            with open(os.path.join(tmp, config_name), "w", encoding="utf-8") as f:
                try:
                    json.dump(meta, f, indent=2, sort_keys=True, allow_nan=False)
                except (TypeError, ValueError) as e:
                    raise CheckpointError(f"{config_path}: the config of adapter {name!r} cannot be written as JSON ({e}); "
                                          "nothing was written", path=config_path) from e
            try:
                save_file(tensors, os.path.join(tmp, weights_name), metadata={"format": "pt"})
            except SafetensorError as e:
                raise CheckpointError(f"cannot write {weights_path}: {e}", path=weights_path) from e

    def load_adapter(self: AdaptedModule, directory: str | os.PathLike, name: str | None = None, *, set_active: bool = False,
                     key_mapping: dict[str, str] | None = None) -> str:
        """Load an adapter saved by fxadapt, PEFT (LoRA, (IA)^3) or AdapterHub; return its name.

        The format is detected from the files. ``name`` defaults to the name in the file (fxadapt,
        AdapterHub) or ``"lora"`` / ``"ia3"`` (PEFT). Module paths in the file are matched to the
        model's exactly or by suffix (a checkpoint of ``BertForSequenceClassification`` fits its
        ``BertModel`` and the other way round); ``key_mapping`` (``{regex: replacement}``) renames them
        first. Before anything is allocated, the file is read safely, its config's fields, its dtypes
        and values checked, and the adapter the config describes planned: its tensors must all be in the
        file, with their shapes, and no others. Any failure raises CheckpointError naming the file and
        the field or tensor, and leaves the model exactly as it was.
        Weights whose dtype differs from the model's are kept as they are and cast around the adapter
        (as PEFT keeps fp32 adapters on a bf16 model), with a warning naming both dtypes (none for
        float32 LoRA / (IA)^3 weights on a float16 or bfloat16 model: what ``add_adapter`` builds there).

        >>> name = gm.load_adapter("out/lora-peft", set_active=True)  # doctest: +SKIP
        """
        directory = os.fspath(directory)
        converted = _READERS[detect_format(directory)](self, directory, key_mapping)
        name = name or converted.name
        if name in self._fx_adapters:
            raise AdapterError(f"{self._fx_model_name} already has an adapter named {name!r}; pass another name=")
        config = _check_file(self, name, converted)
        converted = _check_state(self, config, converted)
        self._add_with_weights(name, config, converted.tensors, set_active, converted)
        return name

    def average_adapter(self: AdaptedModule, name: str, adapters: Sequence[str], weights: Sequence[float] | None = None, *,
                        normalize_weights: bool = True, set_active: bool = False) -> None:
        """Add adapter ``name`` whose every tensor is the weighted sum of the same-named tensors of
        ``adapters`` (AdapterHub's ``average_adapter`` with ``combine_strategy="linear"``): LoRA's A
        and B are each averaged (not B A), (IA)^3's vectors are averaged. Works for any method whose
        adapters of equal config have equal parameter names and shapes.

        ``weights`` default to equal; with ``normalize_weights`` (AdapterHub's default) they are
        divided by their sum. Task arithmetic (``[1, -1]``: add one task, remove another) needs
        ``normalize_weights=False``. The inputs' configs must be equal apart from ``dropout``,
        ``init_weights`` and ``init_weights_seed`` (``AVERAGE_IGNORES``); the new adapter takes the
        first input's config.

        >>> gm.average_adapter("avg", ["task_a", "task_b"], [0.3, 0.7])  # doctest: +SKIP
        """
        names = self._names(adapters)
        if not names:
            raise AdapterError("average_adapter needs at least one adapter to average")
        if name in self._fx_adapters:
            raise AdapterError(f"{self._fx_model_name} already has an adapter named {name!r}")
        try:
            weights = [1.0 / len(names)] * len(names) if weights is None else [float(w) for w in weights]
        except (TypeError, ValueError) as e:
            raise AdapterError(f"average_adapter's weights must be numbers, got {weights!r}") from e
        if not all(math.isfinite(w) for w in weights):
            raise AdapterError(f"average_adapter's weights must be finite, got {weights}")
        if len(weights) != len(names):
            raise AdapterError(f"average_adapter got {len(weights)} weights for {len(names)} adapters")
        if weights and normalize_weights:
            total = sum(weights)
            if total == 0:
                raise AdapterError("weights sum to 0 and cannot be normalized; pass normalize_weights=False (task arithmetic)")
            weights = [w / total for w in weights]
        config = self._fx_adapters[names[0]].config
        for other in names[1:]:
            theirs = self._fx_adapters[other].config
            ignored = {f: getattr(config, f) for f in AVERAGE_IGNORES if hasattr(config, f)}
            if type(theirs) is not type(config) or theirs.replace(**ignored) != config:
                diff = [f.name for f in dataclasses.fields(config) if f.name not in ignored and getattr(config, f.name) != getattr(theirs, f.name, None)]
                raise AdapterError(f"cannot average {names[0]!r} and {other!r}: their configs differ in {diff or type(theirs).__name__}")
        states = [self.adapter_state_dict(n) for n in names]
        averaged = {}
        for key, first in states[0].items():
            wide = torch.promote_types(first.dtype, torch.float32)
            averaged[key] = sum(w * s[key].detach().to(wide) for w, s in zip(weights, states)).to(first.dtype)
            if not torch.isfinite(averaged[key]).all():  # float16 overflows
                raise AdapterError(f"averaging {names} gives non-finite values in {key} ({first.dtype})")
        self._add_with_weights(name, config, averaged, set_active)

    def _add_with_weights(self: AdaptedModule, name: str, config: AdapterConfig, tensors: dict[str, torch.Tensor], set_active: bool,
                          source: Converted | None = None) -> None:
        """Add the adapter and fill in ``tensors`` (keyed as its ``adapter_state_dict``, already checked);
        on any failure, memory included, the adapter is deleted again, so the model is left exactly as it was."""
        # Initialising weights that are overwritten at once must not move the global random state.
        with torch.random.fork_rng(devices=[]):
            try:
                self.add_adapter(name, config, set_active=set_active)
            except (ConfigError, SiteError) as e:  # raised before anything is added
                if source is None:
                    raise
                path = source.config_path or source.path
                raise CheckpointError(f"{path}: the adapter does not fit {self._fx_model_name}: {e}", path=path) from e
        try:
            state = self.adapter_state_dict(name)
            if state.keys() != tensors.keys():  # a checked load cannot get here; say so rather than half-fill
                raise AdapterError(f"adapter {name!r}: the weights to fill in ({sorted(tensors.keys() ^ state.keys())[:3]}...) do not "
                                   "match the adapter's")
            with torch.no_grad():
                for key, tensor in tensors.items():
                    state[key].copy_(tensor)
        except BaseException:
            self.delete_adapter(name)
            raise


def _check_file(gm: AdaptedModule, name: str, c: Converted) -> AdapterConfig:
    """What the file alone can tell, checked before anything is added: floating, consistent dtypes,
    finite values. Returns the config to add (with ``dtype`` set when the file's differs from the model's)."""
    path, config = c.path, c.config
    src = c.sources.get
    for key, tensor in c.tensors.items():
        if not tensor.is_floating_point() or str(tensor.dtype).removeprefix("torch.") not in DTYPES:
            raise CheckpointError(f"{path}: tensor {src(key, key)} has dtype {tensor.dtype}; adapter weights are float16, bfloat16, "
                                  "float32 or float64", path=path, tensor=src(key, key))
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {src(key, key)} holds NaN or infinite values", path=path, tensor=src(key, key))
    first = next(iter(c.tensors), None)
    if first is None:
        return config
    dtype, wanted = c.tensors[first].dtype, getattr(config, "dtype", None)
    for key, tensor in c.tensors.items():
        if tensor.dtype != (getattr(torch, wanted) if wanted else dtype):
            raise CheckpointError(f"{path}: tensor {src(key, key)} has dtype {tensor.dtype}, the config and tensor {src(first, first)} "
                                  f"say {wanted or dtype}", path=path, tensor=src(key, key))
    model_dtypes = sorted({str(gm.get_parameter(lin.weight).dtype) for lin in gm._fx_linears.values()})
    if not wanted and model_dtypes != [str(dtype)]:
        if "dtype" in {f.name for f in dataclasses.fields(config)}:
            config = config.replace(dtype=str(dtype).removeprefix("torch."))
            if dtype == torch.float32 and set(model_dtypes) <= {"torch.float16", "torch.bfloat16"}:
                return config  # what add_adapter builds on a half-precision model (autocast_adapter_dtype)
            how = f"kept in {dtype}, cast to and from the model's dtype around the adapter (as PEFT does)"
        else:
            how = f"cast to {', '.join(model_dtypes)}"
        warnings.warn(f"adapter {name!r} from {path}: its weights are {dtype}, the model's {', '.join(model_dtypes)}: {how}", stacklevel=3)
    return config


def _planned_state(gm: AdaptedModule, config: AdapterConfig, c: Converted) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors ``add_adapter`` would make for ``config``, built on the meta device (their keys,
    shapes and dtypes; nothing allocated), and for LoRA's the config field that sets their rank."""
    from .module import _without_name

    name = "adapter"  # keys do not depend on the name (add_adapter checks the real one)
    path = c.config_path or c.path
    try:
        placements = plan(name, config, gm._fx_sites, gm._fx_linears, gm._fx_model_name, gm._fx_blocks, gm._fx_attentions)
        built = [(p.module, METHODS[p.method].build(p.where, p.config or config, gm.get_parameter(p.where.weight).to("meta")))
                 for p in placements if p.module is not None]
        for shared in sorted({s for p in placements for s in p.shared}):
            owners = [p for p in placements if shared in p.shared]
            like = gm.get_parameter(owners[0].where.weight).to("meta")
            built.append((shared, METHODS[owners[0].method].build_shared(owners[0].config, owners, like)))
    except (ConfigError, SiteError) as e:
        raise CheckpointError(f"{path}: the adapter does not fit {gm._fx_model_name}: {e}", path=path) from e
    state = {}
    for module, weights in built:
        key = _without_name(module, name)
        state.update({f"{key}.{k}" if key else k: t for k, t in weights.named_parameters()})
    fields = {}
    for p in placements:
        if p.method == "lora" and p.module is not None:
            cfg = p.config or config
            pattern = next((k for k, _ in cfg.rank_pattern if re.match(rf"(.*\.)?({k})$", p.site.path)), None)
            field = f"rank_pattern[{pattern!r}]" if pattern is not None else "r"
            for param in ("lora_A", "lora_B"):
                fields[state_key(p, name, param)] = f"{field}={cfg.rank_for(p.site.path)} in {path}"
    return state, fields


def _match_keys(expected: Iterable[str], c: Converted) -> Converted:
    """The file's tensors keyed as the adapter's: the same key, or the only one that ends with it or
    that it ends with (module paths of a model with and without a head); others keep their names."""
    expected = set(expected)
    taken = expected & c.tensors.keys()
    tensors, sources = {}, {}
    for key, tensor in c.tensors.items():
        ours = key if key in expected else _by_suffix(key, expected - taken) or key
        if ours in tensors:
            ours = key
        taken.add(ours)
        tensors[ours], sources[ours] = tensor, c.sources.get(key, key)
    return dataclasses.replace(c, tensors=tensors, sources=sources)


def _bytes(n: int) -> str:
    """A size for people: ``_bytes(3 * 2**30) == "3.0 GiB"``."""
    return next(f"{n / 2 ** e:.1f} {unit}" for e, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "bytes")) if n >= 2 ** e or not e)


def _check_state(gm: AdaptedModule, config: AdapterConfig, c: Converted) -> Converted:
    """Before anything is allocated: every tensor the adapter would have is in the file with its shape,
    and no other. Returns ``c`` keyed as the adapter's ``adapter_state_dict``."""
    expected, fields = _planned_state(gm, config, c)
    c = _match_keys(expected, c)
    path, src = c.path, (lambda key: c.sources.get(key, key))
    for key in expected:
        if key not in c.tensors:
            raise CheckpointError(f"{path}: tensor {key} is missing (the model has a site the file has no weights for)", path=path, tensor=key)
    for key, tensor in c.tensors.items():
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {src(key)} (no such site in {gm._fx_model_name})", path=path, tensor=src(key))
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            why = f", from {fields[key]}" if key in fields else ""
            if want.numel() > tensor.numel():
                need = sum(t.numel() * t.element_size() for t in expected.values())
                why += f"; the adapter would need {_bytes(need)}"
            raise CheckpointError(f"{path}: tensor {src(key)} has shape {tuple(tensor.shape)}, {gm._fx_model_name} needs "
                                  f"{tuple(want.shape)}{why} (an adapter for another model?)", path=path, tensor=src(key))
    return c
