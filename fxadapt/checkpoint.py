"""Adapter checkpoints: saving, loading and averaging adapters, with the checks every format shares.
The formats are one file each under ``fxadapt/formats`` (fxadapt's own, PEFT's, AdapterHub's);
AdapterHub's tensors are converted by the method whose architecture they hold.

:class:`CheckpointMixin` gives :class:`~fxadapt.AdaptedModule` ``save_adapter``, ``load_adapter`` and
``average_adapter``. ``load_adapter`` tells the formats apart by the files in the directory:

- fxadapt: ``fxadapt_config.json`` (``format``, ``fxadapt_version``, adapter ``name``, ``config`` as
  ``AdapterConfig.to_dict()``, the ``modules`` it adapts) + ``fxadapt_model.safetensors`` (the
  tensors of ``adapter_state_dict``). Round trips are bit for bit.
- PEFT (LoRA, DoRA, VeRA, (IA)^3, LoHa, LoKr): ``adapter_config.json`` with ``peft_type`` + ``adapter_model.safetensors``
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
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from .arithmetic import AVERAGE_IGNORES, combine
from .config import DTYPES, AdapterConfig
from .errors import AdapterError, CheckpointError, ConfigError, SiteError
from .formats import adapterhub, native, peft
from .formats.adapterhub import ADAPTERHUB_CONVERTERS, register_adapterhub_converter
from .formats.common import (ADAPTERHUB_WEIGHTS, CHECKPOINT_FILES, HUB_CONFIG, NATIVE_CONFIG, NATIVE_WEIGHTS, PEFT_WEIGHTS,
                             AdapterHubCheckpoint, Converted, by_suffix, read_json, read_tensors, resolve_module)
from .fsutil import atomic_directory
from .methods import METHODS
from .naming import state_key
from .plan import plan

if TYPE_CHECKING:
    from .module import AdaptedModule

__all__ = ["CheckpointMixin", "Converted", "AdapterHubCheckpoint", "ADAPTERHUB_CONVERTERS", "register_adapterhub_converter",
           "read_tensors", "detect_format", "resolve_module", "state_key", "AVERAGE_IGNORES", "CHECKPOINT_FILES",
           "NATIVE_CONFIG", "NATIVE_WEIGHTS", "HUB_CONFIG", "PEFT_WEIGHTS", "ADAPTERHUB_WEIGHTS"]



def detect_format(directory: str) -> str:
    """``"fxadapt"``, ``"peft"`` or ``"adapterhub"``: which format the adapter in ``directory`` has."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is not a directory", path=directory)
    if os.path.isfile(os.path.join(directory, NATIVE_CONFIG)):
        return "fxadapt"
    path = os.path.join(directory, HUB_CONFIG)
    if os.path.isfile(path):
        data = read_json(path)
        if "peft_type" in data:
            return "peft"
        if "config" in data:
            return "adapterhub"
        raise CheckpointError(f"{path} is neither PEFT's (no peft_type) nor AdapterHub's (no config) adapter config", path=path)
    raise CheckpointError(f"{directory} holds no adapter: expected {NATIVE_CONFIG} (fxadapt) or {HUB_CONFIG} (PEFT, AdapterHub)",
                          path=directory)


_READERS = {"fxadapt": native.read, "peft": peft.read, "adapterhub": adapterhub.read}
_WRITERS = {"fxadapt": native.write, "peft": peft.write}


# -- the mixin ----------------------------------------------------------------------------------


class CheckpointMixin:
    """Saving, loading and combining adapters (mixed into AdaptedModule)."""

    def save_adapter(self: AdaptedModule, directory: str | os.PathLike, name: str, format: str = "fxadapt") -> None:
        """Write adapter ``name`` to ``directory`` (created if needed).

        ``format="fxadapt"``: ``fxadapt_config.json`` + ``fxadapt_model.safetensors``, for every method;
        loading it back gives bit-identical outputs. ``format="peft"``: ``adapter_config.json`` +
        ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained(model, directory)`` loads,
        for LoRA, DoRA, VeRA, (IA)^3, LoHa and LoKr. PEFT adapts whole modules, so fxadapt's per-role LoRA on a fused projection
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
        """Load an adapter saved by fxadapt, PEFT (LoRA, DoRA, VeRA, (IA)^3, LoHa, LoKr) or AdapterHub; return its name.

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
                        normalize_weights: bool = True, set_active: bool = False, combine_strategy: str = "linear",
                        svd_rank: int | None = None, density: float | None = None, majority_sign_method: str = "total",
                        svd_clamp: float | None = None, seed: int | None = None) -> None:
        """Add adapter ``name``, a combination of ``adapters`` with ``weights`` (``fxadapt.arithmetic``).

        ``combine_strategy``: AdapterHub's ``"linear"`` (default: every tensor the weighted sum of the
        same-named tensors, any method; LoRA's A and B each, so ``B A`` is not the weighted sum of the
        inputs' ``B A``), ``"lora_linear_only_negate_b"`` (a negative weight negates B only) and
        ``"lora_delta_w_svd"`` (the weighted sum of the unscaled ``B A``, cut to rank ``svd_rank`` by SVD);
        PEFT's ``add_weighted_adapter`` types for LoRA, with the inputs' scalings folded in (the new
        adapter has ``alpha = r``): ``"cat"`` (exact: ``sum w_i dW_i``, rank the sum of the ranks),
        ``"svd"`` (rank ``svd_rank``, default the largest input rank; ``svd_clamp``), ``"ties"``,
        ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` (with ``density``; TIES with
        ``majority_sign_method``) and their ``"_svd"`` forms. DARE draws from torch's global generator
        as PEFT does, or from ``seed``.

        ``weights`` default to equal; with ``normalize_weights`` (AdapterHub's default) they are divided
        by their sum before the strategy uses them (pass ``normalize_weights=False`` for PEFT's
        meaning, or for task arithmetic: ``"cat"`` with ``[1, -1]`` gives ``W + dW_a - dW_b`` exactly).
        The inputs' configs must be equal apart from ``dropout``, ``init_weights`` and
        ``init_weights_seed`` (``AVERAGE_IGNORES``), and for PEFT's types also ``r``, ``alpha``,
        ``use_rslora`` and the patterns; the new adapter takes the first input's config (with its new
        rank and alpha). Bad arguments raise ConfigError naming the field, an adapter the strategy cannot
        combine AdapterError; the module is left unchanged.

        >>> gm.average_adapter("avg", ["task_a", "task_b"], [0.3, 0.7])  # doctest: +SKIP
        >>> gm.average_adapter("diff", ["a", "b"], [1, -1], normalize_weights=False, combine_strategy="cat")  # doctest: +SKIP
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
                raise AdapterError("weights sum to 0 and cannot be normalized; pass normalize_weights=False to use them as they are")
            weights = [w / total for w in weights]
        config, tensors = combine(self, names, weights, combine_strategy, svd_rank=svd_rank, density=density,
                                  majority_sign_method=majority_sign_method, svd_clamp=svd_clamp, seed=seed)
        self._add_with_weights(name, config, tensors, set_active)

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
    name = "adapter"  # keys do not depend on the name (add_adapter checks the real one)
    path = c.config_path or c.path
    try:
        placements = plan(name, config, gm._fx_anatomy)
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
        state.update({state_key(module, name, k): t for k, t in weights.named_parameters()})
    fields = {}
    for p in placements:
        if p.method == "lora" and p.module is not None:
            cfg = p.config or config
            pattern = next((k for k, _ in cfg.rank_pattern if re.match(rf"(.*\.)?({k})$", p.site.path)), None)
            field = f"rank_pattern[{pattern!r}]" if pattern is not None else "r"
            for param in ("lora_A", "lora_B"):
                fields[state_key(p.module, name, param)] = f"{field}={cfg.rank_for(p.site.path)} in {path}"
    return state, fields


def _match_keys(expected: Iterable[str], c: Converted) -> Converted:
    """The file's tensors keyed as the adapter's: the same key, or the only one that ends with it or
    that it ends with (module paths of a model with and without a head); others keep their names."""
    expected = set(expected)
    taken = expected & c.tensors.keys()
    tensors, sources = {}, {}
    for key, tensor in c.tensors.items():
        ours = key if key in expected else by_suffix(key, expected - taken) or key
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
