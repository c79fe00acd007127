"""VeRA (Kopiczko et al., 2024, vector-based random matrix adaptation), AdapterHub's ``VeraConfig``
with PEFT's computation.

Frozen random ``A`` (r, in) and ``B`` (out, r), one pair per adapter shared by all its projections:
of the largest input and output widths among them, each projection reading its leading slice (as
PEFT). Per projection two trained vectors, ``d`` (r) and ``b`` (out). At a projection ``y = W x + c``:
``y + scaling * b * (B[:out] (d * (A[:, :in] dropout(x))))`` (PEFT's order; ``scaling = alpha / r``,
AdapterHub's, 1 in PEFT). Merged: ``W + scaling * diag(b) B diag(d) A``.

Where: as LoRA (``select_sites``); a fused projection (GPT-2's ``c_attn``) gets one VeRA per role, on
that role's columns. ``d`` and ``b`` live where LoRA's weights do (``<linear>.loras.<name>``, PEFT's
names ``vera_lambda_d`` / ``vera_lambda_b``); ``A`` and ``B`` in ``shared_parameters.<name>`` (where
AdapterHub keeps them) as ``vera_A`` / ``vera_B``: parameters, so that they are saved with the
adapter, but frozen (``train_adapter`` leaves them fixed).

AdapterHub 1.3.0's VeRA (``adapters/methods/lora.py``, ``Vera``) trains full matrices, not vectors:
``vera_D`` (r, r) and ``vera_B`` (out, out), initialised to ``diag(vera_d)`` and ``diag(vera_b)``, with
``y + scaling * vera_B B vera_D A x`` (the same order: b outside, d inside). Its shared A and B have the
shape of the first adapted projection (projections of other shapes fail in AdapterHub itself), and
``save_adapter`` on a bare model leaves them out of the file (as Compacter's PHM rule).
:func:`read_adapterhub` reads a checkpoint whose matrices are diagonal as this VeRA, and one with
nonzero off-diagonal entries (any trained one) as the LoRA it equals: ``B' = vera_B B``,
``A' = vera_D A``, the same ``scaling``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import LoRAConfig, VeraConfig
from ..errors import CheckpointError, ConfigError, MergeError, SiteError
from ..formats.common import (HUB_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, AdapterHubCheckpoint, Converted, check_peft, first_file, put,
                              read_tensors, resolve_module, translate, whole_modules)
from ..naming import SHARED, weights_path
from ..placement import Placement
from ..sites import Anatomy, Site
from .base import Emitter, Method, PeftFormat, columns_tensor
from .lora import convert_adapterhub, fold_lora, init_factors, select_sites, site_path, weights_dtype

if TYPE_CHECKING:
    from ..module import AdaptedModule

aten = torch.ops.aten

class VeraWeights(nn.Module):
    """``vera_lambda_d`` (r) and ``vera_lambda_b`` (out) of one site, initialised to ``vera_d`` and
    ``vera_b``; the shared A and B are read from the adapter's :class:`VeraShared` (linked, not a
    submodule: they are saved once, under ``shared_parameters``; ``add_adapter`` calls :meth:`link`)."""

    label = "VeRA"  # in fxadapt.draw's pictures

    def __init__(self, site: Site, config: LoRAConfig, like: torch.Tensor):
        super().__init__()
        self.site = site
        self.scaling = config.scaling_for(site.path)
        self.dropout = float(config.dropout)
        self.cast = config.dtype is not None  # adapter dtype chosen apart from the model's: cast around it
        dtype = weights_dtype(config, like)
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.vera_d), device=like.device, dtype=dtype))
        self.vera_lambda_b = nn.Parameter(torch.full((site.out_features,), float(config.vera_b), device=like.device, dtype=dtype))
        self.register_buffer("columns", columns_tensor(site.columns), persistent=False)
        object.__setattr__(self, "shared", None)  # a plain attribute: set by link()

    def link(self, shared: VeraShared) -> None:
        """Read A and B from ``shared`` (the module at the placement's ``shared`` path)."""
        object.__setattr__(self, "shared", shared)

    def delta(self) -> torch.Tensor:
        """``scaling * diag(b) B diag(d) A`` (out, in), in float32 or wider, as PEFT's delta weight."""
        if self.shared is None:
            raise MergeError(f"the VeRA weights at {self.site.path} have lost their shared A and B; add the adapter again")
        dtype = torch.promote_types(self.vera_lambda_d.dtype, torch.float32)
        a = self.shared.vera_A[:, : self.site.in_features].to(dtype)
        b = self.shared.vera_B[: self.site.out_features].to(dtype)
        delta = (self.vera_lambda_b.to(dtype).unsqueeze(-1) * b) @ (self.vera_lambda_d.to(dtype).unsqueeze(-1) * a)
        return delta * self.scaling if self.scaling != 1.0 else delta


class VeraShared(nn.Module):
    """The adapter's frozen random ``vera_A`` (r, largest in) and ``vera_B`` (largest out, r)."""

    label = "VeRA A, B"

    def __init__(self, config: LoRAConfig, in_features: int, out_features: int, like: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        a, b = projections(config, in_features, out_features, like.device)
        self.vera_A = nn.Parameter(a.to(dtype), requires_grad=False)
        self.vera_B = nn.Parameter(b.to(dtype), requires_grad=False)

    def frozen(self) -> list[nn.Parameter]:
        return [self.vera_A, self.vera_B]


def projections(config: LoRAConfig, in_features: int, out_features: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) and B (out, r) in float32, drawn as ``init_weights`` says. ``"vera"``: PEFT's draw
    (Kaiming-uniform with gain sqrt(2), A then B from one generator seeded with ``init_weights_seed``, so
    that a seed equal to PEFT's ``projection_prng_key`` gives PEFT's matrices; the global random state
    without a seed, as AdapterHub); AdapterHub's other choices as LoRA's (:func:`init_factors`)."""
    shapes = ((config.r, in_features), (out_features, config.r))
    if torch.device(device or "cpu").type == "meta":
        return tuple(torch.empty(s, device="meta") for s in shapes)  # type: ignore[return-value]
    g = None if config.init_weights_seed is None else torch.Generator().manual_seed(config.init_weights_seed)
    a, b = (torch.empty(s) for s in shapes)
    if config.init_weights == "vera":
        with torch.no_grad():
            for t in (a, b):  # PEFT's _kaiming_init
                bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(t.shape[1])
                t.uniform_(-bound, bound, generator=g)
    else:
        init_factors(a, b, config.init_weights, g)
    return a.to(device), b.to(device)


def build_shared(config: LoRAConfig, placements: list[Placement], like: torch.Tensor) -> VeraShared:
    """One A and B for all the adapter's sites, of their largest widths, in the sites' weights' dtype."""
    in_features, out_features = max(p.site.in_features for p in placements), max(p.site.out_features for p in placements)
    return VeraShared(config, in_features, out_features, like, weights_dtype(config, like))


# -- rewrite rule ---------------------------------------------------------------------------------


def insert_vera(e: Emitter, p: Placement, w: VeraWeights) -> None:
    site, shared = p.site, p.shared[0]
    d, b = e.attr(f"{p.module}.vera_lambda_d"), e.attr(f"{p.module}.vera_lambda_b")
    a = e.call(aten.slice.Tensor, e.attr(f"{shared}.vera_A"), 1, 0, site.in_features)
    bb = e.call(aten.slice.Tensor, e.attr(f"{shared}.vera_B"), 0, 0, site.out_features)
    if w.shared is None or w.shared.vera_A.dtype != w.vera_lambda_d.dtype:
        a, bb = e.call(aten.type_as.default, a, d), e.call(aten.type_as.default, bb, d)
    # As PEFT: the input cast to the adapter's dtype before dropout; lambda_b * B (lambda_d * A x).
    x = e.call(aten.type_as.default, e.x, d) if w.cast else e.x
    if w.dropout > 0:
        x = e.call(aten.dropout.default, x, e.rate(w.dropout), True)
    h = e.call(aten.mul.Tensor, d, e.call(aten.linear.default, x, a))
    delta = e.call(aten.mul.Tensor, b, e.call(aten.linear.default, h, bb))
    if w.scaling != 1.0:
        delta = e.call(aten.mul.Tensor, delta, w.scaling)
    if not w.cast:
        e.add_to_columns(delta, site, f"{p.module}.columns")
        return
    y = e.y
    e.y = e.call(aten.type_as.default, y, delta)
    e.add_to_columns(delta, site, f"{p.module}.columns")
    e.y = e.call(aten.type_as.default, e.y, y)


# -- where -----------------------------------------------------------------------------------------


def place(name: str, config: LoRAConfig, anatomy: Anatomy) -> list[Placement]:
    """LoRA's sites; every placement shares ``shared_parameters.<name>`` (A and B)."""
    for field, problem in (("vera_d", config.vera_d is None), ("vera_b", config.vera_b is None)):
        if problem:
            raise ConfigError(f"{type(config).__name__}.{field} is None: VeRA needs both vera_d and vera_b (initial d and b)",
                              field=field, value=None)
    if config.rank_pattern:
        raise ConfigError(f"{type(config).__name__}.rank_pattern must be empty for VeRA: one A and B of rank r={config.r} serve every "
                          f"projection, got {dict(config.rank_pattern)!r}", field="rank_pattern", value=dict(config.rank_pattern))
    if config.use_gating:
        raise ConfigError(f"{type(config).__name__}.use_gating is not supported for VeRA", field="use_gating", value=True)
    shared = (weights_path(SHARED, name),)
    return [Placement(name, "vera", s, site_path(name, s), config, shared=shared) for s in select_sites(config, anatomy)]


# -- AdapterHub checkpoints --------------------------------------------------------------------------


def read_adapterhub(gm: AdaptedModule, ckpt: AdapterHubCheckpoint) -> Converted:
    """AdapterHub's VeRA (a "lora" config with ``vera_d`` / ``vera_b``): per projection
    ``<linear>.loras.<name>.vera_D`` (r, r) and ``vera_B`` (out, out), and the shared
    ``shared_parameters.<name>.lora_A`` (r, in) / ``lora_B`` (out, r). Diagonal matrices everywhere: this
    VeRA, their diagonals as ``vera_lambda_d`` / ``vera_lambda_b``. Otherwise the exact LoRA
    ``lora_B = vera_B B``, ``lora_A = vera_D A`` (a warning says so). A and B absent (AdapterHub leaves them
    out on a bare model): drawn again as AdapterHub draws them when the config has ``init_weights_seed``;
    else a new draw with a warning for the VeRA, a CheckpointError for the LoRA (it would bake the draw in)."""
    name = ckpt.name
    shared_keys = {which: [k for k in ckpt.tensors if k == f"shared_parameters.{name}.{which}" or k.endswith(f".shared_parameters.{name}.{which}")]
                   for which in ("lora_A", "lora_B")}
    shared = {which: ckpt.tensors[keys[0]] for which, keys in shared_keys.items() if keys}
    taken = {k for keys in shared_keys.values() for k in keys}
    per_site = {k: t for k, t in ckpt.tensors.items() if k not in taken}
    vectors = {"vera_D": "vera_lambda_d", "vera_B": "vera_lambda_b"}
    mats = [t for k, t in per_site.items() if k.rsplit(".", 1)[-1] in vectors]
    diagonal = all(t.ndim == 2 and t.shape[0] == t.shape[1] and torch.equal(t, torch.diag(torch.diagonal(t))) for t in mats)
    if diagonal:
        per_site = {(k[: -len(k.rsplit(".", 1)[-1])] + vectors[k.rsplit(".", 1)[-1]] if k.rsplit(".", 1)[-1] in vectors else k):
                    (torch.diagonal(t).clone() if k.rsplit(".", 1)[-1] in vectors else t) for k, t in per_site.items()}
    converted, where = convert_adapterhub(gm, dataclasses.replace(ckpt, tensors=per_site), VeraConfig, ckpt.config)
    sites = list(dict.fromkeys(p.site for p in where.values()))
    if len(shared) < 2:
        if not sites:
            raise CheckpointError(f"{ckpt.weights_path}: no VeRA weights of adapter {name!r}", path=ckpt.weights_path)
        shared = _redraw(ckpt, converted.config, sites[0], diagonal) | shared
    a, b = shared["lora_A"], shared["lora_B"]
    sources = {"lora_A": shared_keys["lora_A"][0] if shared_keys["lora_A"] else "(drawn)",
               "lora_B": shared_keys["lora_B"][0] if shared_keys["lora_B"] else "(drawn)"}
    if diagonal:
        converted.tensors["shared_parameters.vera_A"], converted.tensors["shared_parameters.vera_B"] = a, b
        converted.sources.update({"shared_parameters.vera_A": sources["lora_A"], "shared_parameters.vera_B": sources["lora_B"]})
        return converted
    # Full matrices: the LoRA B' = vera_B B, A' = vera_D A of each projection (AdapterHub's product, regrouped).
    warnings.warn(f"{ckpt.weights_path}: AdapterHub's VeRA matrices vera_D / vera_B are not diagonal (AdapterHub trains them whole), "
                  "so no VeRA (vectors d, b) computes them: the adapter is loaded as the LoRA it equals, lora_A = vera_D A, "
                  "lora_B = vera_B B", stacklevel=4)
    config = ckpt.make_config(LoRAConfig, **{**dataclasses.asdict(converted.config), "vera_d": None, "vera_b": None, "init_weights": "lora"})
    tensors, lora_sources = {}, {}
    for key, t in converted.tensors.items():
        prefix, _, param = key.rpartition(".")
        source = converted.sources.get(key, key)
        if param in vectors and key in where:
            factor, which = (a, "lora_A") if param == "vera_D" else (b, "lora_B")
            if t.ndim != 2 or t.shape[-1] != factor.shape[0]:
                raise CheckpointError(f"{ckpt.weights_path}: {source} of shape {tuple(t.shape)} does not fit the shared {which} of shape "
                                      f"{tuple(factor.shape)} (AdapterHub shares the first projection's A and B)",
                                      path=ckpt.weights_path, tensor=source)
            key = f"{prefix}.{which}"
            t = (t.double() @ factor.double()).to(t.dtype)
        tensors[key], lora_sources[key] = t, source
    return Converted(ckpt.name, config, tensors, ckpt.weights_path, lora_sources)


def _redraw(ckpt: AdapterHubCheckpoint, config: LoRAConfig, site: Site, diagonal: bool) -> dict[str, torch.Tensor]:
    """A (r, in) and B (out, r) of ``site``'s shape, as AdapterHub's ``init_shared_vera_parameters`` draws
    them: after ``torch.manual_seed(init_weights_seed)`` when the seed is set (exact), else anew."""
    seed = config.init_weights_seed
    if not seed:  # AdapterHub's fix_seed ignores 0 and None: its draw came from the global random state
        if not diagonal:
            raise CheckpointError(f"{ckpt.weights_path}: AdapterHub's VeRA shared A and B (shared_parameters.{ckpt.name}.lora_A / "
                                  "lora_B) are not in the file (AdapterHub 1.3.0's save_adapter leaves them out on a model without "
                                  "heads) and init_weights_seed is not set, so they cannot be drawn again; its vera_D / vera_B are "
                                  "not diagonal, so it is read as the LoRA vera_B B, vera_D A, which needs them: add them to the file",
                                  path=ckpt.weights_path)
        warnings.warn(f"{ckpt.weights_path} has no VeRA A and B (shared_parameters.{ckpt.name}.lora_A / lora_B): AdapterHub 1.3.0 does "
                      "not save them and init_weights_seed is not set. The adapter starts from new ones, so its outputs differ from "
                      "the saved model's; load the ones you trained with into adapter_state_dict()['shared_parameters.vera_A'] "
                      "and ['shared_parameters.vera_B']", stacklevel=5)
    with torch.random.fork_rng(devices=[]):
        if seed:
            torch.manual_seed(seed)
        a, b = torch.zeros(config.r, site.in_features), torch.zeros(site.out_features, config.r)
        if config.init_weights == "vera":
            nn.init.kaiming_uniform_(a)
            nn.init.kaiming_uniform_(b)
        elif config.init_weights == "lora":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif config.init_weights == "bert":
            nn.init.normal_(a, std=0.02)
            nn.init.normal_(b, std=0.02)
        else:  # "ia3"
            nn.init.ones_(a)
            nn.init.ones_(b)
    return {"lora_A": a, "lora_B": b}


# -- PEFT checkpoints --------------------------------------------------------------------------------

# The PEFT config fields fxadapt reads, with the JSON types each must have; the tensors' names.
_PEFT_FIELDS = {"r": (int,), "target_modules": (list, str), "projection_prng_key": (int,), "save_projection": (bool,),
                "vera_dropout": (int, float), "d_initial": (int, float), "fan_in_fan_out": (bool,), "init_weights": (bool,)}
_PEFT_PARAMS = ("vera_lambda_d", "vera_lambda_b")
_PEFT_SHARED = {"base_model.vera_A": "shared_parameters.vera_A", "base_model.vera_B": "shared_parameters.vera_B"}


def read_peft(gm: AdaptedModule, directory: str, path: str, meta: dict, key_mapping) -> Converted:
    """A PEFT VeRA adapter: ``base_model.model.<module>.vera_lambda_d`` / ``.vera_lambda_b`` and, saved with
    ``save_projection`` (PEFT's default), the shared ``base_model.vera_A`` / ``base_model.vera_B``; without
    them A and B are drawn again from ``projection_prng_key`` as PEFT does (PEFT warns that this may
    differ between systems). fxadapt's config: ``VeraConfig`` with ``alpha = r`` (PEFT scales by 1)."""
    check_peft(path, meta, _PEFT_FIELDS, refuse=("layers_pattern",), bias=True)
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
        if key in _PEFT_SHARED:
            put(tensors, sources, _PEFT_SHARED[key], tensor, key, weights)
            continue
        module, _, param = key.removeprefix(PEFT_PREFIX).rpartition(".")
        found = resolve_module(gm, module, key_mapping) if param in _PEFT_PARAMS else None
        put(tensors, sources, key if found is None else f"{found}.{param}", tensor, key, weights)
    missing = [k for k in _PEFT_SHARED.values() if k not in tensors]
    if missing and len(missing) < len(_PEFT_SHARED):
        raise CheckpointError(f"{weights}: has {'base_model.vera_B' if missing[0].endswith('A') else 'base_model.vera_A'} but not the other",
                              path=weights)
    if missing:  # save_projection=False: PEFT's draw from projection_prng_key, of the largest widths
        from ..plan import plan  # imports the methods

        try:
            sites = [p.site for p in plan("adapter", config, gm._fx_anatomy)]
        except (ConfigError, SiteError) as e:
            raise CheckpointError(f"{path}: the adapter does not fit {gm._fx_model_name}: {e}", path=path) from e
        a, b = projections(config, max(s.in_features for s in sites), max(s.out_features for s in sites))
        dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
        for key, value in zip(_PEFT_SHARED.values(), (a, b)):
            tensors[key], sources[key] = value.to(dtype), f"{key} (drawn from projection_prng_key={config.init_weights_seed})"
    return Converted("vera", config, tensors, weights, sources, path)


def write_peft(gm: AdaptedModule, name: str) -> tuple[str, dict, str, dict[str, torch.Tensor]]:
    """PEFT's VERA with ``save_projection=True``: ``vera_lambda_b`` carries fxadapt's ``scaling`` (PEFT has none)."""
    adapter = whole_modules(gm, name)
    config = adapter.config
    tensors: dict[str, torch.Tensor] = {}
    for p in adapter.placements:
        w = gm.get_submodule(p.module)
        key = f"{PEFT_PREFIX}{p.site.path}."
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


METHOD = Method("vera", "lora", VeraWeights, insert_vera, place, fold_lora, build_shared=build_shared,
                peft=PeftFormat("VERA", read_peft, write_peft))
