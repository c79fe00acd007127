"""Write an adapted (or merged) model for deployment: a ``.pt2`` ExportedProgram or an ``.onnx`` file.

What is written computes what the module computes in ``.eval()``: every dropout is removed from the
graph first (:func:`fxadapt.passes.fuse.specialize_eval`). Unmerged adapters are written as graph
nodes; merge them first (``gm.merge_adapter``) to write the base graph with folded weights. Every
dimension that the capture left dynamic (batch, sequence) stays dynamic.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from .errors import ExportError
from .module import AdaptedModule
from .ops import copy_graph
from .passes.fuse import specialize_eval

__all__ = ["export", "export_program", "eval_graph_module"]

SUFFIXES = (".pt2", ".onnx")


def eval_graph_module(gm: AdaptedModule) -> GraphModule:
    """A plain GraphModule of ``gm``'s current graph with eval-mode dropout (none at all). It takes
    the graph's inputs (all of them, by name), shares ``gm``'s weights and returns the same output."""
    graph = copy_graph(gm.graph)
    specialize_eval(graph)
    graph.lint()
    out = GraphModule(gm, graph, f"{gm._fx_model_name}Eval")
    return out.eval()


def _example(gm: AdaptedModule, example_inputs, example_kwargs) -> dict[str, Any] | tuple:
    if example_inputs is None and example_kwargs is None:
        stored = getattr(gm, "_fx_example", None)
        if stored is None:
            raise ExportError(
                f"{gm._fx_model_name} was captured without example inputs (symbolic_trace): "
                "pass example_inputs=(...) or example_kwargs={...} to export it"
            )
        example_inputs, example_kwargs = stored
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs or ())
    kwargs = dict(example_kwargs or {})
    if gm._fx_inputs is None:
        return args
    return gm._fx_inputs.bind(gm._fx_model_name, args, kwargs)


def export_program(gm: AdaptedModule, example_inputs: Any = None, example_kwargs: dict | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of ``gm`` in eval mode, with every tensor dimension dynamic unless the
    graph fixes it. Without example inputs, those the capture used are taken."""
    if not isinstance(gm, AdaptedModule):
        raise ExportError(f"fxadapt.export takes an AdaptedModule (from fxadapt.capture / rewrite), got {type(gm).__name__}")
    inputs = _example(gm, example_inputs, example_kwargs)
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else (inputs, {})

    def dims(x):
        return {i: torch.export.Dim.AUTO for i in range(x.ndim)} if isinstance(x, torch.Tensor) else None

    shapes = tuple(pytree.tree_map(dims, a) for a in args) if args else {k: pytree.tree_map(dims, v) for k, v in kwargs.items()}
    module = eval_graph_module(gm)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch.export raises many types; all mean the same here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"torch.export could not export {gm._fx_model_name}: {type(e).__name__}: {first}") from e


def _output_names(program: torch.export.ExportedProgram) -> list[str] | None:
    """``last_hidden_state``, ``pooler_output``, ...: the output's pytree keys, as ONNX output names."""
    spec = program.call_spec.out_spec
    try:
        example = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
        paths = [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(example)[0]]
    except Exception:  # an output type that cannot be rebuilt from indices keeps ONNX's own names
        return None
    names = [re.sub(r"\W+", "_", p).strip("_") or f"output_{i}" for i, p in enumerate(paths)]
    return [n if not n[0].isdigit() else f"output_{n}" for n in names] if len(set(names)) == len(names) else None


def export(gm: AdaptedModule, path: str | Path, example_inputs: Any = None, example_kwargs: dict | None = None, *,
           max_length: int | None = None) -> torch.export.ExportedProgram | Path:
    """Write ``gm`` as it computes in eval mode to ``path``: ``.pt2`` (``torch.export.save``; load it
    with ``torch.export.load(path).module()``) or ``.onnx`` (needs ``pip install fxadapt[onnx]``).

    A path without a suffix, for a module captured from a causal LM, is a directory for serving:
    the model's prompt and token steps with a KV cache, as ``.pt2`` programs, for sequences up to
    ``max_length`` (default: the model's positions), read back with :func:`fxadapt.load_exported`
    (``.generate(input_ids, max_new_tokens=...)``); see :mod:`fxadapt.serving`. Returns the directory.

    Inputs are the graph's inputs by name (for a transformers model: ``input_ids``,
    ``attention_mask``, ...; the written model needs all of them). Without example inputs, those the
    capture used are taken. Returns the ExportedProgram that was written. The file is written
    beside ``path`` and renamed into place, so a failure part-way leaves an earlier file whole.
    ``ExportError`` names the path when it cannot be written (a directory, a parent that is a file).

    >>> import fxadapt, torch, tempfile, os
    >>> gm = fxadapt.rewrite(torch.nn.Sequential(torch.nn.Linear(4, 4)), fxadapt.LoRAConfig(targets=["0"], selfattn_lora=False),
    ...                      example_inputs=torch.randn(2, 4))
    >>> path = os.path.join(tempfile.mkdtemp(), "model.pt2")
    >>> program = fxadapt.export(gm, path)
    >>> torch.export.load(path).module()(input=torch.randn(5, 4)).shape
    torch.Size([5, 4])
    """
    path = Path(path)
    if not path.suffix:
        if not isinstance(gm, AdaptedModule):
            raise ExportError(f"fxadapt.export takes an AdaptedModule (from fxadapt.capture / rewrite), got {type(gm).__name__}")
        from .serving import export_generation

        return export_generation(gm, path, max_length)
    if path.suffix not in SUFFIXES:
        raise ExportError(f"{path}: fxadapt.export writes {' or '.join(SUFFIXES)} files (or a directory for serving a decoder: no suffix), not {path.suffix!r}")
    with _replacing(path) as tmp:
        program = export_program(gm, example_inputs, example_kwargs)
        if path.suffix == ".pt2":
            torch.export.save(program, str(tmp))
        else:
            _save_onnx(gm, program, tmp, path)
    return program


def _save_onnx(gm: AdaptedModule, program: torch.export.ExportedProgram, tmp: Path, path: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"{path}: writing ONNX needs the onnx extra: pip install 'fxadapt[onnx]' ({e})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, (), f=None, dynamo=True, output_names=_output_names(program), verbose=False)
            onnx_program.save(str(tmp))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"{path}: torch.onnx could not convert {gm._fx_model_name}: {type(e).__name__}: {first}") from e


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """Yield a path of ``path``'s name in a fresh directory beside it; when the block ends without
    an exception, move what was written there into ``path``'s directory (``path`` itself last, after
    any external data file that names it), so that a failure part-way leaves an earlier file whole."""
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        yield tmp / path.name
        for name in sorted(os.listdir(tmp), key=lambda name: name == path.name):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())  # on disk before it appears under the final name
            os.replace(tmp / name, path.parent / name)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
