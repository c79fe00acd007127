"""The ``fxadapt`` console script (also ``python -m fxadapt``): look at a model's sites, size
adapters, merge an adapter into a plain transformers model, export, draw.

    fxadapt sites   MODEL_DIR
    fxadapt summary MODEL_DIR --config lora [--config ia3 ...]
    fxadapt merge   MODEL_DIR ADAPTER_DIR OUT_DIR
    fxadapt export  MODEL_DIR [ADAPTER_DIR] OUT.pt2|OUT.onnx
    fxadapt graph   MODEL_DIR --config lora [--config ...] -o FILE.png|FILE.svg

MODEL_DIR is a local transformers model directory (``config.json`` and weights); it is loaded with
the class its config names (``architectures``), else ``AutoModel``. Only the public API is used.
Errors are one line on stderr and exit status 1 (2 for a wrong command line).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence

import fxadapt

__all__ = ["main", "TOKENIZER_FILES"]

#: Files ``merge`` copies from MODEL_DIR to OUT_DIR when present, so OUT_DIR is a complete model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
                   "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
                   "preprocessor_config.json", "chat_template.jinja")


class CliError(Exception):
    """A problem with the command's arguments or files, reported as one line."""


def _model_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise CliError(f"model directory {path!r} does not exist" if not os.path.exists(path) else f"{path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CliError(f"{path!r} is not a transformers model directory (it has no config.json)")
    return path


def _load(path: str):
    """The model in ``path``, with the class its config names (so a classification head is kept)."""
    import transformers

    _model_dir(path)
    transformers.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        names = getattr(config, "architectures", None) or []
        cls = getattr(transformers, names[0], None) if names else None
        cls = cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModel
        return cls.from_pretrained(path).eval()
    except (OSError, ValueError, KeyError) as e:
        raise CliError(f"cannot load a transformers model from {path!r}: {str(e).strip().splitlines()[0]}") from None


def _check_configs(ids: Sequence[str]) -> list[str]:
    unknown = [c for c in ids if c not in fxadapt.CONFIGS]
    if unknown:
        raise CliError(f"unknown config id {unknown[0]!r}; valid ids: {', '.join(fxadapt.CONFIGS)}")
    return list(ids)


def _adapted(model_dir: str, configs: Sequence[str], *, active: bool):
    """The captured model with these configs added as adapters named by their ids."""
    configs = _check_configs(configs)
    gm = fxadapt.capture(_load(model_dir))
    for config_id in configs:
        gm.add_adapter(config_id, config_id, set_active=False)
    if active:
        gm.set_active_adapters(configs)
    return gm


def _with_adapter(model_dir: str, adapter_dir: str | None):
    """The captured model, with the adapter in ``adapter_dir`` loaded and active (if given)."""
    _model_dir(model_dir)
    if adapter_dir is not None and not os.path.isdir(adapter_dir):
        raise CliError(f"adapter directory {adapter_dir!r} does not exist")
    model = _load(model_dir)
    gm = fxadapt.capture(model)
    name = gm.load_adapter(adapter_dir, set_active=True) if adapter_dir else None
    return model, gm, name


# -- commands ----------------------------------------------------------------------------------


def cmd_sites(args) -> None:
    model = _load(args.model_dir)
    gm = fxadapt.capture(model)
    rows = [(str(s.layer), s.role or "-", s.path, f"{s.in_features}x{s.out_features}") for s in gm.sites()]
    header = ("layer", "role", "module", "shape (in x out)")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    layers = len({s.layer for s in gm.sites() if s.layer is not None})
    print(f"\n{len(rows)} sites in {layers} layers of {type(model).__name__}")


def cmd_summary(args) -> None:
    print(_adapted(args.model_dir, args.config, active=False).adapter_summary())


def cmd_merge(args) -> None:
    out = args.out_dir
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise CliError(f"output directory {out!r} is not empty (use --force to write into it)")
    _, gm, name = _with_adapter(args.model_dir, args.adapter_dir)
    model = gm.merge_and_unload(inplace=True)  # the model was loaded for this command alone
    model.save_pretrained(out)
    copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(args.model_dir, f))]
    for f in copied:
        shutil.copy2(os.path.join(args.model_dir, f), os.path.join(out, f))
    print(f"merged adapter {name!r} into {type(model).__name__}: wrote {out}" + (f" (with {', '.join(copied)})" if copied else ""))
    print(f"load it without fxadapt: transformers.AutoModel.from_pretrained({out!r})")


def cmd_export(args) -> None:
    paths = args.paths
    if len(paths) not in (1, 2):
        raise CliError("export takes MODEL_DIR [ADAPTER_DIR] OUT.pt2|OUT.onnx")
    adapter_dir, out = (paths[0], paths[1]) if len(paths) == 2 else (None, paths[0])
    if not out.endswith((".pt2", ".onnx")):
        raise CliError(f"{out!r}: the output file must end in .pt2 or .onnx")
    model, gm, name = _with_adapter(args.model_dir, adapter_dir)
    how = ""
    if name is not None:
        try:
            gm.merge_adapter(name)
            how = f" with adapter {name!r} merged into the weights"
        except fxadapt.MergeError:
            how = f" with adapter {name!r} as graph nodes (it cannot be merged)"
    fxadapt.export(gm, out)
    print(f"wrote {out}: {type(model).__name__}{how}")


def cmd_graph(args) -> None:
    if not args.output.lower().endswith((".png", ".svg")):
        raise CliError(f"{args.output!r}: the picture must be a .png or .svg file")
    gm = _adapted(args.model_dir, args.config, active=True)
    path = fxadapt.draw(gm, args.output)
    print(f"wrote {path}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxadapt", description="Parameter-efficient fine-tuning as graph rewriting.")
    parser.add_argument("--version", action="version", version=f"fxadapt {fxadapt.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("model_dir", metavar="MODEL_DIR", help="a local transformers model directory")
        sub.set_defaults(func=func)
        return sub

    command("sites", cmd_sites, "list the adapter sites found in the model: layer, role, module path, shape")
    sub = command("summary", cmd_summary, "the adapter summary table for these configs")
    sub.add_argument("--config", action="append", required=True, metavar="ID", help=f"a config id, repeatable: {', '.join(fxadapt.CONFIGS)}")
    sub = command("merge", cmd_merge, "merge an adapter into the model and save a plain transformers model")
    sub.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="an adapter saved by fxadapt, PEFT or AdapterHub")
    sub.add_argument("out_dir", metavar="OUT_DIR")
    sub.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
    sub = command("export", cmd_export, "write the model (with an adapter, merged when it can be) as .pt2 or .onnx")
    sub.add_argument("paths", nargs="+", metavar="[ADAPTER_DIR] OUT", help="an optional adapter directory, then OUT.pt2 or OUT.onnx")
    sub = command("graph", cmd_graph, "draw the adapted graph: sites by role and adapter nodes, one row per layer")
    sub.add_argument("--config", action="append", required=True, metavar="ID", help="a config id, repeatable")
    sub.add_argument("-o", "--output", required=True, metavar="FILE", help="FILE.png or FILE.svg")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 wrong usage)."""
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except (CliError, fxadapt.FxAdaptError, OSError) as e:
        print(f"fxadapt {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
