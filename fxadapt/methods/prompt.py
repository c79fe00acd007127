"""Prompt tuning (Lester et al., 2021), following AdapterHub 1.3.0 (``methods/prompt_tuning.py``).

``prompt_length`` learned embeddings are put before the embedding output: the value the first layer
reads, after positions, the embeddings' LayerNorm and dropout (AdapterHub hooks the output of the
whole embeddings module; an invertible adapter there acts first). Every position attends to the
prompt, and the model's outputs include the prompt's positions (AdapterHub's heads skip them).

On the graph that takes three rewrites, found by dataflow with no model names:

- the embedding output (the first residual block's input) becomes ``cat(prompt, embeddings)``;
- every mask input (a ``(batch, seq)`` graph input the embeddings do not read) gets ``prompt_length``
  ones in front, so that every mask the model builds from it covers the prompt (AdapterHub extends
  each layer's mask by as many visible columns);
- every use of the sequence length after the embedding stage (views, the mask builder's ranges,
  rotary positions) reads ``seq + prompt_length``: the capture shares one symbol for the length of
  every input and activation, and only what computes the embeddings keeps the inputs' length.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.fx import Node
from torch.fx.node import map_arg

from ..config import PromptTuningConfig
from ..errors import ConfigError, SiteError
from ..formats.common import AdapterHubCheckpoint, Converted, known_fields, put
from ..ops import op_name
from ..naming import PROMPT_TUNINGS, weights_path
from ..placement import Placement
from ..sites import Anatomy, Block
from .base import Emitter, Method, seeded

if TYPE_CHECKING:
    from ..module import AdaptedModule

aten = torch.ops.aten


class PromptTuning(nn.Module):
    """AdapterHub's ``PromptTuning``: ``prompt_embedding`` holds the prompt, ``(prompt_length, hidden)``."""

    label = "prompt"  # in fxadapt.draw's pictures

    def __init__(self, config: PromptTuningConfig, hidden: int):
        super().__init__()
        self.prompt_embedding = nn.Embedding(config.prompt_length, hidden)

    def forward(self) -> torch.Tensor:
        return self.prompt_embedding.weight


def init_ids(config: PromptTuningConfig) -> list[int]:
    """AdapterHub's ``from_string`` rows: the text's token ids repeated up to ``prompt_length``, then cut."""
    ids = list(config.prompt_init_ids)
    return (ids * -(-config.prompt_length // len(ids)))[: config.prompt_length]


def build(block: Block, config: PromptTuningConfig, like: torch.Tensor) -> PromptTuning:
    """The prompt, U(-scale, scale) or (``from_string``) rows of the word embeddings, which ``like`` is then
    (``place`` points the placement's weight at them; on the meta device it is an empty stand-in)."""
    with seeded(config.init_weights_seed, "prompt"), torch.no_grad():
        prompt = PromptTuning(config, block.hidden_size)
        if config.prompt_init == "random_uniform":
            prompt.prompt_embedding.weight.uniform_(-config.random_uniform_scale, config.random_uniform_scale)
        elif like.ndim == 2:
            vocab, width = like.shape
            bad = [i for i in config.prompt_init_ids if i >= vocab]
            if bad:
                raise ConfigError(f"PromptTuningConfig.prompt_init_ids has ids {bad[:5]} beyond the word embeddings' {vocab} rows",
                                  field="prompt_init_ids", value=bad)
            if width != block.hidden_size:
                raise SiteError(f'prompt_init="from_string": the word embeddings are {width} wide, the embedding output '
                                f"{block.hidden_size}; initialise at random")
            prompt.prompt_embedding.weight.copy_(like[init_ids(config)])
    return prompt.to(device=like.device, dtype=like.dtype)


# -- where ---------------------------------------------------------------------------------


def place(name: str, config: PromptTuningConfig, anatomy: Anatomy) -> list[Placement]:
    """One placement at the embedding output: the residual input of the first block."""
    if not anatomy.blocks:
        raise SiteError(f"PromptTuningConfig needs the embedding output that a first transformer layer reads (the residual input "
                        f"of its first block); {anatomy.model_name} has no residual blocks")
    first = anatomy.blocks[0]
    where = first
    if config.prompt_init == "from_string":
        if not anatomy.embeddings:
            raise ConfigError(f'PromptTuningConfig.prompt_init="from_string" needs word embeddings that a graph input indexes; '
                              f"{anatomy.model_name}'s embedding output reads none", field="prompt_init", value=config.prompt_init)
        # The weights are built "like" the word embeddings: from their rows (and on their device, in their dtype).
        where = dataclasses.replace(first, weight=anatomy.embeddings[0])
    return [Placement(name, "prompt", where, weights_path(PROMPT_TUNINGS, name), config, anchor=first.residual)]


# -- the rewrite ---------------------------------------------------------------------------


def insert(e: Emitter, p: Placement, w: PromptTuning) -> None:
    emb, config, length = e.node, p.config, p.config.prompt_length
    val = emb.meta.get("val")
    seq = val.shape[1] if isinstance(val, torch.Tensor) and val.ndim == 3 else None
    if not isinstance(seq, torch.SymInt):
        raise SiteError(f"prompt tuning needs a dynamic sequence dimension at the embedding output ({emb.name}), to make it "
                        f"{length} longer; this capture has {'shape ' + str(tuple(val.shape)) if isinstance(val, torch.Tensor) else 'no shapes'}")
    before = _ancestors(emb)  # the embedding stage: it keeps the inputs' length

    # The prompt, batched, before (or after the first position of) the embedding output as rewritten so
    # far (after an invertible adapter, as AdapterHub's order when that one is activated first).
    x = e.y
    prompt = e.call(aten.unsqueeze.default, e.module(p.module), 0)
    prompt = e.call(aten.expand.default, prompt, [e.call(aten.sym_size.int, x, 0), -1, -1])
    if config.combine == "prefix":
        e.y = e.call(aten.cat.default, [prompt, x], 1)
    else:  # prefix_after_bos
        head, tail = e.call(aten.slice.Tensor, x, 1, 0, 1), e.call(aten.slice.Tensor, x, 1, 1)
        e.y = e.call(aten.cat.default, [head, prompt, tail], 1)

    # Masks: graph inputs over the sequence that the embedding stage does not read get ones for the prompt.
    extended = [_extend_mask(e, m, readers, length, config.combine) for m, readers in _mask_inputs(e.graph, before, seq).items()]
    after = _descendants([emb, *extended])

    # Every later use of the sequence length reads seq + prompt_length.
    shifted: dict[Node, Node] = {}

    def shift(n: Node) -> Node:
        v = n.meta.get("val")
        if n in after or not isinstance(v, torch.SymInt) or not _uses(v, seq):
            return n  # not a length, or already the longer one (a size of an extended tensor)
        if n not in shifted:
            if str(v) == str(seq):
                e.point = n.next
                shifted[n] = e.pre(operator.add, n, length)
            elif n in before:  # a size the embedding stage uses too: a copy for the rest
                args = map_arg(n.args, shift)
                e.point = n.next
                shifted[n] = e.pre(n.target, *args, **n.kwargs)
            else:
                shifted[n] = n  # rewritten in place below
        return shifted[n]

    for node in list(e.graph.nodes):
        if node in before or node in e._created or node.op not in ("call_function", "call_method"):
            continue
        v = node.meta.get("val")
        if isinstance(v, torch.SymInt) and str(v) == str(seq):
            continue  # the length itself: shift() adds to it
        node.args, node.kwargs = map_arg(node.args, shift), map_arg(node.kwargs, shift)
    e.point = None


def _uses(value: torch.SymInt, seq: torch.SymInt) -> bool:
    """Whether a symbolic size is computed from the sequence length."""
    return bool(seq.node.expr.free_symbols & value.node.expr.free_symbols)


# Ops that read only a tensor's metadata (sizes, dtype), not its values.
_METADATA = frozenset({"sym_size", "sym_numel", "sym_stride", "_assert_tensor_metadata"})


def _mask_inputs(graph, before: set[Node], seq: torch.SymInt) -> dict[Node, list[Node]]:
    """Graph inputs of shape (batch, seq) whose values are read after the embedding stage (attention
    masks; the embedding stage may read them too, as DeBERTa's does), with those readers."""
    found = {}
    for n in graph.nodes:
        v = n.meta.get("val")
        if n.op == "placeholder" and isinstance(v, torch.Tensor) and v.ndim == 2 and str(v.shape[1]) == str(seq):
            readers = [u for u in n.users if u.op == "call_function" and u not in before and op_name(u) not in _METADATA]
            if readers:
                found[n] = readers
    return found


def _extend_mask(e: Emitter, mask: Node, readers: list[Node], length: int, combine: str) -> Node:
    """``cat(ones, mask)`` for the mask's readers after the embedding stage."""
    e.point = next(n for n in e.graph.nodes if n in readers)  # the first reader
    ones = e.pre(aten.new_ones.default, mask, [e.pre(aten.sym_size.int, mask, 0), length])
    if combine == "prefix":
        extended = e.pre(aten.cat.default, [ones, mask], 1)
    else:  # the mask follows the positions: the first one, the prompt, the rest
        extended = e.pre(aten.cat.default, [e.pre(aten.slice.Tensor, mask, 1, 0, 1), ones, e.pre(aten.slice.Tensor, mask, 1, 1)], 1)
    for reader in readers:
        reader.replace_input_with(mask, extended)
    e.point = None
    return extended


def _ancestors(node: Node) -> set[Node]:
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen | {node}


def _descendants(nodes: list[Node]) -> set[Node]:
    seen, stack = set(nodes), list(nodes)
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


# -- AdapterHub checkpoints ----------------------------------------------------------------


def read_adapterhub(gm: AdaptedModule, ckpt: AdapterHubCheckpoint) -> Converted:
    """AdapterHub prompt tuning: ``prompt_tuning.prompt_tunings.<name>.prompt_embedding.weight``."""
    fields = known_fields(PromptTuningConfig, ckpt.config)
    if fields.get("prompt_init") == "from_string" and fields.get("prompt_init_ids") is None:
        fields["prompt_init"] = "random_uniform"  # the file's prompt replaces the initialisation (fxadapt does not tokenize)
    config = ckpt.make_config(PromptTuningConfig, **fields)
    tensors, sources = {}, {}
    for key, tensor in ckpt.tensors.items():
        _, sep, param = key.partition(f"{PROMPT_TUNINGS}.{ckpt.name}.")
        put(tensors, sources, f"{PROMPT_TUNINGS}.{param}" if sep else key, tensor, key, ckpt.weights_path)
    return Converted(ckpt.name, config, tensors, ckpt.weights_path, sources)


METHOD = Method("prompt", "prompt_tuning", build, insert, place, exclusive=True, adapterhub=read_adapterhub, positionwise=False)
