"""Adapter arithmetic: how ``AdaptedModule.average_adapter`` combines adapters into a new one.

AdapterHub 1.3.0's strategies (``model.average_adapter(..., combine_strategy=...)``):

- ``"linear"``: every tensor the weighted sum of the same-named tensors (any method). LoRA's A and B
  are each summed, so ``B A`` is *not* the weighted sum of the inputs' ``B A``.
- ``"lora_linear_only_negate_b"``: LoRA; ``A = sum |w_i| A_i``, ``B = sum w_i B_i`` (Zhang et al., 2023):
  a negative weight negates only B.
- ``"lora_delta_w_svd"``: LoRA; ``sum w_i B_i A_i`` (the products *without* the scaling), truncated to
  rank ``svd_rank`` by SVD (``B = U S``, ``A = V^T``); the new adapter has ``r = svd_rank`` and the inputs'
  ``alpha``, so its scaling is ``alpha / svd_rank``.

PEFT 0.21's ``add_weighted_adapter`` combination types, for LoRA (the inputs' scalings folded into the
weights; the new adapter has ``alpha = r``, scaling 1):

- ``"cat"``: A and B concatenated along the rank, ``A_i`` times ``w_i s_i``: exactly ``sum w_i s_i B_i A_i``.
- ``"svd"``: ``sum w_i s_i B_i A_i`` truncated by SVD to ``svd_rank`` (default the largest input rank).
- ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: PEFT's merges (``density`` of the
  values kept, TIES' majority sign by ``majority_sign_method``) applied to A with weights
  ``sign(w_i) sqrt(|w_i s_i|)`` and to B with ``sqrt(|w_i s_i|)``; with the suffix ``_svd`` applied to the
  products ``w_i s_i B_i A_i`` instead, then truncated by SVD. DARE drops values at random
  (``torch.bernoulli``, the global generator as PEFT, or ``seed``), in PEFT's order.

Task arithmetic: ``"cat"`` with ``weights=[1, -1]`` (``normalize_weights=False``) gives ``W + dW_a - dW_b``
exactly (so does ``"svd"`` at a rank that loses nothing). ``"lora_linear_only_negate_b"`` negates one
adapter exactly (``weights=[-1]``: ``W - dW``), but on two it gives ``(B_a - B_b)(A_a + A_b)``, with cross terms.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .config import AdapterConfig
from .errors import AdapterError, ConfigError
from .naming import state_key

if TYPE_CHECKING:
    from .module import AdaptedModule

__all__ = ["STRATEGIES", "combine"]

ADAPTERHUB = ("linear", "lora_linear_only_negate_b", "lora_delta_w_svd")
_MERGES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
#: Every ``combine_strategy`` ``average_adapter`` takes.
STRATEGIES = (*ADAPTERHUB, "cat", "svd", *_MERGES, *(m + "_svd" for m in _MERGES))
_DENSITY = (*_MERGES, *(m + "_svd" for m in _MERGES))
_SVD = ("lora_delta_w_svd", "svd", *(m + "_svd" for m in _MERGES))
#: Config fields ``average_adapter`` lets differ between its inputs (they do not change the function:
#: AdapterHub ignores dropout and init_weights; the init seed is init only); the strategies that fold
#: the scaling into the weights also let the rank and the scaling differ (``_FOLDED``).
AVERAGE_IGNORES = ("dropout", "init_weights", "init_weights_seed")
_FOLDED = ("r", "alpha", "use_rslora", "rank_pattern", "alpha_pattern")


def combine(gm: AdaptedModule, names: list[str], weights: list[float], strategy: str, *, svd_rank: int | None = None,
            density: float | None = None, majority_sign_method: str = "total", svd_clamp: float | None = None,
            seed: int | None = None) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config and the tensors (keyed as ``adapter_state_dict``) of the combination of adapters
    ``names`` with ``weights`` (already normalized where asked). Reads the adapters, changes nothing.
    A bad argument is a ConfigError naming it (``combine_strategy``, ``density``, ``svd_rank``, ...);
    an adapter the strategy cannot combine an AdapterError naming it."""
    _check_arguments(strategy, svd_rank, density, majority_sign_method, svd_clamp)
    configs = [gm._fx_adapters[n].config for n in names]
    if strategy != "linear":
        for n, c in zip(names, configs):
            if getattr(c, "method", None) != "lora" or getattr(c, "use_gating", False):
                raise AdapterError(f"combine_strategy={strategy!r} combines LoRA adapters; {n!r} is a {type(c).__name__}"
                                   f"{' with use_gating' if getattr(c, 'use_gating', False) else ''} (use 'linear')")
            if getattr(c, "modules_to_save", None):
                raise AdapterError(f"combine_strategy={strategy!r} combines LoRA weights; {n!r} also keeps copies of "
                                   f"{list(c.modules_to_save)} (modules_to_save), which only 'linear' averages")
    folded = strategy not in ADAPTERHUB
    _check_configs(names, configs, AVERAGE_IGNORES + (_FOLDED if folded else ()))
    if strategy == "linear":
        return configs[0], _linear(gm, names, weights)
    sites = _sites(gm, names)
    if folded and len(names) == 1:
        strategy = "peft_linear"  # PEFT: one adapter is combined linearly, whatever the type asked for
    if strategy in _SVD:
        rank = svd_rank or max(max([c.r, *(v for _, v in c.rank_pattern)]) for c in configs)
        smallest = min(min(parts[0][1].shape[-2], parts[0][0].shape[-1]) for parts in sites.values())
        if rank > smallest:
            raise ConfigError(f"svd_rank={rank} exceeds the smallest adapted projection's dimension ({smallest})", field="svd_rank",
                              value=rank)
    tensors, ranks = {}, {}
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for (module, path), parts in sites.items():
            a, b = _combine_site(strategy, parts, weights, rank if strategy in _SVD else None, density, majority_sign_method, svd_clamp)
            dtype = parts[0][0].dtype
            tensors[state_key(module, names[0], "lora_A")] = a.to(dtype)
            tensors[state_key(module, names[0], "lora_B")] = b.to(dtype)
            ranks[path] = a.shape[-2]
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise AdapterError(f"combining {names} gives non-finite values in {key} ({t.dtype})")
    config = configs[0]
    if strategy == "lora_linear_only_negate_b":
        return config, tensors
    if strategy == "lora_delta_w_svd":  # AdapterHub: r = svd_rank, alpha kept
        return config.replace(r=rank, rank_pattern=()), tensors
    # Scaling folded in: alpha = r everywhere; a rank of its own where a site's differs from the most common.
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = tuple((re.escape(path), k) for path, k in ranks.items() if k != r)
    return config.replace(r=r, alpha=r, use_rslora=False, rank_pattern=pattern, alpha_pattern=pattern), tensors


def _check_arguments(strategy, svd_rank, density, majority_sign_method, svd_clamp) -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"combine_strategy must be one of {list(STRATEGIES)}, got {strategy!r}", field="combine_strategy", value=strategy)
    if strategy in _DENSITY:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"combine_strategy={strategy!r} needs density, the fraction of values kept, in (0, 1], got {density!r}",
                              field="density", value=density)
    elif density is not None:
        raise ConfigError(f"density is for {list(_DENSITY)}, not combine_strategy={strategy!r}", field="density", value=density)
    if strategy in _SVD:
        if svd_rank is None and strategy == "lora_delta_w_svd":
            raise ConfigError("combine_strategy='lora_delta_w_svd' needs svd_rank, the new adapter's rank (AdapterHub has no default)",
                              field="svd_rank", value=None)
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
            raise ConfigError(f"svd_rank must be a positive whole number, got {svd_rank!r}", field="svd_rank", value=svd_rank)
        if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float)) or not 0 <= svd_clamp <= 1):
            raise ConfigError(f"svd_clamp must be a quantile in [0, 1], got {svd_clamp!r}", field="svd_clamp", value=svd_clamp)
    else:
        for field, value in (("svd_rank", svd_rank), ("svd_clamp", svd_clamp)):
            if value is not None:
                raise ConfigError(f"{field} is for {list(_SVD)}, not combine_strategy={strategy!r}", field=field, value=value)
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}",
                          field="majority_sign_method", value=majority_sign_method)


def _check_configs(names: list[str], configs: list[AdapterConfig], ignores: tuple[str, ...]) -> None:
    """The inputs' configs must be equal apart from the fields ``ignores`` names."""
    config = configs[0]
    for other, theirs in zip(names[1:], configs[1:]):
        ignored = {f: getattr(config, f) for f in ignores if hasattr(config, f)}
        if type(theirs) is not type(config) or theirs.replace(**ignored) != config:
            diff = [f.name for f in dataclasses.fields(config) if f.name not in ignored and getattr(config, f.name) != getattr(theirs, f.name, None)]
            raise AdapterError(f"cannot average {names[0]!r} and {other!r}: their configs differ in {diff or type(theirs).__name__}")


def _linear(gm: AdaptedModule, names: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    states = [gm.adapter_state_dict(n) for n in names]
    averaged = {}
    for key, first in states[0].items():
        wide = torch.promote_types(first.dtype, torch.float32)
        averaged[key] = sum(w * s[key].detach().to(wide) for w, s in zip(weights, states)).to(first.dtype)
        if not torch.isfinite(averaged[key]).all():  # float16 overflows
            raise AdapterError(f"averaging {names} gives non-finite values in {key} ({first.dtype})")
    return averaged


def _sites(gm: AdaptedModule, names: list[str]) -> dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """Per site of the first adapter, in its placement order (PEFT's module order): each input's
    (A, B, scaling), in float32 or wider. Every input must have the same sites."""
    per = []
    for n in names:
        sites = {}
        for p in gm._fx_adapters[n].placements:  # LoRA's only (refused above: modules_to_save's copies)
            w = gm.get_submodule(p.module)
            if p.site.linear.groups > 1:
                raise AdapterError(f"adapter {n!r}: its LoRA at {p.site.path}, a convolution with groups={p.site.linear.groups}, has a "
                                   "grouped B that only combine_strategy='linear' keeps")
            wide = torch.promote_types(w.lora_A.dtype, torch.float32)
            sites[state_key(p.module, n)] = (p.module, p.site.path, (w.lora_A.detach().to(wide), w.lora_B.detach().to(wide), w.scaling))
        per.append(sites)
    for n, sites in zip(names[1:], per[1:]):
        if sites.keys() != per[0].keys():
            raise AdapterError(f"cannot combine {names[0]!r} and {n!r}: they adapt different projections "
                               f"({sorted(sites.keys() ^ per[0].keys())[0]}, ...)")
    return {(module, path): [s[key][2] for s in per] for key, (module, path, _) in per[0].items()}


def _combine_site(strategy, parts, weights, rank, density, sign_method, clamp):
    """(A, B) of one site from the inputs' (A, B, scaling) ``parts``."""
    a_s, b_s, scalings = zip(*parts)
    if strategy == "lora_linear_only_negate_b":
        return sum(abs(w) * a for w, a in zip(weights, a_s)), sum(w * b for w, b in zip(weights, b_s))
    if strategy == "cat":  # PEFT: A_i * w_i * s_i stacked on the rank, B_i side by side
        return torch.cat([a * w * s for a, w, s in zip(a_s, weights, scalings)], dim=-2), torch.cat(b_s, dim=-1)
    if strategy in _SVD:
        if strategy == "lora_delta_w_svd":  # AdapterHub: the products without their scaling
            deltas, merge = [b @ a for a, b in zip(a_s, b_s)], "svd"
        else:
            deltas, merge = [(b @ a) * s for a, b, s in zip(a_s, b_s, scalings)], strategy.removesuffix("_svd")
        delta = _merge(merge if merge != "svd" else "linear", deltas, weights, density, sign_method)
        u, sv, vh = torch.linalg.svd(delta)
        u, vh = u[..., :rank] * sv[..., None, :rank], vh[..., :rank, :]
        if clamp is not None:  # PEFT's svd_clamp: both factors clipped at a quantile of their values
            high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
            u, vh = u.clamp(-high, high), vh.clamp(-high, high)
        return vh, u
    # PEFT's generalized task arithmetic on the factors: the sign on A only, sqrt(|w s|) on both.
    signed = [w * s for w, s in zip(weights, scalings)]
    weights_a = [math.sqrt(abs(ws)) * (1 if ws >= 0 else -1) for ws in signed]
    weights_b = [math.sqrt(abs(ws)) for ws in signed]
    merge = "linear" if strategy == "peft_linear" else strategy
    return (_merge(merge, list(a_s), weights_a, density, sign_method), _merge(merge, list(b_s), weights_b, density, sign_method))


def _merge(kind: str, tensors: list[torch.Tensor], weights: Sequence[float], density, sign_method) -> torch.Tensor:
    """PEFT's ``merge_utils``: task arithmetic (``linear``), ``magnitude_prune``, ``ties``, ``dare_linear``,
    ``dare_ties`` of same-shaped tensors."""
    if kind in ("magnitude_prune", "ties"):
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif kind.startswith("dare"):
        tensors = [t * torch.bernoulli(torch.full_like(t, density)) / density if density < 1 else t for t in tensors]
    stacked = torch.stack(tensors)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.ndim - 1))
    if kind not in ("ties", "dare_ties"):
        return (stacked * w).sum(0)
    # TIES: keep the values whose sign is the majority's (by total or by count), average those kept.
    sign = stacked.sign()
    majority = torch.where((stacked.sum(0) if sign_method == "total" else sign.sum(0)) >= 0, 1, -1)
    mask = sign == majority
    return (stacked * w * mask).sum(0) / torch.clamp(mask.sum(0), min=1.0)


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``int(density * numel)`` largest magnitudes zeroed (PEFT's top-k)."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
    return t * mask.reshape(t.shape)
