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
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import LoRAConfig
from ..errors import ConfigError, MergeError
from ..naming import SHARED, weights_path
from ..placement import Placement
from ..sites import Anatomy, Site
from .base import Emitter, Method, columns_tensor
from .lora import fold_lora, select_sites, site_path, weights_dtype

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
    without a seed, as AdapterHub). AdapterHub's other choices: ``"lora"`` (A Kaiming-uniform with
    a = sqrt(5), B zero), ``"bert"`` (normal, std 0.02), ``"ia3"`` (ones)."""
    shapes = ((config.r, in_features), (out_features, config.r))
    if torch.device(device or "cpu").type == "meta":
        return tuple(torch.empty(s, device="meta") for s in shapes)  # type: ignore[return-value]
    g = None if config.init_weights_seed is None else torch.Generator().manual_seed(config.init_weights_seed)
    a, b = (torch.empty(s) for s in shapes)
    with torch.no_grad():
        if config.init_weights == "vera":
            for t in (a, b):  # PEFT's _kaiming_init
                bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(t.shape[1])
                t.uniform_(-bound, bound, generator=g)
        elif config.init_weights == "lora":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            nn.init.zeros_(b)
        elif config.init_weights == "bert":
            nn.init.normal_(a, std=0.02, generator=g)
            nn.init.normal_(b, std=0.02, generator=g)
        else:  # "ia3"
            nn.init.ones_(a)
            nn.init.ones_(b)
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


METHOD = Method("vera", "lora", VeraWeights, insert_vera, place, fold_lora, build_shared=build_shared)
