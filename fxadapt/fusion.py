"""AdapterFusion, as AdapterHub 1.3.0 (``Fuse``, ``AdapterFusionConfig``, ``BertFusion``, ``add_adapter_fusion`` ...).

A fusion layer sits at every residual block where its bottleneck adapters act. There, each adapter reads the
same input (the last adapter's ``pre_forward``) and the layer attends over their up-projections
``u_i = scaling * up(act(down(h)))`` (``bottleneck_up`` in AdapterHub), per position::

    q = Q query,  k_i = K u_i,  v_i = V u_i                 (each a Linear when the config has it)
    p = softmax_i(dropout(q . k_i) / T)                      (the fusion attentions)
    out = sum_i p_i v_i + residual                           (the adapter's residual, as AdapterHub)

``query`` is the layer's hidden state after the block's add and norm (``query_before_ln``: before them; a
parallel adapter: the block's input). ``residual_before`` adds the residual to the up-projections first (to
keys and values alike: AdapterHub adds it in place to the one tensor passed as both) and not after;
``value_before_softmax=False`` applies V to the mixed output; ``temperature`` starts T at 50 and lowers it
by 0.05 per call to 1 (AdapterHub's schedule, per layer, in eval mode too). The block's ``post_forward``
(the last adapter's config) follows, as for any composition.

Files: AdapterHub's ``adapter_fusion_config.json`` + ``pytorch_model_adapter_fusion.bin`` (or
``model_adapter_fusion.safetensors``), keys ``<AdapterHub's layer module>.adapter_fusion_layer.<name>.<param>``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .composition import Block, Fuse, Stack
from .errors import AdapterError, CheckpointError, ConfigError
from .formats.common import layer_and_location, read_json, read_tensors
from .fsutil import atomic_directory
from .methods.gating import attach_recorded
from .naming import join

if TYPE_CHECKING:
    from .module import AdaptedModule
    from .sites import Block as ResidualBlock

__all__ = ["AdapterFusionConfig", "StaticAdapterFusionConfig", "DynamicAdapterFusionConfig", "FUSION_CONFIGS", "FusionLayer",
           "FusionMixin", "resolve_fusion_config"]

CONTAINER = "adapter_fusion_layer"  # AdapterHub's module name; the layers sit at <block's closing linear>.adapter_fusion_layer.<name>
CONFIG_FILE = "adapter_fusion_config.json"
WEIGHTS_FILES = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
_FLAGS = ("key", "query", "value", "query_before_ln", "regularization", "residual_before", "temperature", "value_before_softmax",
          "value_initialized")


# -- config ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterFusionConfig:
    """AdapterHub's ``AdapterFusionConfig``: which of query / key / value projections the fusion layer has, and
    how it attends (see the module's docstring). ``dropout_prob`` None takes the model's
    ``attention_probs_dropout_prob`` (0 without one); ``regularization`` only marks the value matrix for
    :meth:`FusionMixin.get_fusion_regularization_loss`, as AdapterHub's trainer reads it."""

    key: bool
    query: bool
    value: bool
    query_before_ln: bool
    regularization: bool
    residual_before: bool
    temperature: bool
    value_before_softmax: bool
    value_initialized: bool
    dropout_prob: float | None

    def __post_init__(self):
        for name in _FLAGS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"{type(self).__name__}.{name} must be True or False, got {value!r}", field=name, value=value)
        p = self.dropout_prob
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1):
            raise ConfigError(f"{type(self).__name__}.dropout_prob must be None or a number in [0, 1), got {p!r}", field="dropout_prob", value=p)

    def to_dict(self) -> dict[str, Any]:
        """AdapterHub's dict (what ``adapter_fusion_config.json`` holds under ``config``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterFusionConfig:
        """The config of a dict with AdapterHub's fields (all of them; ConfigError naming an unknown or missing one)."""
        fields = [f.name for f in dataclasses.fields(AdapterFusionConfig)]
        unknown = [k for k in data if k not in fields]
        if unknown:
            raise ConfigError(f"AdapterFusionConfig has no field {unknown[0]!r} (fields: {', '.join(fields)})", field=unknown[0])
        missing = [k for k in fields if k not in data]
        if missing:
            raise ConfigError(f"AdapterFusionConfig needs {missing[0]!r} (AdapterHub's base config has no defaults)", field=missing[0])
        value = data["value_initialized"]  # AdapterHub types it str but uses it as a flag
        return AdapterFusionConfig(**{**data, "value_initialized": value if not isinstance(value, str) else value.lower() == "true"})

    def replace(self, **changes) -> AdapterFusionConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class StaticAdapterFusionConfig(AdapterFusionConfig):
    """AdapterHub's "static": query and key, no value matrix."""

    key: bool = True
    query: bool = True
    value: bool = False
    query_before_ln: bool = False
    regularization: bool = False
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool = False
    dropout_prob: float | None = None


@dataclass(frozen=True)
class DynamicAdapterFusionConfig(StaticAdapterFusionConfig):
    """AdapterHub's "dynamic" (its default): "static" plus a value matrix initialised to the identity,
    regularised towards it."""

    value: bool = True
    regularization: bool = True
    value_initialized: bool = True


FUSION_CONFIGS = {"static": StaticAdapterFusionConfig(), "dynamic": DynamicAdapterFusionConfig()}


def resolve_fusion_config(config) -> AdapterFusionConfig:
    """A config object, "static" / "dynamic" (None: "dynamic", AdapterHub's default) or a dict of all fields."""
    if config is None:
        return FUSION_CONFIGS["dynamic"]
    if isinstance(config, AdapterFusionConfig):
        return config
    if isinstance(config, str):
        if config not in FUSION_CONFIGS:
            raise ConfigError(f"unknown AdapterFusion config {config!r} (known: {', '.join(FUSION_CONFIGS)})", field="config", value=config)
        return FUSION_CONFIGS[config]
    if isinstance(config, dict):
        return AdapterFusionConfig.from_dict(config)
    raise ConfigError(f"an AdapterFusion config is a config object, 'static', 'dynamic' or a dict, got {config!r}", field="config", value=config)


# -- the layer ---------------------------------------------------------------------------------


class FusionRecorder:
    """The fusion attentions of the calls it is active for (``output_adapter_fusion_attentions=True``)."""

    def __init__(self) -> None:
        self.active = False
        self.values: dict[tuple[str, int, str], torch.Tensor] = {}

    def attentions(self) -> dict[str, dict[int, dict[str, np.ndarray]]]:
        """AdapterHub's ``{fusion: {layer: {location: array (batch, seq, adapters)}}}``."""
        out: dict = {}
        for (name, layer, location), value in self.values.items():
            out.setdefault(name, {}).setdefault(layer, {})[location] = value.cpu().float().numpy()
        return out


class FusionLayer(nn.Module):
    """AdapterHub's ``BertFusion`` with its parameter names (``query``, ``key``, ``value``, ``dense``)."""

    label = "fusion"  # in fxadapt.draw's pictures

    def __init__(self, config: AdapterFusionConfig, hidden: int, dropout: float):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(dropout)
        if not (config.query or config.key or config.value):
            self.dense = nn.Linear(hidden, 1)  # AdapterHub makes it and never uses it: kept for its files
        for name in ("query", "key"):
            if getattr(config, name):
                self.add_module(name, _bert_init(nn.Linear(hidden, hidden)))
        if config.value:
            self.value = _bert_init(nn.Linear(hidden, hidden, bias=False))
            if config.value_initialized:
                with torch.no_grad():
                    self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        # AdapterHub's temperature: T from 50 down by T/1000 per call to 1 (a buffer: changed in place, compiles)
        t = 50.0 if config.temperature else 1.0
        self.register_buffer("T", torch.tensor(t), persistent=False)
        self.reduction = t / 1000.0
        self.recorder: FusionRecorder | None = None
        self.key_name: tuple[str, int, str] | None = None

    def forward(self, query: torch.Tensor, up: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``query`` (batch, seq, hidden), ``up`` (batch, seq, adapters, hidden), the adapter's ``residual``."""
        c = self.config
        if c.residual_before:
            up = up + residual.unsqueeze(2)  # keys and values alike (AdapterHub's in-place add on the shared tensor)
        q = self.query(query) if c.query else query
        k = self.key(up) if c.key else up
        v = self.value(up) if c.value and c.value_before_softmax else up
        scores = self.dropout(torch.matmul(q.unsqueeze(2), k.transpose(-2, -1)).squeeze(2))
        probs = torch.softmax(scores / self.T, dim=-1)
        if c.temperature:
            with torch.no_grad():
                self.T.copy_(torch.clamp(self.T - self.reduction, min=1.0))
        out = torch.matmul(probs.unsqueeze(2), v).squeeze(2)
        if c.value and not c.value_before_softmax:
            out = self.value(out)
        if self.recorder is not None and self.recorder.active:
            self.recorder.values[self.key_name] = probs.detach()
        return out if c.residual_before else out + residual


def _bert_init(linear: nn.Linear) -> nn.Linear:
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02)
        if linear.bias is not None:
            linear.bias.zero_()
    return linear


@dataclass
class _Fusion:
    name: str
    fuse: Fuse
    config: AdapterFusionConfig
    modules: dict[tuple[int, str], str]  # (layer, location) -> module path


# -- AdaptedModule methods ---------------------------------------------------------------------


def _fusion_name(value) -> str:
    if isinstance(value, Fuse):
        return value.name
    if isinstance(value, (list, tuple)):
        return ",".join(value)
    if isinstance(value, str):
        return value
    raise AdapterError(f"an AdapterFusion is named by a Fuse, a list of adapter names or a string, got {value!r}")


def _as_fuse(value, name: str | None = None) -> Fuse:
    if isinstance(value, Fuse):
        return value if name is None else Fuse(*value.children, name=name)
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, (list, tuple)) and value:
        return Fuse(*value, name=name)
    raise AdapterError(f"add_adapter_fusion takes a Fuse, a list of adapter names or a comma-separated string, got {value!r}")


def fusion_blocks(gm: AdaptedModule, fuse: Fuse) -> list[ResidualBlock]:
    """The residual blocks a fusion of ``fuse``'s adapters sits at; AdapterError naming the adapter and the
    rule unless they are bottleneck adapters acting at the same blocks (so of one hidden size at each)."""
    where = None
    for name in fuse.flatten():
        adapter = gm._adapter(name)
        other = next((p for p in adapter.placements if p.method != "bottleneck"), None)
        if other is not None:
            what = "an invertible adapter" if other.method == "invertible" else f"{other.method} adapters"
            raise AdapterError(f"{fuse!r}: adapter {name!r} ({type(adapter.config).__name__}) has {what}; AdapterFusion fuses "
                               "bottleneck adapters only (AdapterHub's rule)")
        blocks = {(p.block.layer, p.block.location): p.block for p in adapter.placements}
        if where is None:
            first, where = name, blocks
        elif blocks.keys() != where.keys() or any(b.hidden_size != where[k].hidden_size for k, b in blocks.items()):
            mine = sorted((layer, loc, b.hidden_size) for (layer, loc), b in blocks.items())
            theirs = sorted((layer, loc, b.hidden_size) for (layer, loc), b in where.items())
            raise AdapterError(f"{fuse!r}: adapter {name!r} acts at blocks (layer, location, hidden size) {mine}, adapter {first!r} at "
                               f"{theirs}; AdapterFusion attends over adapter outputs of one hidden size at the same blocks")
    return list(where.values())


def hub_prefix(block: ResidualBlock) -> str:
    """The path of AdapterHub's adapter layer module for a block: the closing linear's parent in a post-LN
    block (``encoder.layer.0.output``), the layer's ``attention_adapters`` / ``output_adapters`` in a pre-LN
    one (``layers.0.output_adapters``)."""
    parts = block.path.split(".")
    if block.norm:
        return ".".join(parts[:-1])
    at = next(i for i, part in enumerate(parts) if part == str(block.layer))
    return join(*parts[: at + 1], "attention_adapters" if block.location == "mh" else "output_adapters")


class FusionMixin:
    """AdapterFusion on an AdaptedModule (AdapterHub's names and arguments)."""

    @property
    def adapter_fusions(self: AdaptedModule) -> dict[str, AdapterFusionConfig]:
        """Every fusion layer added, by name, and its config."""
        return {name: f.config for name, f in self._fx_fusions.items()}

    def add_adapter_fusion(self: AdaptedModule, adapter_names, config=None, name: str | None = None, *, overwrite_ok: bool = False,
                           set_active: bool = False) -> None:
        """Add an AdapterFusion layer over bottleneck adapters: ``Fuse("a", "b")``, ``["a", "b"]`` or ``"a,b"``;
        ``config`` "dynamic" (default), "static", an :class:`AdapterFusionConfig` or a dict of its fields.
        Named ``name`` or the Fuse's name (its children's names joined by commas). A layer goes to every
        residual block where the adapters act. AdapterError (or ConfigError) names the adapter or field and the
        rule, and nothing changes."""
        fuse = _as_fuse(adapter_names, name)
        config = resolve_fusion_config(config)
        from .composition import _validate

        _validate(fuse, 0)
        name = fuse.name
        if not name or "." in name:
            raise AdapterError(f"an AdapterFusion name must be non-empty and without '.' (it names modules), got {name!r}")
        if name in self._fx_fusions and not overwrite_ok:
            raise AdapterError(f"{self._fx_model_name} already has an AdapterFusion named {name!r}; overwrite_ok=True or delete_adapter_fusion first")
        blocks = fusion_blocks(self, fuse)
        source_config = getattr(self.__dict__.get("_fx_source"), "config", None)
        dropout = config.dropout_prob or getattr(source_config, "attention_probs_dropout_prob", 0.0) or 0.0
        from .module import _set_module

        with self._atomic():
            if name in self._fx_fusions:
                self.delete_adapter_fusion(name)
            modules = {}
            for block in blocks:
                like = self.get_parameter(block.weight)
                layer = FusionLayer(config, block.hidden_size, dropout).to(device=like.device, dtype=like.dtype)
                layer.recorder, layer.key_name = self._fx_fusion_recorder, (name, block.layer, f"{block.location}_adapter")
                path = join(block.path, CONTAINER, name)
                _set_module(self, path, layer.train(self.training))
                modules[(block.layer, block.location)] = path
            self._fx_fusions[name] = _Fusion(name, fuse, config, modules)
            if set_active:
                self.set_active_adapters(fuse)

    def delete_adapter_fusion(self: AdaptedModule, adapter_names) -> None:
        """Remove an AdapterFusion layer (a Fuse, a list of names or its name); a composition using it is deactivated."""
        name = _fusion_name(adapter_names)
        if name not in self._fx_fusions:
            raise AdapterError(f"{self._fx_model_name} has no AdapterFusion {name!r} (fusions: {', '.join(self._fx_fusions) or 'none'})")
        from .module import _delete_module

        with self._atomic():
            fusion = self._fx_fusions.pop(name)
            for path in fusion.modules.values():
                _delete_module(self, path)
            setup = self._composition()
            if setup is not None and name in _fuse_names(setup):
                self._fx_active, self._fx_setup = [], None
            self._rebuild()

    def train_adapter_fusion(self: AdaptedModule, adapter_setup, unfreeze_adapters: bool = False) -> None:
        """Training mode with only the fusion layers of ``adapter_setup`` (a Fuse, or a block with Fuse children)
        requiring gradients, and the fused adapters too with ``unfreeze_adapters``; activates the setup."""
        setup = adapter_setup if isinstance(adapter_setup, Block) else _as_fuse(adapter_setup)
        names = _fuse_names(setup, top=True)
        for name in names:
            if name not in self._fx_fusions:
                raise AdapterError(f"{setup!r}: {self._fx_model_name} has no AdapterFusion {name!r}; add_adapter_fusion first")
        from .methods.base import frozen_parameters

        with self._atomic():
            self.set_active_adapters(setup)
            paths = [path for name in names for path in self._fx_fusions[name].modules.values()]
            trainable = {id(p) for path in paths for p in self.get_submodule(path).parameters()}
            if unfreeze_adapters:
                frozen = {id(p) for n in setup.flatten() for path in self._fx_adapters[n].modules for p in frozen_parameters(self.get_submodule(path))}
                trainable |= {id(p) for n in setup.flatten() for p in self._adapter_parameters(n) if id(p) not in frozen}
            for p in self.parameters():
                p.requires_grad_(id(p) in trainable)
            self.train()

    def get_fusion_regularization_loss(self: AdaptedModule) -> torch.Tensor | None:
        """AdapterHub's: ``0.01 * ||I - V||^2`` summed over the trainable value matrices of every fusion layer
        (AdapterTrainer adds it to the loss when a fusion config has ``regularization``); None without any."""
        loss = None
        for fusion in self._fx_fusions.values():
            for path in fusion.modules.values():
                value = getattr(self.get_submodule(path), "value", None)
                if value is not None and value.weight.requires_grad:
                    eye = torch.eye(value.weight.shape[0], device=value.weight.device, dtype=value.weight.dtype)
                    term = 0.01 * (eye - value.weight).pow(2).sum()
                    loss = term if loss is None else loss + term
        return loss

    def save_adapter_fusion(self: AdaptedModule, directory: str | os.PathLike, adapter_names, meta_dict: dict | None = None, *,
                            use_safetensors: bool = False) -> None:
        """Write an AdapterFusion in AdapterHub's files: ``adapter_fusion_config.json`` and
        ``pytorch_model_adapter_fusion.bin`` (``model_adapter_fusion.safetensors`` with ``use_safetensors``),
        keys as AdapterHub's model names them. Replaced in one step when complete."""
        name = _fusion_name(adapter_names)
        if name not in self._fx_fusions:
            raise AdapterError(f"{self._fx_model_name} has no AdapterFusion {name!r} (fusions: {', '.join(self._fx_fusions) or 'none'})")
        fusion = self._fx_fusions[name]
        blocks = {(b.layer, b.location): b for b in self._fx_blocks}
        tensors = {}
        for where, path in fusion.modules.items():
            for pname, p in self.get_submodule(path).named_parameters():
                tensors[join(hub_prefix(blocks[where]), CONTAINER, name, pname)] = p.detach().cpu().contiguous()
        source_config = getattr(self.__dict__.get("_fx_source"), "config", None)
        meta = {"config": fusion.config.to_dict(), "name": name, "hidden_size": next(iter(blocks.values())).hidden_size,
                "adapter_names": [c if isinstance(c, str) else c.to_dict() for c in fusion.fuse.children],
                "model_type": getattr(source_config, "model_type", None), "model_name": "", "model_class": self._fx_model_name,
                "version": "fxadapt"}
        if meta_dict:
            meta.update(meta_dict)
        target = os.path.abspath(os.fspath(directory))
        weights = WEIGHTS_FILES[0] if use_safetensors else WEIGHTS_FILES[1]
        with atomic_directory(target, owned=(CONFIG_FILE, *WEIGHTS_FILES).__contains__) as tmp:
            with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, sort_keys=True, allow_nan=False)
            if use_safetensors:
                from safetensors.torch import save_file

                save_file(tensors, os.path.join(tmp, weights), metadata={"format": "pt"})
            else:
                torch.save(tensors, os.path.join(tmp, weights))

    def load_adapter_fusion(self: AdaptedModule, directory: str | os.PathLike, load_as: str | None = None, *, set_active: bool = False) -> str:
        """Add the AdapterFusion saved in ``directory`` (AdapterHub's files; its adapters must be on the module);
        its name. CheckpointError names the file and field or tensor, and nothing changes."""
        directory = os.fspath(directory)
        config_path = os.path.join(directory, CONFIG_FILE)
        meta = read_json(config_path)
        for field, types in (("config", (dict,)), ("name", (str,)), ("adapter_names", (list, str))):
            if not isinstance(meta.get(field), types):
                raise CheckpointError(f"{config_path}: {field} must be {' or '.join(t.__name__ for t in types)}, got {meta.get(field)!r}",
                                      path=config_path)
        names = meta["adapter_names"]
        children = names.split(",") if isinstance(names, str) else [Block.from_dict(c) if isinstance(c, dict) else c for c in names]
        if not all(isinstance(c, (str, Stack)) for c in children):
            raise CheckpointError(f"{config_path}: adapter_names must be adapter names, got {names!r}", path=config_path)
        try:
            config = AdapterFusionConfig.from_dict(meta["config"])
        except ConfigError as e:
            raise CheckpointError(f"{config_path}: config.{e.field}: {e}", path=config_path) from None
        weights_path = next((os.path.join(directory, f) for f in WEIGHTS_FILES if os.path.isfile(os.path.join(directory, f))), None)
        if weights_path is None:
            raise CheckpointError(f"{directory} has no AdapterFusion weights file (looked for {', '.join(WEIGHTS_FILES)})", path=directory)
        tensors = read_tensors(weights_path)
        saved, name = meta["name"], load_as or meta["name"]
        with self._atomic():
            self.add_adapter_fusion(Fuse(*children, name=name), config)
            fusion = self._fx_fusions[name]
            expected = {join(path, p): (where, p) for where, path in fusion.modules.items() for p, _ in self.get_submodule(path).named_parameters()}
            by_place = {(where, p): key for key, (where, p) in expected.items()}
            seen = set()
            for key, tensor in tensors.items():
                marker = f".{CONTAINER}.{saved}."
                if marker not in f".{key}":
                    raise CheckpointError(f"{weights_path}: unexpected tensor {key} (not of AdapterFusion {saved!r})", path=weights_path, tensor=key)
                where = layer_and_location(key, CONTAINER)
                param = f".{key}".split(marker, 1)[1]
                ours = by_place.get((where, param))
                if ours is None:
                    raise CheckpointError(f"{weights_path}: tensor {key} has no place in {self._fx_model_name} (layer {where[0]}, "
                                          f"{where[1]} block)", path=weights_path, tensor=key)
                target = self.get_parameter(ours)
                if ours in seen:
                    raise CheckpointError(f"{weights_path}: two tensors give {ours}", path=weights_path, tensor=key)
                if tensor.shape != target.shape or not tensor.is_floating_point():
                    raise CheckpointError(f"{weights_path}: tensor {key} has shape {tuple(tensor.shape)} ({tensor.dtype}), the model's "
                                          f"{tuple(target.shape)}", path=weights_path, tensor=key)
                if not torch.isfinite(tensor).all():
                    raise CheckpointError(f"{weights_path}: tensor {key} holds NaN or infinite values", path=weights_path, tensor=key)
                with torch.no_grad():
                    target.copy_(tensor)
                seen.add(ours)
            missing = sorted(set(expected) - seen)
            if missing:
                raise CheckpointError(f"{weights_path}: no tensor for {missing[0]} ({len(missing)} missing)", path=weights_path, tensor=missing[0])
            if set_active:
                self.set_active_adapters(fusion.fuse)
        return name


def _fuse_names(setup, top: bool = False) -> list[str]:
    """The names of the Fuse blocks in ``setup`` (with ``top``: itself and its children, as AdapterHub's
    ``train_adapter_fusion`` looks)."""
    if not isinstance(setup, Block):
        return []
    own = [setup.name] if isinstance(setup, Fuse) else []
    if top:
        return own + [c.name for c in setup.children if isinstance(c, Fuse)]
    return own + [n for c in setup.children for n in _fuse_names(c)]


# -- forward hooks -----------------------------------------------------------------------------


def prepare_call(module: AdaptedModule, args: tuple, kwargs: dict):
    """Forward pre-hook (before the module's own): ``output_adapter_fusion_attentions=True`` turns on recording."""
    recorder = module._fx_fusion_recorder
    recorder.values.clear()
    recorder.active = bool(kwargs.pop("output_adapter_fusion_attentions", False))


def attach_attentions(module: AdaptedModule, args: tuple, output):
    """Forward hook: ``output.adapter_fusion_attentions`` after a call that asked for them."""
    recorder = module._fx_fusion_recorder
    return attach_recorded(module, output, recorder, "adapter_fusion_attentions", recorder.attentions)
