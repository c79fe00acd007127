"""Resolve a config against a model's sites: which adapter goes where (the annotate step).

A :class:`Placement` is one adapter at one site. The insert passes read placements from
``node.meta["fxadapt"]``, where :func:`annotate` writes them, and nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch.fx import Graph

from .config import MAX_SIZE, AdapterConfig, BnConfig, ConfigUnion, LoRAConfig, PrefixTuningConfig
from .errors import ConfigError, SiteError
from .sites import Attention, Block, Linear, Site

__all__ = ["Placement", "plan", "annotate"]

META_KEY = "fxadapt"


@dataclass(frozen=True)
class Placement:
    """One adapter at one place: the insert pass (``method``), the Site (projection) or Block
    (residual block) it works on, and where its weights live on the graph module (``module``).
    ``side`` is where (IA)^3 scales: the projection's output or input. ``anchor`` names the node
    the pass rewrites when it is not the site's projection; ``shared`` lists module paths of
    weights the adapter shares across places (Compacter's PHM rule, the prefix generator)."""

    adapter: str
    method: str
    site: Site | None
    module: str | None
    side: str = "output"
    block: Block | None = None
    anchor: str | None = None
    config: AdapterConfig | None = None
    shared: tuple[str, ...] = ()
    attention: Attention | None = None
    layers: int | None = None  # how many layers an adapter's shared weights serve (prefix tuning)
    slot: int | None = None  # this placement's place among them

    @property
    def anchors(self) -> tuple[str, ...]:
        """The nodes this placement rewrites."""
        if self.anchor is not None:
            return (self.anchor,)
        if self.site is not None:
            return self.site.linear.nodes
        return (self.block.output,) if self.block is not None else (self.attention.node,)

    @property
    def where(self) -> Site | Block | Attention:
        """The Site, Block or Attention the placement works on."""
        return self.site or self.block or self.attention


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def module_path(name: str, site: Site) -> str:
    """Attribute path of LoRA / (IA)^3 weights at a site: ``<module path>.loras.<name>[.<role>]``
    (AdapterHub's container names: ``loras`` here, ``adapters`` for bottleneck adapters)."""
    return _join(site.path, "loras", name, site.role if site.columns is not None else "")


def plan(name: str, config: AdapterConfig, sites: list[Site], linears: dict[str, Linear], model_name: str = "model",
         blocks: list[Block] = (), attentions: list[Attention] = ()) -> list[Placement]:
    """The placements of adapter ``name`` with ``config`` on a model with these sites, blocks and attentions.
    Layers the config names (``leave_out``, per-layer ``reduction_factor``) must exist; the parts of a
    union must not put adapters at the same place (ConfigError naming the field or both parts)."""
    if isinstance(config, ConfigUnion):
        return _union_placements(name, config, sites, linears, model_name, blocks, attentions)
    _check_layers(config, sites, blocks, attentions, model_name)
    if isinstance(config, BnConfig):
        return _bottleneck_placements(name, config, blocks, model_name)
    if isinstance(config, PrefixTuningConfig):
        return _prefix_placements(name, config, attentions, model_name)
    if isinstance(config, LoRAConfig):
        if config.use_gating and config.composition_mode == "scale":
            raise ConfigError(f"{type(config).__name__}.use_gating=True: (IA)^3 cannot gate", field="use_gating", value=True)
        chosen = _lora_sites(config, sites, linears, model_name)
        # (IA)^3 scales the input of the linears named by input_scaling_targets, the output elsewhere.
        return [Placement(name, config.method, s, module_path(name, s), "input" if config.matches_input_scaling(s.path) else "output",
                          config=config)
                for s in chosen]
    raise SiteError(f"{type(config).__name__} has no insert pass in this version of fxadapt")


def _union_placements(name: str, config: ConfigUnion, sites: list[Site], linears: dict[str, Linear], model_name: str,
                      blocks: list[Block], attentions: list[Attention]) -> list[Placement]:
    """Each part's placements; two parts at one place are refused. ConfigUnion checks the places it
    can see without a model; this catches the rest (targets, leave_out)."""
    placements: list[Placement] = []
    owner: dict[str, tuple[int, AdapterConfig]] = {}
    for i, part in enumerate(config.configs):
        mine = plan(name, part, sites, linears, model_name, blocks, attentions)
        for p in mine:
            place = _place(p)
            # The same weights module, or one inside another (a whole fused projection and one of its roles).
            clash = next((o for q, o in owner.items() if q == place or q.startswith(place + ".") or place.startswith(q + ".")), None)
            if clash is not None:
                j, other = clash
                raise ConfigError(f"{type(config).__name__}: parts {j} ({type(other).__name__}) and {i} ({type(part).__name__}) both put an "
                                  f"adapter at {_where(p)} of {model_name}; one place takes one adapter of an adapter name",
                                  field="configs", value=_where(p))
        owner.update((_place(p), (i, part)) for p in mine)
        placements += mine
    return placements


def _place(p: Placement) -> str:
    """Where a placement's weights live; for a prefix, the attention it extends (an ungated prefix has no module of its own)."""
    return f"prefix at {p.attention.node}" if p.method == "prefix" else p.module


def _where(p: Placement) -> str:
    """A placement's place in words, for error messages."""
    w = p.where
    if p.method == "prefix":
        return f"the attention of layer {w.layer}"
    if p.site is not None:
        return w.path + (f" ({w.role})" if w.role else "")
    return "the embedding output" if p.method == "invertible" else f"the {w.location} block of layer {w.layer}"


def _check_layers(config: AdapterConfig, sites: list[Site], blocks: list[Block], attentions: list[Attention], model_name: str) -> None:
    """leave_out and per-layer reduction_factor keys must name layers the model has."""
    known = [x.layer for x in (*sites, *blocks, *attentions) if x.layer is not None]
    count = max(known) + 1 if known else 0
    has = f"it has {count} layers (0..{count - 1})" if count else "it has no numbered layers"
    named = {"leave_out": list(config.leave_out)}
    if isinstance(config, BnConfig) and isinstance(config.reduction_factor, dict):
        named["reduction_factor"] = [int(k) for k in config.reduction_factor if k != "default"]
    for field, layers in named.items():
        bad = sorted({i for i in layers if i >= count})
        if bad:
            raise ConfigError(f"{type(config).__name__}.{field} names layer(s) {bad} that {model_name} does not have: {has}",
                              field=field, value=bad)


def annotate(graph: Graph, placements: list[Placement]) -> None:
    """Write each placement into the meta of every node that reads its site's weight."""
    by_name = {n.name: n for n in graph.nodes}
    for p in placements:
        for node_name in p.anchors:
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
    for field, matches in (("targets", config.matches_target), ("input_scaling_targets", config.matches_input_scaling)):
        if getattr(config, field) is None:
            continue
        matched = [lin for lin in linears.values() if matches(lin.path)]
        if not matched:
            raise SiteError(
                f"{field}={getattr(config, field)!r} matches no linear of {model_name}; its linears: "
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


# Where AdapterHub keeps the PHM rule an adapter shares across layers.
SHARED = "shared_parameters"


def _bottleneck_placements(name: str, config: BnConfig, blocks: list[Block], model_name: str) -> list[Placement]:
    """One adapter per selected residual block, and the invertible adapter on the embedding output."""
    if not blocks:
        raise SiteError(f"{type(config).__name__} needs residual blocks after attention / feed-forward projections; {model_name} has none")
    wanted = {"mh": config.mh_adapter, "output": config.output_adapter}
    shared = (f"{SHARED}.{name}",) if config.phm_layer and (config.shared_phm_rule or config.shared_W_phm) else ()
    placements = []
    for block in blocks:
        if not wanted[block.location] or block.layer in config.leave_out:
            continue
        _check_sizes(config, block)
        # The adapter's weights live under the projection that closes its block.
        placements.append(Placement(name, "bottleneck", None, _join(block.path, "adapters", name), block=block, config=config, shared=shared))
    if config.inv_adapter:
        # The first block's residual input is the embedding output.
        first = blocks[0]
        _check_invertible_sizes(config, first.hidden_size)
        placements.append(Placement(name, "invertible", None, _join("invertible_adapters", name), block=first, config=config,
                                    anchor=first.residual))
    if not placements:
        raise SiteError(f"{type(config).__name__} selects no block of {model_name} (leave_out={list(config.leave_out)})")
    return _per_layer_where_shared(placements)


def _check_sizes(config: BnConfig, block: Block) -> None:
    hidden, factor = block.hidden_size, config.factor(block.layer)
    down = hidden / factor
    # Compared before int(): a tiny factor makes the quotient inf.
    if not down <= MAX_SIZE:
        raise ConfigError(f"{type(config).__name__}.reduction_factor={factor} makes a bottleneck of {down:.3g} on the hidden size {hidden} "
                          f"(layer {block.layer}), more than 2**31", field="reduction_factor", value=factor)
    if down != int(down) or down < 1:
        raise ConfigError(f"{type(config).__name__}.reduction_factor={factor} does not divide the hidden size {hidden} (layer {block.layer})",
                          field="reduction_factor", value=factor)
    if config.phm_layer and (hidden % config.phm_dim or int(down) % config.phm_dim):
        raise ConfigError(f"{type(config).__name__}.phm_dim={config.phm_dim} must divide the hidden size {hidden} and the bottleneck size {int(down)}",
                          field="phm_dim", value=config.phm_dim)


def _check_invertible_sizes(config: BnConfig, hidden: int) -> None:
    """The NICE block's two subnets map hidden // 2 (and the rest) to ``n // inv_adapter_reduction_factor``."""
    factor = config.inv_adapter_reduction_factor
    sizes = [n // factor for n in (hidden // 2, hidden - hidden // 2)]
    if not all(1 <= s <= MAX_SIZE for s in sizes):
        raise ConfigError(f"{type(config).__name__}.inv_adapter_reduction_factor={factor} gives the invertible adapter inner sizes "
                          f"{sizes} on the hidden size {hidden}: each must be in [1, 2**31]", field="inv_adapter_reduction_factor", value=factor)


def _prefix_placements(name: str, config: PrefixTuningConfig, attentions: list[Attention], model_name: str) -> list[Placement]:
    """One placement per self-attention; one prefix generator shared by all of them."""
    own = [a for a in attentions if not a.cross]
    if not own:
        raise SiteError(f"{type(config).__name__} needs attention with projected keys and values; {model_name} has none")
    own = [a for a in own if a.layer not in config.leave_out]
    generator = _join("prefix_tunings", name)
    placements = []
    # The generator holds one slot per adapted layer, in layer order (AdapterHub's prefix ids).
    for slot, att in enumerate(own):
        # Gates live by the attention's projections, as AdapterHub's prefix_gates.
        parent = att.weight.rpartition(".")[0].rpartition(".")[0]
        gate = _join(parent, "prefix_gates", name) if config.use_gating else None
        placements.append(Placement(name, "prefix", None, gate, attention=att, config=config, shared=(generator,),
                                    layers=len(own), slot=slot))
    if not placements:
        raise SiteError(f"{type(config).__name__} selects no attention of {model_name} (leave_out={list(config.leave_out)})")
    return _per_layer_where_shared(placements)


def _per_layer_where_shared(placements: list[Placement]) -> list[Placement]:
    """Layers that share their modules (ALBERT) still get one adapter each: ``<path>.layer<i>``."""
    counts: dict[str | None, int] = {}
    for p in placements:
        counts[p.module] = counts.get(p.module, 0) + 1
    return [dataclasses.replace(p, module=f"{p.module}.layer{p.where.layer}") if p.module and counts[p.module] > 1 else p
            for p in placements]


def gate_location(p: Placement) -> str:
    """AdapterHub's name for where a gate sits: selfattn_lora, mh_adapter, output_adapter, self_prefix."""
    if p.method == "prefix":
        return "self_prefix"
    if p.method == "bottleneck":
        return f"{p.block.location}_adapter"
    role = p.site.role if p.site is not None else None
    return {"ffn_in": "intermediate_lora", "ffn_out": "output_lora"}.get(role, "selfattn_lora")
