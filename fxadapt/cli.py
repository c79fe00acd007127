"""The ``fxadapt`` console script (also ``python -m fxadapt``): look at a model's sites, size
adapters, merge an adapter into a plain transformers model, export, draw.

    fxadapt sites   MODEL_DIR
    fxadapt summary MODEL_DIR --config lora [--config ia3 ...]
    fxadapt merge   MODEL_DIR ADAPTER_DIR OUT_DIR [--force]
    fxadapt export  MODEL_DIR [ADAPTER_DIR] OUT.pt2|OUT.onnx [--force]
    fxadapt graph   MODEL_DIR --config lora [--config ...] -o FILE.png|FILE.svg

MODEL_DIR is a local transformers model directory (``config.json`` and weights); it is loaded with
the class its config names (``architectures``), else ``AutoModel``. Only the public API is used.
Every path is checked before the model is loaded; outputs are written whole or not at all (an
earlier output at that path survives a failure); an existing output is replaced only with
``--force``. Errors are one line on stderr and exit status 1 (2 for a wrong command line).
torch and transformers are imported only by the commands that need them, so ``--version``,
``--help`` and wrong command lines answer at once.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Sequence

import fxadapt
from fxadapt.fsutil import atomic_directory

__all__ = ["main", "TOKENIZER_FILES", "ADAPTER_FILES"]

#: Files ``merge`` copies from MODEL_DIR to OUT_DIR when present, so OUT_DIR is a complete model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
                   "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
                   "preprocessor_config.json", "chat_template.jinja")

#: Config file -> weights files of each checkpoint format ``load_adapter`` reads (fxadapt.checkpoint's
#: names, repeated here because that module imports torch).
ADAPTER_FILES = {
    "fxadapt_config.json": ("fxadapt_model.safetensors",),
    "adapter_config.json": ("adapter_model.safetensors", "adapter_model.bin", "adapter.safetensors", "pytorch_adapter.bin"),
}


class CliError(Exception):
    """A problem with the command's arguments or files, reported as one line."""


def _model_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise CliError(f"model directory {path!r} does not exist" if not os.path.exists(path) else f"{path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CliError(f"{path!r} is not a transformers model directory (it has no config.json)")
    return path


def _adapter_dir(path: str) -> str:
    """``path`` if it holds an adapter config with a weights file that ``load_adapter`` reads."""
    if not os.path.isdir(path):
        raise CliError(f"adapter directory {path!r} does not exist" if not os.path.exists(path) else f"{path!r} is not a directory")
    for config, weights in ADAPTER_FILES.items():
        if os.path.isfile(os.path.join(path, config)) and any(os.path.isfile(os.path.join(path, w)) for w in weights):
            return path
    looked = "; ".join(f"{config} with {' or '.join(weights)}" for config, weights in ADAPTER_FILES.items())
    raise CliError(f"adapter directory {path!r} holds no adapter (looked for {looked})")


def _output(path: str, *, directory: bool, force: bool = True) -> str:
    """Refuse an output path that cannot be written or would replace something without ``--force``."""
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise CliError(f"cannot write {path!r}: {ancestor!r} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CliError(f"cannot write {path!r}: no permission to write in {ancestor!r}")
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"output directory {path!r} is a file")
    if not directory and os.path.isdir(path):
        raise CliError(f"output file {path!r} is a directory")
    if not force and os.path.isdir(path) and os.listdir(path):
        raise CliError(f"output directory {path!r} is not empty (use --force to replace it and everything in it)")
    if not force and not directory and os.path.exists(path):
        raise CliError(f"output file {path!r} exists (use --force to replace it)")
    return path


def _load(path: str):
    """The model in the checked directory ``path``, with the class its config names (so a
    classification head is kept)."""
    import transformers  # here, not at the top: --version and path errors need no torch

    transformers.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        names = getattr(config, "architectures", None) or []
        cls = getattr(transformers, names[0], None) if names else None
        cls = cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModel
        return cls.from_pretrained(path).eval()
    except (OSError, ValueError, KeyError) as e:
        raise CliError(f"cannot load a transformers model from {path!r}: {str(e).strip().splitlines()[0]}") from None


def _check_configs(ids: Sequence[str]) -> dict[str, fxadapt.AdapterConfig]:
    """Each ``--config`` (a CONFIGS id or an AdapterHub config string) and the adapter name it gets:
    the id itself, or the string's words joined by ``_`` (``lora[r=4]`` -> ``lora_r_4``)."""
    configs = {}
    for text in ids:
        try:
            config = fxadapt.config.resolve_config(text)
        except fxadapt.ConfigError as e:
            raise CliError(str(e)) from None
        configs[text if text in fxadapt.CONFIGS else re.sub(r"\W+", "_", text).strip("_")] = config
    return configs


def _adapted(model_dir: str, configs: Sequence[str], *, active: bool):
    """The captured model with these configs added as adapters named by their ids."""
    configs = _check_configs(configs)
    gm = fxadapt.capture(_load(_model_dir(model_dir)))
    for name, config in configs.items():
        gm.add_adapter(name, config, set_active=False)
    if active:
        gm.set_active_adapters(list(configs))
    return gm


def _with_adapter(model_dir: str, adapter_dir: str | None):
    """The captured model, with the adapter in ``adapter_dir`` loaded and active (if given); the
    paths were checked by the caller."""
    model = _load(model_dir)
    gm = fxadapt.capture(model)
    name = gm.load_adapter(adapter_dir, set_active=True) if adapter_dir else None
    return model, gm, name


# -- commands ----------------------------------------------------------------------------------


def cmd_sites(args) -> None:
    model = _load(_model_dir(args.model_dir))
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
    model_dir, adapter_dir = _model_dir(args.model_dir), _adapter_dir(args.adapter_dir)
    out = _output(args.out_dir, directory=True, force=args.force)
    _, gm, name = _with_adapter(model_dir, adapter_dir)
    model = gm.merge_and_unload(inplace=True)  # the model was loaded for this command alone
    copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(model_dir, f))]
    with atomic_directory(out, error=CliError) as tmp:  # a failure part-way leaves an earlier OUT_DIR whole
        model.save_pretrained(tmp)
        for f in copied:
            shutil.copy2(os.path.join(model_dir, f), os.path.join(tmp, f))
    print(f"merged adapter {name!r} into {type(model).__name__}: wrote {out}" + (f" (with {', '.join(copied)})" if copied else ""))
    print(f"load it without fxadapt: transformers.AutoModel.from_pretrained({out!r})")


def cmd_export(args) -> None:
    paths = args.paths
    if len(paths) not in (1, 2):
        raise CliError("export takes MODEL_DIR [ADAPTER_DIR] OUT.pt2|OUT.onnx")
    adapter_dir, out = (paths[0], paths[1]) if len(paths) == 2 else (None, paths[0])
    if not out.endswith((".pt2", ".onnx")):
        raise CliError(f"{out!r}: the output file must end in .pt2 or .onnx")
    model_dir, adapter_dir = _model_dir(args.model_dir), adapter_dir and _adapter_dir(adapter_dir)
    _output(out, directory=False, force=args.force)
    model, gm, name = _with_adapter(model_dir, adapter_dir)
    how = ""
    if name is not None:
        try:
            gm.merge_adapter(name)
            how = f" with adapter {name!r} merged into the weights"
        except fxadapt.MergeError:
            how = f" with adapter {name!r} as graph nodes (it cannot be merged)"
    fxadapt.export(gm, out)  # writes beside OUT and renames: an earlier OUT survives a failure
    print(f"wrote {out}: {type(model).__name__}{how}")


def cmd_graph(args) -> None:
    if not args.output.lower().endswith((".png", ".svg")):
        raise CliError(f"{args.output!r}: the picture must be a .png or .svg file")
    _output(args.output, directory=False)
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
    sub.add_argument("--config", action="append", required=True, metavar="ID", help=f"a config id or AdapterHub config string (lora[r=4]|pfeiffer), repeatable: {', '.join(fxadapt.CONFIGS)}")
    sub = command("merge", cmd_merge, "merge an adapter into the model and save a plain transformers model")
    sub.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="an adapter saved by fxadapt, PEFT or AdapterHub")
    sub.add_argument("out_dir", metavar="OUT_DIR", help="written whole or not at all: if the command fails, what was there is kept")
    sub.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR (everything in it is removed)")
    sub = command("export", cmd_export, "write the model (with an adapter, merged when it can be) as .pt2 or .onnx")
    sub.add_argument("paths", nargs="+", metavar="[ADAPTER_DIR] OUT", help="an optional adapter directory, then OUT.pt2 or OUT.onnx "
                     "(written beside OUT and renamed: if the command fails, an earlier OUT is kept)")
    sub.add_argument("--force", action="store_true", help="replace an existing OUT file")
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
