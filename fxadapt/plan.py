"""The plan stage: which adapter goes where. :func:`plan` asks the config's method for its
placements on a model's :class:`~fxadapt.sites.Anatomy`; :func:`annotate` records them in the
``node.meta`` of the graph the insert stage rewrites (``META_KEY``), and nothing else carries
them there.
"""

from __future__ import annotations

from torch.fx import Graph

from .config import AdapterConfig, ConfigUnion
from .errors import ConfigError, SiteError
from .methods import METHODS
from .placement import Placement, check_layers
from .sites import Anatomy

__all__ = ["plan", "annotate", "META_KEY"]

#: The ``node.meta`` key under which a node's placements are recorded.
META_KEY = "fxadapt"


def plan(name: str, config: AdapterConfig, anatomy: Anatomy) -> list[Placement]:
    """The placements of adapter ``name`` with ``config`` on a model. Layers the config names
    (``leave_out``, per-layer ``reduction_factor``) must exist; the parts of a union must not put
    adapters at the same place (ConfigError naming the field or both parts)."""
    if isinstance(config, ConfigUnion):
        return _union_placements(name, config, anatomy)
    method = METHODS.get(config.method)
    if method is None or method.place is None:
        raise SiteError(f"{type(config).__name__} has no method in this version of fxadapt")
    check_layers(config, anatomy)
    placements = method.place(name, config, anatomy)
    if getattr(config, "modules_to_save", None):  # PEFT's per-adapter copies of whole modules, for any method
        placements += METHODS["saved_modules"].place(name, config, anatomy)
    return placements


def _union_placements(name: str, config: ConfigUnion, anatomy: Anatomy) -> list[Placement]:
    """Each part's placements; two parts at one place are refused. ConfigUnion checks the places it
    can see without a model; this catches the rest (targets, leave_out)."""
    placements: list[Placement] = []
    owner: dict[str, tuple[int, AdapterConfig]] = {}
    for i, part in enumerate(config.configs):
        mine = plan(name, part, anatomy)
        for p in mine:
            place = _place(p)
            # The same weights module, or one inside another (a whole fused projection and one of its roles).
            clash = next((o for q, o in owner.items() if q == place or q.startswith(place + ".") or place.startswith(q + ".")), None)
            if clash is not None:
                j, other = clash
                raise ConfigError(f"{type(config).__name__}: parts {j} ({type(other).__name__}) and {i} ({type(part).__name__}) both put an "
                                  f"adapter at {p.describe()} of {anatomy.model_name}; one place takes one adapter of an adapter name",
                                  field="configs", value=p.describe())
        owner.update((_place(p), (i, part)) for p in mine)
        placements += mine
    return placements


def _place(p: Placement) -> str:
    """Where a placement acts, for the overlap check: its weights' module, or the nodes it rewrites."""
    return p.module or "at " + ",".join(p.anchors)


def annotate(graph: Graph, placements: list[Placement]) -> None:
    """Record each placement in the meta of every node it rewrites."""
    by_name = {n.name: n for n in graph.nodes}
    for p in placements:
        for node_name in p.anchors:
            by_name[node_name].meta.setdefault(META_KEY, []).append(p)
