"""Per-sample routing (``adapter_names``) over K LoRA adapters in one batch, as ratios of medians
measured interleaved in one run.

    python benchmarks/routing.py                    # roberta-base shape (2 layers), batch 16 x seq 128, CPU
    python benchmarks/routing.py --layers 4 --repeats 7
    python benchmarks/routing.py --smoke            # tiny shapes, eager only, seconds

Rows (ratio = routed / other; targets from issue 14):
  train K   one training step (forward, backward, AdamW) of a batch routed over K LoRA adapters (r=8 on
            q, v; the module holds K adapters) / the same step with one adapter active, no routing;
            eager and compiled (inductor, each side compiled whole). Targets: K=4 <= 1.2, K=16 <= 1.5.
  infer K   the same, inference (no gradients).
  peft 16   inference routed over 16 adapters, fxadapt (eager, and compiled whole with inductor) / PEFT's
            ``adapter_names`` forward (eager: PEFT routes in eval mode only); target <= 0.8. More rows give
            the base model's time without adapters (eager, and compiled), measured in the same rounds: no
            routing can beat that floor. ``--seq 1`` is a decode step's shape (one new token per row).

The clock is the process CPU time on one thread by default (``--threads 0 --clock wall`` for torch's
threads and wall time); a shared machine inflates wall time.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import fxadapt  # noqa: E402
from bench import interleaved  # noqa: E402

TARGETS = {("train", 4): 1.2, ("train", 16): 1.5, ("infer", 4): 1.2, ("infer", 16): 1.5, ("peft", 16): 0.8}


def model_of(args) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = (dict(hidden_size=32, num_attention_heads=4, intermediate_size=64) if args.smoke
             else dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072))
    config = transformers.RobertaConfig(**shape, num_hidden_layers=args.layers, vocab_size=1000, max_position_embeddings=args.seq + 4)
    return transformers.RobertaModel(config).eval()


def with_adapters(model, k: int):
    """A capture of ``model`` with K LoRA adapters (r=8 on q, v), B moved off zero, all trainable."""
    gm = fxadapt.capture(model)
    for i in range(k):
        gm.add_adapter(f"a{i}", fxadapt.LoRAConfig(r=8, alpha=16, init_weights="bert"))
    gm.train_adapter([f"a{i}" for i in range(k)])
    gm.set_active_adapters(None)
    return gm


def step_of(module, inputs, extra: dict, train: bool):
    """One training step (forward, loss, backward, AdamW) or one forward without gradients."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if train else None

    def run():
        if not train:
            with torch.no_grad():
                return module(**inputs, **extra)
        opt.zero_grad(set_to_none=True)
        module(**inputs, **extra)[0].float().pow(2).mean().backward()
        opt.step()

    return run


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--ks", default="1,4,16", help="adapter counts K (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--kinds", default="train,infer,peft", help="which rows: train, infer, peft (comma-separated)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one layer, batch 4 x seq 8, eager, 2 repeats")
    args = parser.parse_args(argv)
    args.device = "cpu"
    if args.smoke:
        args.layers, args.batch, args.seq, args.repeats, args.no_compile = 1, 4, 8, 2, True
    if args.threads:
        torch.set_num_threads(args.threads)
    args.clock = time.process_time if args.clock == "cpu" else time.perf_counter
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    ks = [int(k) for k in args.ks.split(",")]

    model = model_of(args)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(3, 1000, (args.batch, args.seq), generator=g),
              "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long)}
    modules = {k: with_adapters(model, k) for k in ks}
    single = modules[min(ks)]
    rows = []
    modes = [("eager", lambda m: m)] + ([] if args.no_compile else [("compiled", lambda m: torch.compile(m, fullgraph=True))])
    kinds = args.kinds.split(",")
    for train in [t for t in (True, False) if ("train" if t else "infer") in kinds]:
        kind = "train" if train else "infer"
        for m in modules.values():
            m.train(train)  # dropout in training steps; none in inference
        for mode, wrap in modes:
            torch._dynamo.reset()
            single.set_active_adapters("a0")
            fns = {"single": step_of(wrap(single), inputs, {}, train)}
            for k in ks:
                index = modules[k].adapter_indices([f"a{i % k}" for i in range(args.batch)])
                fns[k] = step_of(wrap(modules[k]), inputs, {"adapter_names": index}, train)
            times = interleaved(args, fns)
            for k in ks:
                rows.append(dict(row=f"{kind} K={k}", mode=mode, ours=times[k], theirs=times["single"], other="one adapter",
                                 target=TARGETS.get((kind, k))))
            single.set_active_adapters(None)
    if "peft" in kinds:
        import peft

        k = max(ks)
        theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]),
                                     adapter_name="a0")
        for i in range(1, k):
            theirs.add_adapter(f"a{i}", peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
        theirs.eval()
        names = [f"a{i % k}" for i in range(args.batch)]
        modules[k].eval()
        index = modules[k].adapter_indices(names)
        fns = {"ours": step_of(modules[k], inputs, {"adapter_names": index}, False),
               "peft": step_of(theirs, inputs, {"adapter_names": names}, False),
               "base": step_of(model, inputs, {}, False)}
        if not args.no_compile:  # compiled (inductor), each whole: fxadapt routed, and the base model as the floor
            torch._dynamo.reset()
            fns["ours compiled"] = step_of(torch.compile(modules[k], fullgraph=True), inputs, {"adapter_names": index}, False)
            fns["base compiled"] = step_of(torch.compile(model), inputs, {}, False)
        times = interleaved(args, fns)
        for mode in ("eager", "compiled") if "ours compiled" in times else ("eager",):
            ours, base = ("ours", "base") if mode == "eager" else ("ours compiled", "base compiled")
            rows.append(dict(row=f"peft K={k}", mode=mode, ours=times[ours], theirs=times["peft"], other="PEFT adapter_names (eager)",
                             target=TARGETS.get(("peft", k))))
            # The floor: the base model without adapters over PEFT is the least any routing can reach.
            rows.append(dict(row="floor", mode=mode, ours=times[base], theirs=times["peft"], other="(base model / PEFT)", target=None))
            rows.append(dict(row=f"base K={k}", mode=mode, ours=times[ours], theirs=times[base], other="base model, no adapter",
                             target=None))

    print(f"# routing over K LoRA adapters (r=8, q+v): roberta shape, {args.layers} layers, batch {args.batch} x seq {args.seq}, "
          f"{args.repeats} repeats, torch {torch.__version__}, {torch.get_num_threads()} thread(s), {'CPU' if args.clock is time.process_time else 'wall'} clock")
    print("| row | mode | routed s | other | other s | ratio | target | met |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["ratio"] = r["ours"] / r["theirs"]
        met = "" if r["target"] is None else ("yes" if r["ratio"] <= r["target"] else "NO")
        target = "" if r["target"] is None else f"<= {r['target']}"
        print(f"| {r['row']} | {r['mode']} | {r['ours']:.4f} | {r['other']} | {r['theirs']:.4f} | {r['ratio']:.2f} | {target} | {met} |")
    return rows


if __name__ == "__main__":
    main()
