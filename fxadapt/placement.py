"""Placements: one adapter at one place of a model, and the small library of placement rules the
methods share (layers named by a config, layers that share their modules, sites described in
error messages). A method's own rule (which places it takes) lives in its file under
``fxadapt/methods``.

Placements hold Sites, Blocks and Attentions found in the *pristine* captured graph, and those
refer to nodes by name. Every rebuild copies that graph with its node names kept
(``ops.copy_graph``), so the names stay valid for the module's lifetime.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import AdapterConfig, BnConfig
from .errors import ConfigError
from .sites import Anatomy, Attention, Block, Site

__all__ = ["Placement", "check_layers", "one_per_layer", "describe_sites"]


@dataclass(frozen=True)
class Placement:
    """One adapter at one place: the method (a key of ``fxadapt.methods.METHODS``), where it works
    (``where``: a Site, i.e. a projection; a Block, i.e. a residual block; or an Attention), and
    the module path of its weights (``module``, None for a placement with no weights of its own).
    ``side`` is where (IA)^3 scales: the projection's output or input. ``anchor`` names the node
    the method rewrites when it is not the place's own; ``shared`` lists module paths of weights
    the adapter shares across places (Compacter's PHM rule, the prefix generator), ``layers`` and
    ``slot`` how many places share them and which one this is."""

    adapter: str
    method: str
    where: Site | Block | Attention
    module: str | None
    config: AdapterConfig
    side: str = "output"
    anchor: str | None = None
    shared: tuple[str, ...] = ()
    layers: int | None = None
    slot: int | None = None

    @property
    def site(self) -> Site | None:
        return self.where if isinstance(self.where, Site) else None

    @property
    def block(self) -> Block | None:
        return self.where if isinstance(self.where, Block) else None

    @property
    def attention(self) -> Attention | None:
        return self.where if isinstance(self.where, Attention) else None

    @property
    def anchors(self) -> tuple[str, ...]:
        """The nodes this placement rewrites."""
        if self.anchor is not None:
            return (self.anchor,)
        if isinstance(self.where, Site):
            return self.where.linear.nodes
        return (self.where.output,) if isinstance(self.where, Block) else (self.where.node,)

    def describe(self) -> str:
        """The place in words, for error messages."""
        w = self.where
        if isinstance(w, Site):
            return w.path + (f" ({w.role})" if w.role else "")
        if isinstance(w, Attention):
            return f"the attention of layer {w.layer}"
        return "the embedding output" if self.anchor == w.residual else f"the {w.location} block of layer {w.layer}"


def check_layers(config: AdapterConfig, anatomy: Anatomy) -> None:
    """``leave_out`` and per-layer ``reduction_factor`` keys must name layers the model has."""
    known = [x.layer for x in (*anatomy.sites, *anatomy.blocks, *anatomy.attentions) if x.layer is not None]
    count = max(known) + 1 if known else 0
    has = f"it has {count} layers (0..{count - 1})" if count else "it has no numbered layers"
    named = {"leave_out": list(getattr(config, "leave_out", ()))}
    if isinstance(config, BnConfig) and isinstance(config.reduction_factor, dict):
        named["reduction_factor"] = [int(k) for k in config.reduction_factor if k != "default"]
    for field, layers in named.items():
        bad = sorted({i for i in layers if i >= count})
        if bad:
            raise ConfigError(f"{type(config).__name__}.{field} names layer(s) {bad} that {anatomy.model_name} does not have: {has}",
                              field=field, value=bad)


def one_per_layer(placements: list[Placement]) -> list[Placement]:
    """Layers that share their modules (ALBERT) still get one adapter each: ``<path>.layer<i>``."""
    counts: dict[str | None, int] = {}
    for p in placements:
        counts[p.module] = counts.get(p.module, 0) + 1
    return [dataclasses.replace(p, module=f"{p.module}.layer{p.where.layer}") if p.module and counts[p.module] > 1 else p
            for p in placements]


def describe_sites(sites: list[Site]) -> str:
    """The roles and layers of these sites, for error messages."""
    if not sites:
        return "none found"
    roles = sorted({s.role for s in sites if s.role})
    layers = sorted({s.layer for s in sites if s.layer is not None})
    return f"roles {roles} in layers {layers[0]}..{layers[-1]}" if layers else f"roles {roles}"
