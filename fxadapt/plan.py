"""Resolve a config against a model's sites: which adapter goes where (the annotate step).

A :class:`Placement` is one adapter at one site. The insert passes read placements from
``node.meta["fxadapt"]``, where :func:`annotate` writes them, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Graph

from .config import AdapterConfig, LoRAConfig
from .errors import ConfigError, SiteError
from .sites import Linear, Site

__all__ = ["Placement", "plan", "annotate"]

META_KEY = "fxadapt"


@dataclass(frozen=True)
class Placement:
    """One adapter at one site: the insert pass (``method``), the site, and where its weights live
    on the graph module (``module``). ``side`` is where (IA)^3 scales: the projection's output or input."""

    adapter: str
    method: str
    site: Site
    module: str
    side: str = "output"


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def module_path(name: str, site: Site) -> str:
    """Attribute path of an adapter's weights at a site: ``<module path>.adapters.<name>[.<role>]``."""
    return _join(site.path, "adapters", name, site.role if site.columns is not None else "")


def plan(name: str, config: AdapterConfig, sites: list[Site], linears: dict[str, Linear], model_name: str = "model") -> list[Placement]:
    """The placements of adapter ``name`` with ``config`` on a model with these sites."""
    if isinstance(config, LoRAConfig):
        if config.use_gating:
            raise ConfigError(f"{type(config).__name__}.use_gating=True: gated LoRA (UniPELT) is not available in this version", field="use_gating", value=True)
        chosen = _lora_sites(config, sites, linears, model_name)
        return [Placement(name, config.method, s, module_path(name, s)) for s in chosen]
    raise SiteError(f"{type(config).__name__} has no insert pass in this version of fxadapt")


def annotate(graph: Graph, placements: list[Placement]) -> None:
    """Write each placement into the meta of every node that reads its site's weight."""
    by_name = {n.name: n for n in graph.nodes}
    for p in placements:
        for node_name in p.site.linear.nodes:
            by_name[node_name].meta.setdefault(META_KEY, []).append(p)


def _lora_sites(config: LoRAConfig, sites: list[Site], linears: dict[str, Linear], model_name: str) -> list[Site]:
    roles: set[str] = set()
    if config.selfattn_lora:
        roles |= set(config.attn_matrices) | {"cross_" + m for m in config.attn_matrices}
    if config.intermediate_lora:
        roles.add("ffn_in")
    if config.output_lora:
        roles.add("ffn_out")
    present = {s.role for s in sites} | {letter for s in sites if s.role and _fused_unknown(s) for letter in s.role}
    missing = sorted(r for r in roles if r not in present and not r.startswith("cross_"))
    if missing:
        raise SiteError(
            f"{type(config).__name__} asks for role(s) {missing} but {model_name} has none; "
            f"its sites: {_describe(sites)}. Use targets= to pick linears by module path."
        )

    def wanted(site: Site) -> bool:
        if site.layer is not None and site.layer in config.leave_out:
            return False
        if _fused_unknown(site):
            return any(letter in roles for letter in site.role)
        return site.role in roles

    chosen = [s for s in sites if wanted(s)]
    if config.targets is not None:
        matched = [lin for lin in linears.values() if config.matches_target(lin.path)]
        if not matched:
            raise SiteError(
                f"targets={config.targets!r} matches no linear of {model_name}; its linears: "
                + ", ".join(sorted(linears)[:40])
            )
        by_weight = {s.weight: s for s in sites if s.columns is None}
        for lin in matched:
            site = by_weight.get(lin.weight) or Site(_layer_of(lin, sites), None, lin.path, lin.in_features, lin.out_features, lin)
            if site.layer is not None and site.layer in config.leave_out:
                continue
            # A whole-linear target replaces per-role parts of the same fused projection.
            chosen = [s for s in chosen if s.weight != lin.weight] + [site]
    if not chosen:
        raise SiteError(f"{type(config).__name__} selects no site of {model_name} (leave_out={list(config.leave_out)}); its sites: {_describe(sites)}")
    return chosen


def _fused_unknown(site: Site) -> bool:
    # A projection feeding several attention operands through a layout we could not follow.
    return site.role is not None and len(site.role) > 1 and set(site.role) <= {"q", "k", "v"}


def _layer_of(lin: Linear, sites: list[Site]) -> int | None:
    return next((s.layer for s in sites if s.weight == lin.weight), None)


def _describe(sites: list[Site]) -> str:
    if not sites:
        return "none found"
    roles = sorted({s.role for s in sites if s.role})
    layers = sorted({s.layer for s in sites if s.layer is not None})
    return f"roles {roles} in layers {layers[0]}..{layers[-1]}" if layers else f"roles {roles}"
