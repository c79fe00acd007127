"""Export a decoder LM for serving: its prompt and token steps with a KV cache, as ``.pt2`` programs.

``fxadapt.export(gm, directory)`` (a path without a suffix) on a module captured from a causal LM
writes, in one atomic step:

- ``prompt.pt2``: the step over two or more new positions, ``token.pt2``: the step over one; each
  ``(input_ids, attention_mask, keys, values) -> (logits, keys, values)`` (logits of the last position
  where the model can keep only those) with the module's adapters
  (unmerged adapters as graph nodes, merged ones in the weights), dropout removed;
- ``generation.json``: the cache layout (a ``(heads, head_dim)`` pair per layer, dtype), the longest
  sequence the programs take (``max_length``) and the model's pad / eos token ids.

The attention mask covers one masked slot before the sequence (keys and values of zeros that no
query attends to), then the sequence; ``keys`` / ``values`` are the whole past, that slot first.
Batch, prompt and past lengths are dynamic, up to ``max_length``. :func:`load_exported` reads the
directory back as an :class:`ExportedGenerator`, a greedy decoding loop over the two programs that
needs neither fxadapt's capture nor transformers.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch.fx import GraphModule

from .errors import ExportError, InputError
from .fsutil import atomic_directory
from .ops import copy_graph
from .passes.fuse import specialize_eval

__all__ = ["export_generation", "load_exported", "ExportedGenerator"]

_META = "generation.json"


def export_generation(gm, directory: str | os.PathLike, max_length: int | None = None) -> Path:
    """Write ``gm``'s prompt and token steps to ``directory`` (see the module docstring); returns
    the directory. ``max_length`` (default: the model's ``max_position_embeddings``) bounds the
    prompt and cache lengths the programs accept."""
    from .generation import _step_capture, step_modules

    setup = gm._composition()
    if setup is not None and setup.parallel_channels > 1:
        raise ExportError(f"{directory}: cannot export for serving under {setup!r}: the programs' greedy loop does not repeat the "
                          "prompts once per branch; export each branch active alone, or a BatchSplit over prompts given once per branch")
    step = _step_capture(gm)
    source = gm.__dict__["_fx_source"]
    config = source.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    max_length = max_length if max_length is not None else limit
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 3 or (limit and max_length > limit):
        raise ExportError(f"max_length must be an int from 3 to {limit or 'the model limit'} (the longest sequence the programs take), got {max_length!r}")
    modules = step_modules(gm)
    programs = {name: _export_step(gm, _eval_copy(module), step, max_length, seq) for name, module, seq in
                (("prompt", modules[0], 3), ("token", modules[1], 1))}
    generation = source.generation_config
    meta = {
        "format": "fxadapt-generation/1",
        "model": gm._fx_model_name,
        "layers": [list(layer) for layer in step.layers],
        "dtype": str(step.dtype).removeprefix("torch."),
        "max_length": max_length,
        "pad_token_id": generation.pad_token_id,
        "eos_token_id": generation.eos_token_id,
        "adapters": {"active": [str(a) for a in gm.active_adapters], "merged": gm.merged_adapters},
    }
    with atomic_directory(directory, error=ExportError) as tmp:
        for name, program in programs.items():
            torch.export.save(program, os.path.join(tmp, f"{name}.pt2"))
        with open(os.path.join(tmp, _META), "w") as f:
            json.dump(meta, f, indent=2)
    return Path(directory)


def _eval_copy(module) -> GraphModule:
    """A step graph (compiled or not) as a GraphModule without dropout, sharing the weights."""
    module = getattr(module, "_orig_mod", module)
    graph = copy_graph(module.step_graph)
    specialize_eval(graph)
    graph.lint()
    return GraphModule(module, graph, "Step").eval()


def _export_step(gm, module: GraphModule, step, max_length: int, seq: int) -> torch.export.ExportedProgram:
    dim = torch.export.Dim
    # The past holds the masked slot and at most max_length positions, less the prompt's new ones.
    batch, past = dim("batch", min=1, max=1024), dim("past", min=1, max=max_length if seq == 1 else max_length - 1)
    layers = step.layers
    keys = [torch.zeros(2, h, 4, d, dtype=step.dtype, device=_device(module)) for h, d in layers]
    mask = torch.ones(2, 4 + seq, dtype=torch.long, device=keys[0].device)
    mask[:, 0] = 0
    ids = torch.zeros(2, seq, dtype=torch.long, device=keys[0].device)
    shapes = {"input_ids": {0: batch, 1: dim("seq", min=2, max=max_length)} if seq > 1 else {0: batch},
              "attention_mask": {0: batch, 1: dim("total", min=3, max=max_length + 1) if seq > 1 else past + 1},
              "keys": [{0: batch, 2: past}] * len(layers), "values": [{0: batch, 2: past}] * len(layers)}
    from .generation import _size_oblivious

    try:
        with warnings.catch_warnings(), _size_oblivious():
            warnings.simplefilter("ignore")
            return torch.export.export(module, (ids, mask, keys, [k.clone() for k in keys]), dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch.export raises many types; all mean the same here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"torch.export could not export the {'token' if seq == 1 else 'prompt'} step of {gm._fx_model_name}: "
                          f"{type(e).__name__}: {first}") from e


def _device(module) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device


class ExportedGenerator:
    """The prompt and token programs of a directory written by :func:`export_generation`, with a
    greedy decoding loop. ``meta`` is its ``generation.json``."""

    def __init__(self, prompt, token, meta: dict):
        self.prompt, self.token, self.meta = prompt, token, meta

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding as transformers' ``generate(do_sample=False)``: the prompt (left-padded
        rows marked by ``attention_mask``) followed by ``max_new_tokens`` tokens; a row that has
        produced an eos token goes on with ``pad_token_id``. Defaults from ``generation.json``."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
            raise InputError(f"input_ids must be a (batch, length) integer tensor, got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
        batch, length = input_ids.shape
        limit = self.meta["max_length"]
        if length + max_new_tokens > limit:
            raise InputError(f"the prompt has {length} positions and {max_new_tokens} new tokens were asked for; "
                             f"the programs were exported for at most {limit} (max_length)")
        eos = self.meta["eos_token_id"] if eos_token_id is None else eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
        pad = self.meta["pad_token_id"] if pad_token_id is None else pad_token_id
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        dtype = getattr(torch, self.meta["dtype"])
        keys = [torch.zeros(batch, h, 1, d, dtype=dtype, device=input_ids.device) for h, d in self.meta["layers"]]
        values = [k.clone() for k in keys]
        slot = torch.zeros(batch, 1, dtype=mask.dtype, device=mask.device)
        sequence, new, done = input_ids, input_ids, torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            program = self.prompt if new.shape[1] > 1 else self.token
            logits, keys, values = program(new, torch.cat([slot, mask], 1), keys, values)
            token = logits[:, -1].argmax(-1)
            if pad is not None:
                token = torch.where(done, torch.full_like(token, pad), token)
            done = done | torch.isin(token, eos)
            new = token[:, None]
            sequence, mask = torch.cat([sequence, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
            if eos.numel() and bool(done.all()):
                break
        return sequence


def load_exported(directory: str | os.PathLike) -> ExportedGenerator:
    """Read a directory written by ``fxadapt.export(gm, directory)`` for a decoder (ExportError
    naming the file when one is missing or not fxadapt's)."""
    directory = Path(directory)
    try:
        with open(directory / _META) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{directory / _META}: not a generation export of fxadapt ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "fxadapt-generation/1":
        raise ExportError(f"{directory / _META}: not a generation export of fxadapt (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    programs = []
    for name in ("prompt", "token"):
        try:
            programs.append(torch.export.load(str(directory / f"{name}.pt2")).module())
        except Exception as e:  # a missing or damaged program
            raise ExportError(f"{directory / f'{name}.pt2'}: cannot load it ({type(e).__name__}: {e})") from None
    return ExportedGenerator(*programs, meta)
