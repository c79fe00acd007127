"""fxadapt against PEFT and the base model, measured in one run, interleaved, as ratios of medians.

    python benchmarks/bench.py                                  # roberta-base shape, CPU, float32
    python benchmarks/bench.py --device cuda --dtype bfloat16   # the same on a GPU
    python benchmarks/bench.py --smoke                          # tiny shapes, seconds (the tests run this)

Rows (ratio = fxadapt / other; below 1 means fxadapt is faster or smaller):
  (a) LoRA r=8 on q,v: one training step (forward, backward, AdamW), fxadapt / PEFT, eager and compiled
  (b) unmerged inference, fxadapt / PEFT
  (c) merged inference, fxadapt / the base model; the merged graph is checked to be the base graph
  (d) fxadapt.rewrite time / plain torch.export time, at two depths, and deep / shallow rewrite time
  (e) peak memory of one training step (tensors allocated during it), fxadapt / PEFT

Models are ``RobertaModel(RobertaConfig(...))`` with random weights; nothing is downloaded. On CPU
the clock is the process CPU time with one thread by default: on a shared machine, other
processes inflate wall time and OpenMP barriers make multi-threaded timings erratic
(``--threads 0 --clock wall`` for torch's default threads and wall time). On CUDA: wall time,
synchronised.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import platform
import statistics
import sys
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import fxadapt  # noqa: E402
from fxadapt.passes.fuse import check_merged, set_options  # noqa: E402

GROUPS = ("train", "compile", "memory", "infer", "rewrite")
ROBERTA_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=50265)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100, max_position_embeddings=80)


@dataclass
class Row:
    """One line of the table: ``ratio = ours / theirs`` (medians), with the target it is held to."""

    key: str
    what: str
    ours: float
    theirs: float
    unit: str
    target: float | None = None

    @property
    def ratio(self) -> float:
        return self.ours / self.theirs if self.theirs > 0 else math.nan

    @property
    def met(self) -> str:
        return "-" if self.target is None else ("yes" if self.ratio <= self.target else "NO")


# -- models ------------------------------------------------------------------------------------


def roberta(args, layers: int | None = None, like: torch.nn.Module | None = None) -> torch.nn.Module:
    """A random RobertaModel of the benchmark's shape, in eval mode; with ``like``, one that reads the
    same weight tensors (so that contenders differ in their code only, not in where weights lie)."""
    torch.manual_seed(0)
    shape = {**(TINY if args.smoke else ROBERTA_BASE), "num_hidden_layers": layers or args.layers}
    model = transformers.RobertaModel(transformers.RobertaConfig(**shape)).to(args.device, args.dtype).eval()
    if like is not None:
        model.load_state_dict(like.state_dict(), assign=True)
    return model


def make_inputs(args) -> dict[str, torch.Tensor]:
    vocab = (TINY if args.smoke else ROBERTA_BASE)["vocab_size"]
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(args.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def lora_peft(model):
    """PEFT LoRA r=8, alpha=8 on query and value, in training mode."""
    import peft

    config = peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    # Adapter weights in the model's dtype, as fxadapt does (PEFT would upcast bf16 adapters to fp32).
    return peft.get_peft_model(model, config, autocast_adapter_dtype=False).train()


def lora_fxadapt(model):
    """The same LoRA with fxadapt, in training mode with only the adapter trainable."""
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(r=8, alpha=8, attn_matrices=("q", "v")))
    gm.train_adapter("lora")
    return gm


# -- measuring ---------------------------------------------------------------------------------


def interleaved(args, fns: dict[str, Callable[[], object]], warmup: int = 1, repeats: int | None = None) -> dict[str, float]:
    """Median seconds of each function, timed in turns (order alternating) so drift hits all alike."""
    cuda = args.device == "cuda"
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats or args.repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            gc.collect()  # the previous call's garbage is not collected on this call's clock
            if cuda:
                torch.cuda.synchronize()
            start = args.clock()
            fns[name]()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(args.clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step(model, inputs) -> Callable[[], None]:
    """One step: forward, a scalar loss, backward, AdamW on the trainable parameters."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(**inputs)
        out[0].float().pow(2).mean().backward()
        opt.step()

    return step


def infer(model, inputs) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return model(**inputs)

    return run


class LiveTensors(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops create while the mode is on and that are alive at
    once (peak memory on CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self.live:  # views and in-place results share a counted storage
                    self.live[id(storage)] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, id(storage))
        return out


def peak_memory(step: Callable[[], None], device: str) -> int:
    """Peak bytes allocated during one call of ``step`` above what was allocated before it."""
    step()  # optimizer state exists before the measured step, as in a training loop
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with LiveTensors() as tracker:
        step()
    return tracker.peak


# -- the measurements --------------------------------------------------------------------------


def training_rows(args) -> list[Row]:
    """(a) eager and (e): fxadapt and PEFT on the same LoRA, same model, same batch."""
    inputs = make_inputs(args)
    base = roberta(args)
    fx, pf = lora_fxadapt(roberta(args, like=base)), lora_peft(roberta(args, like=base))
    rows = []
    if "train" in args.groups:
        fused = lora_fxadapt(roberta(args, like=base))
        set_options(fused, fuse_lora_a=True)  # q and v read the same input: one A matmul per layer
        t = interleaved(args, {"fx": train_step(fx, inputs), "peft": train_step(pf, inputs), "fused": train_step(fused, inputs)})
        rows.append(Row("a", "train step, eager: fxadapt / PEFT", t["fx"], t["peft"], "ms", 1.00))
        rows.append(Row("f", "train step, eager, LoRA A fusion on / off (fxadapt)", t["fused"], t["fx"], "ms"))
        del fused
    if "memory" in args.groups:
        mem = {name: peak_memory(train_step(m, inputs), args.device) / 2**20 for name, m in (("fx", fx), ("peft", pf))}
        rows.append(Row("e", "peak training memory: fxadapt / PEFT", mem["fx"], mem["peft"], "MiB", 1.00))
    return rows


def compiled_rows(args) -> list[Row]:
    """(a) compiled: the slowest measurement (two whole-model compilations), so it runs last."""
    if args.backend == "none":
        return []
    inputs = make_inputs(args)
    base = roberta(args)
    fx = torch.compile(lora_fxadapt(roberta(args, like=base)), backend=args.backend, fullgraph=True)  # a graph break raises
    pf = torch.compile(lora_peft(roberta(args, like=base)), backend=args.backend)
    t = interleaved(args, {"fx": train_step(fx, inputs), "peft": train_step(pf, inputs)}, warmup=2)
    return [Row("a", f"train step, torch.compile({args.backend}): fxadapt / PEFT", t["fx"], t["peft"], "ms", 0.90)]


def inference_rows(args) -> list[Row]:
    """(b) and (c), all four models timed in the same rounds."""
    inputs = make_inputs(args)
    base = roberta(args)
    unmerged, merged, pf = (make(roberta(args, like=base)) for make in (lora_fxadapt, lora_fxadapt, lora_peft))
    with torch.no_grad():  # adapters that act, as after training (B starts at zero)
        for m in (unmerged, merged, pf):
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator(p.device).manual_seed(0))
    merged.merge_adapter("lora")
    check_merged(merged, fxadapt.capture(base))  # raises unless the merged graph is the base graph
    for m in (unmerged, merged, pf):
        m.eval()
    base_again = roberta(args, like=base)  # the same model twice: the timing noise of this machine
    models = {"fx": unmerged, "fx_merged": merged, "peft": pf, "base": base, "base_again": base_again}
    t = interleaved(args, {k: infer(m, inputs) for k, m in models.items()}, repeats=2 * args.repeats)  # cheap: twice the repeats
    return [
        Row("b", "inference, unmerged: fxadapt / PEFT", t["fx"], t["peft"], "ms", 0.95),
        Row("c", "inference, merged: fxadapt / base model (graph checked: the base graph)", t["fx_merged"], t["base"], "ms", 1.02),
        Row("c", "  noise floor: base model / another instance of it", t["base"], t["base_again"], "ms"),
    ]


def rewrite_rows(args) -> list[Row]:
    """(d): fxadapt.rewrite against plain torch.export of the same model, at two depths."""
    from fxadapt.capture import _auto_dynamic_shapes, transformers_example_inputs

    config = fxadapt.LoRAConfig(r=8, alpha=8, attn_matrices=("q", "v"))
    medians = {}
    for layers in args.depths:
        model = roberta(args, layers)
        kwargs = transformers_example_inputs(model)  # what rewrite exports with
        shapes = _auto_dynamic_shapes(model, (), kwargs)

        def export(model=model, kwargs=kwargs, shapes=shapes):
            return torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)

        fns = {"rewrite": lambda model=model: fxadapt.rewrite(model, config), "export": export}
        medians[layers] = interleaved(args, fns, warmup=0 if args.smoke else 1, repeats=args.rewrite_repeats)
    shallow, deep = args.depths
    rows = [Row("d", f"rewrite / torch.export, {n} layers", medians[n]["rewrite"], medians[n]["export"], "s", 1.3) for n in args.depths]
    rows.append(Row("d", f"rewrite time, {deep} / {shallow} layers", medians[deep]["rewrite"], medians[shallow]["rewrite"], "s", 2.2))
    return rows


# -- the table ---------------------------------------------------------------------------------


def describe(args) -> str:
    import peft

    shape = TINY if args.smoke else ROBERTA_BASE
    if args.device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name()}), wall clock"
    else:
        device = f"cpu ({platform.machine()}, {torch.get_num_threads()} thread(s)), {'process CPU time' if args.clock is time.process_time else 'wall clock'}"
    return (
        f"RobertaModel(RobertaConfig()) random weights: hidden {shape['hidden_size']}, {args.layers} layers "
        f"(rewrite: {args.depths[0]} and {args.depths[1]}), {shape['num_attention_heads']} heads, ffn {shape['intermediate_size']}; "
        f"batch {args.batch} x seq {args.seq}; LoRA r=8 alpha=8 on q,v; {str(args.dtype).removeprefix('torch.')}\n"
        f"{device}; medians of interleaved repeats: {args.repeats} (inference {2 * args.repeats}, rewrite {args.rewrite_repeats}); "
        "all models read the same weight tensors\n"
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, fxadapt {fxadapt.__version__}"
    )


TABLE_HEAD = "| row | measurement | fxadapt | other | ratio | target | met |\n| --- | --- | ---: | ---: | ---: | ---: | :---: |"


def format_row(r: Row) -> str:
    scale = 1000.0 if r.unit == "ms" else 1.0
    return (
        f"| {r.key} | {r.what} | {r.ours * scale:.1f} {r.unit} | {r.theirs * scale:.1f} {r.unit} | {r.ratio:.3f} | "
        f"{'-' if r.target is None else f'<= {r.target:.2f}'} | {r.met} |"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repeats, aot_eager: checks that the script runs")
    p.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)} (default: all)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 9, smoke 2)")
    p.add_argument("--rewrite-repeats", type=int, default=None, help="timed repeats of rewrite and export (default 5, smoke 1)")
    p.add_argument("--backend", default=None, help="torch.compile backend, 'none' to skip (default inductor, smoke aot_eager)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1; 0: torch's default)")
    p.add_argument("--clock", default=None, choices=["cpu", "wall"], help="CPU: process time (default) or wall; CUDA: wall")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    groups = set(args.groups.split(","))
    if groups - set(GROUPS):
        p.error(f"--groups: unknown {sorted(groups - set(GROUPS))}; choose from {','.join(GROUPS)}")
    args.groups = groups
    args.dtype = getattr(torch, args.dtype)
    args.clock = time.process_time if args.device == "cpu" and args.clock != "wall" else time.perf_counter
    args.repeats = args.repeats or (2 if args.smoke else 9)
    args.rewrite_repeats = args.rewrite_repeats or (1 if args.smoke else 5)
    args.backend = args.backend or ("aot_eager" if args.smoke else "inductor")
    args.batch, args.seq = (2, 16) if args.smoke else (8, 128)
    args.layers = 1 if args.smoke else 12  # smoke: one layer has every kind of site, and compiles in half the time
    args.depths = (1, 2) if args.smoke else (12, 24)
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the measurements, print the table, return its rows."""
    args = parse(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    # Rows print as they are measured, so that a run cut short still reports what it measured.
    print(describe(args), "", TABLE_HEAD, sep="\n", flush=True)
    rows: list[Row] = []
    for group, measure in (({"train", "memory"}, training_rows), ({"infer"}, inference_rows),
                           ({"rewrite"}, rewrite_rows), ({"compile"}, compiled_rows)):
        if args.groups & group:
            for row in measure(args):
                rows.append(row)
                print(format_row(row), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"setup": describe(args), "rows": [{**asdict(r), "ratio": r.ratio, "met": r.met} for r in rows]}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
