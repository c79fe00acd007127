"""Representation fine-tuning (Wu et al., 2024): LoReFT, NoReFT and DiReFT, following AdapterHub 1.3.0
(``methods/reft.py``).

An intervention rewrites the hidden states a transformer layer outputs (the residual stream after
its last block: the sum, or the LayerNorm of the sum in a post-LN layer) at a few positions of each
example: the first ``prefix_positions`` and the last ``suffix_positions`` tokens. As AdapterHub, the
positions come from the attention mask: they start at its first 1 (``argmax``, so left padding is
skipped) and end at that offset plus the number of ones; without a mask, at 0 and at the sequence
length. Each position's state ``h`` becomes ``dropout(h + (act(W h + b) - R h) @ R)`` (``- R h`` only
with ``subtract_projection``); a unit for the prefix and one for the suffix, or one for both
(``tied_weights``). The positions are computed with tensor ops from the mask (gather / scatter with
index tensors), no Python branch on data, so the graph exports and compiles.

``orthogonality``: R (r x hidden) has orthonormal rows through torch's Householder parametrization
(``parametrizations.orthogonal``, the map AdapterHub gets for r < hidden) without its trivialization
``base``: the stored ``original`` gives R = householder(original) alone. AdapterHub keeps a random
(hidden x hidden) ``base`` buffer beside ``original``; its checkpoints are read by computing R as
torch does from both, then taking torch's own right inverse (QR) of R: the same R to rounding, and
only AdapterHub's parameters to count and save.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.fx import Node

from ..config import DiReftConfig, LoReftConfig, NoReftConfig, ReftConfig
from ..errors import CheckpointError, ConfigError, InputError, SiteError
from ..formats.common import AdapterHubCheckpoint, Converted, known_fields, layer_and_location, put
from ..naming import REFTS, state_key, weights_path
from ..placement import Placement, one_per_layer
from ..sites import Anatomy, Block
from .base import Activation, Emitter, Method, seeded

if TYPE_CHECKING:
    from ..module import AdaptedModule

aten = torch.ops.aten

MASK = "attention_mask"  # the graph input AdapterHub reads the positions from (as its forward_context does)


# -- the orthogonal projection -----------------------------------------------------------------


def householder(original: torch.Tensor) -> torch.Tensor:
    """torch's orthogonal parametrization with the Householder map (``_Orthogonal.forward``, no base):
    the matrix with orthonormal rows (or columns, when tall) that ``original`` stands for."""
    x = original
    transposed = x.shape[-2] < x.shape[-1]
    if transposed:
        x = x.mT
    a = x.tril(diagonal=-1)
    tau = 2.0 / (1.0 + (a * a).sum(dim=-2))
    q = torch.linalg.householder_product(a, tau)
    q = q * x.diagonal(dim1=-2, dim2=-1).int().unsqueeze(-2)  # the diagonal holds the signs
    return q.mT if transposed else q


@torch.no_grad()
def right_inverse(weight: torch.Tensor) -> torch.Tensor:
    """torch's ``_Orthogonal.right_inverse`` without a base: ``original`` with ``householder(original)``
    the orthonormalised ``weight`` (``weight`` itself when its rows are orthonormal)."""
    q = weight.mT if weight.shape[-2] < weight.shape[-1] else weight
    if q.is_meta:
        return torch.empty_like(weight)
    a, tau = torch.geqrf(q)
    a.diagonal(dim1=-2, dim2=-1).sign_()
    a.diagonal(dim1=-2, dim2=-1)[tau == 0.0] *= -1
    return a.mT if weight.shape[-2] < weight.shape[-1] else a


class Orthogonal(nn.Module):
    """Holds ``original``; called, gives the matrix with orthonormal rows (kept as AdapterHub's
    ``parametrizations.weight`` so that keys read alike). Computed in float32 at least (torch has no
    half-precision Householder product)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        wide = torch.promote_types(weight.dtype, torch.float32)
        self.original = nn.Parameter(right_inverse(weight.to(wide)).to(weight.dtype))

    def forward(self) -> torch.Tensor:
        wide = torch.promote_types(self.original.dtype, torch.float32)
        return householder(self.original.to(wide)).to(self.original.dtype)


class Projection(nn.Module):
    """R, (r, hidden): ``weight`` as it is, or through ``parametrizations.weight`` (orthogonal)."""

    def __init__(self, weight: torch.Tensor, orthogonal: bool):
        super().__init__()
        if orthogonal:
            self.parametrizations = nn.ModuleDict({"weight": Orthogonal(weight)})
        else:
            self.weight = nn.Parameter(weight)

    def matrix(self) -> torch.Tensor:
        return self.parametrizations["weight"]() if hasattr(self, "parametrizations") else self.weight


class ReftUnit(nn.Module):
    """AdapterHub's ``ReftUnit``: ``dropout(h + (act(learned_source(h)) - projection(h)) @ R)``."""

    def __init__(self, hidden: int, config: ReftConfig):
        super().__init__()
        self.learned_source = nn.Linear(hidden, config.r)
        self.projection = Projection(nn.Linear(hidden, config.r, bias=False).weight.detach(), config.orthogonality)
        self.subtract_projection = config.subtract_projection
        self.non_linearity = Activation(config.non_linearity) if config.non_linearity else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.projection.matrix()
        x = h.to(r.dtype)
        source = self.non_linearity(self.learned_source(x))
        if self.subtract_projection:
            source = source - x @ r.mT
        return self.dropout(x + source @ r).to(h.dtype)


class ReftModule(nn.Module):
    """One layer's interventions (AdapterHub's ``ReftModule``): ``units.0`` (prefix) and ``units.1``
    (suffix), or ``units.0`` alone with ``tied_weights``. ``forward(h, mask)`` gives the layer output
    with the selected positions rewritten."""

    label = "reft"  # in fxadapt.draw's pictures

    def __init__(self, block: Block, config: ReftConfig, like: torch.Tensor):
        super().__init__()
        self.prefix, self.suffix, self.tied = config.prefix_positions, config.suffix_positions, config.tied_weights
        self.config_name = type(config).__name__
        dtype = getattr(torch, config.dtype) if config.dtype else like.dtype
        with seeded(config.init_weights_seed, "reft", block.layer):
            self.units = nn.ModuleList(ReftUnit(block.hidden_size, config) for _ in range(1 if config.tied_weights else 2))
        self.to(device=like.device, dtype=dtype)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, hidden = h.shape
        if mask is None:
            first = torch.zeros(batch, dtype=torch.long, device=h.device)
            end = torch.full((batch,), length, dtype=torch.long, device=h.device)
        else:
            ones = mask == 1
            first = ones.to(torch.int32).argmax(1)  # AdapterHub's offsets: the first 1 of each row
            end = first + ones.sum(-1)  # offsets + seqlens
        parts = []
        if self.prefix:
            parts.append(("prefix_positions", first[:, None] + torch.arange(self.prefix, device=h.device)))
        if self.suffix:
            parts.append(("suffix_positions", end[:, None] + torch.arange(-self.suffix, 0, device=h.device)))
        if not (torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()):
            self._check(parts, length)
        index = [i[..., None].expand(-1, -1, hidden) for _, i in parts]
        states = [h.gather(1, i) for i in index]
        if self.tied:
            done = self.units[0](torch.cat(states, 1))
            states = list(done.split([i.shape[1] for i in index], 1))
        else:
            # units.0 is the prefix's, units.1 the suffix's (present even when that side is empty).
            units = [u for u, n in zip(self.units, (self.prefix, self.suffix)) if n]
            states = [u(s) for u, s in zip(units, states)]
        for i, s in zip(index, states):  # the prefix first, so the suffix wins where they overlap (as AdapterHub)
            h = h.scatter(1, i, s)
        return h

    def _check(self, parts: list[tuple[str, torch.Tensor]], length: int) -> None:
        """InputError naming the field whose positions fall outside an example (AdapterHub's gather fails there)."""
        for field, index in parts:
            bad = (index < 0) | (index >= length)
            if bad.any():
                row = int(bad.any(1).nonzero()[0, 0])
                raise InputError(f"{self.config_name}.{field}={index.shape[1]} reaches positions {index[row].tolist()} of example {row}, "
                                 f"outside its sequence of length {length} (attention_mask marks too few tokens, or the "
                                 f"sequence is shorter): pass longer sequences or lower {field}")


def insert_reft(e: Emitter, p: Placement, w: ReftModule) -> None:
    """The layer output ``h`` becomes ``reft(h, attention_mask)`` (the mask when the graph takes one)."""
    mask = _mask(e)
    e.y = e.module(p.module, e.y, *([mask] if mask is not None else []))


def _mask(e: Emitter) -> Node | None:
    for node in e.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if node.target == MASK and isinstance(val, torch.Tensor) and val.ndim == 2:
            return node
    return None
    return None


def _build(block: Block, config: ReftConfig, like: torch.Tensor) -> ReftModule:
    return ReftModule(block, config, like)


# -- where ---------------------------------------------------------------------------------


def _layer_module(layer: int, anatomy: Anatomy) -> str:
    """The module holding a layer: the longest common path of its sites' modules (AdapterHub's
    ``<layer>.reft_layer``), or "" when they share none."""
    paths = [s.path.split(".") for s in anatomy.sites if s.layer == layer]
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    whole = {tuple(p) for p in paths}
    return "" if len(common) == 0 or tuple(common) in whole else ".".join(common)


def place(name: str, config: ReftConfig, anatomy: Anatomy) -> list[Placement]:
    """One intervention per selected layer, on the output of the layer's last residual block."""
    blocks, model_name = anatomy.blocks, anatomy.model_name
    if not blocks:
        raise SiteError(f"{type(config).__name__} needs transformer layers (residual blocks); {model_name} has none")
    last: dict[int, Block] = {}
    for block in blocks:  # graph order: the layer's last block closes it
        last[block.layer] = block
    layers = sorted(last)
    if config.layers != "all":
        missing = sorted({i for i in config.layers if i not in last})
        if missing or not config.layers:
            raise ConfigError(f"{type(config).__name__}.layers={list(config.layers)} names {'layer(s) ' + str(missing) if missing else 'no layer'}"
                              f" that {model_name} does not have: it has layers {layers}", field="layers", value=config.layers)
        layers = sorted(set(config.layers))
    placements = []
    for layer in layers:
        block = last[layer]
        if config.orthogonality and config.r > block.hidden_size:
            raise ConfigError(f"{type(config).__name__}.r={config.r} is more than the hidden size {block.hidden_size}: "
                              "R cannot have that many orthonormal rows", field="r", value=config.r)
        # The layer output: the sum after the layer's last block, or its LayerNorm in a post-LN layer.
        output = block.norm[-1] if block.norm else block.add
        module = _layer_module(layer, anatomy)
        path = weights_path(REFTS, name, module, "" if module else f"layer{layer}")
        placements.append(Placement(name, "reft", block, path, config, anchor=output))
    return one_per_layer(placements)


# -- AdapterHub checkpoints ----------------------------------------------------------------

_ORIGINAL = "projection.parametrizations.weight.original"
_BASE = "projection.parametrizations.weight.0.base"


def _config_class(orthogonality: bool, subtract: bool) -> type[ReftConfig]:
    return {(True, True): LoReftConfig, (False, True): NoReftConfig, (False, False): DiReftConfig}.get((orthogonality, subtract), ReftConfig)


def _adapterhub_projection(original: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """R as AdapterHub computes it: torch's orthogonal parametrization (its default map) of
    ``original`` with ``base``, built by torch itself."""
    linear = nn.Linear(original.shape[1], original.shape[0], bias=False, dtype=original.dtype)
    with torch.random.fork_rng(devices=[]):
        nn.utils.parametrizations.orthogonal(linear, use_trivialization=base is not None)
    state = {"parametrizations.weight.original": original}
    if base is not None:
        state["parametrizations.weight.0.base"] = base
    linear.load_state_dict(state)
    with torch.no_grad():
        return linear.weight.detach().clone()


def read_adapterhub(gm: AdaptedModule, ckpt: AdapterHubCheckpoint) -> Converted:
    """AdapterHub ReFT: ``<layer>.reft_layer.refts.<name>.units.<i>.<param>`` by layer index. An
    orthogonal projection's ``original`` and ``base`` become R as torch computes it, then our
    ``original`` (torch's right inverse of R). AdapterHub's JSON has no ``subtract_projection`` (a
    class attribute): read as AdapterHub reads it back, True, unless the file says otherwise."""
    fields = known_fields(ReftConfig, ckpt.config)
    if "subtract_projection" not in ckpt.config and ckpt.config.get("orthogonality") is False:
        warnings.warn(f"{ckpt.config_path}: AdapterHub 1.3.0 does not save subtract_projection, so a NoReFT and a DiReFT checkpoint "
                      "look alike; read as AdapterHub's load_adapter reads it: subtract_projection=True (NoReFT). For a DiReFT "
                      'checkpoint add "subtract_projection": false to the config in adapter_config.json', stacklevel=4)
    orthogonality, subtract = fields.get("orthogonality"), fields.get("subtract_projection", True)
    config = ckpt.make_config(_config_class(orthogonality, subtract) if isinstance(orthogonality, bool) and isinstance(subtract, bool)
                              else ReftConfig, **fields)
    by_layer = {p.where.layer: p for p in ckpt.placements(place, gm, config)}
    tensors, sources, originals = {}, {}, {}
    marker = f".{REFTS}.{ckpt.name}."
    for key, tensor in ckpt.tensors.items():
        _, sep, param = f".{key}".partition(marker)
        layer = layer_and_location(key, REFTS)[0] if sep else None
        p = by_layer.get(layer)
        if p is None:
            put(tensors, sources, key, tensor, key, ckpt.weights_path)  # no such intervention: the load check names it
            continue
        ours = state_key(p.module, "adapter", param)
        if param.endswith(_ORIGINAL) or param.endswith(_BASE):
            unit = param.rpartition(_ORIGINAL if param.endswith(_ORIGINAL) else _BASE)[0]
            originals.setdefault((p.module, unit), {})["base" if param.endswith(_BASE) else "original"] = (key, tensor)
            continue
        put(tensors, sources, ours, tensor, key, ckpt.weights_path)
    for (module, unit), parts in originals.items():
        if "original" not in parts:
            key = parts["base"][0]
            raise CheckpointError(f"{ckpt.weights_path}: {key} has no {_ORIGINAL} beside it", path=ckpt.weights_path, tensor=key)
        key, original = parts["original"]
        base = parts.get("base", (None, None))[1]
        if original.ndim != 2 or base is not None and base.shape != (max(original.shape),) * 2:
            raise CheckpointError(f"{ckpt.weights_path}: {key} has shape {tuple(original.shape)} and its base "
                                  f"{None if base is None else tuple(base.shape)}: not an orthogonal parametrization",
                                  path=ckpt.weights_path, tensor=key)
        weight = _adapterhub_projection(original, base)
        wide = torch.promote_types(weight.dtype, torch.float32)
        put(tensors, sources, state_key(module, "adapter", unit + _ORIGINAL), right_inverse(weight.to(wide)).to(original.dtype), key,
            ckpt.weights_path)
    return Converted(ckpt.name, config, tensors, ckpt.weights_path, sources)


METHOD = Method("reft", "reft", _build, insert_reft, place, adapterhub=read_adapterhub, positionwise=False)
