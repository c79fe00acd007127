"""AdapterFusion: a Fuse of three Pfeiffer adapters (dynamic config), compiled (inductor) / eager fxadapt, as a
ratio of medians measured interleaved in one run. Print only.

    python benchmarks/fusion.py                    # roberta-base shape, 2 layers, batch 8 x seq 128, CPU
    python benchmarks/fusion.py --layers 4 --repeats 7
    python benchmarks/fusion.py --smoke            # tiny shapes, eager only, seconds

Rows (ratio = compiled / eager; target from issue 14: <= 1.1, i.e. compiled not slower):
  train   one training step under ``train_adapter_fusion`` (forward, backward, AdamW over the fusion layers)
  infer   a forward without gradients

The clock is the process CPU time on one thread by default (``--threads 0 --clock wall`` for torch's threads
and wall time); a shared machine inflates wall time.
"""

from __future__ import annotations

import argparse
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
from fxadapt.composition import Fuse  # noqa: E402

TARGET = 1.1


def fused_module(args):
    """roberta(-base shape) captured with adapters a, b, c (Pfeiffer, weights moved off their init) and their fusion."""
    torch.manual_seed(0)
    shape = (dict(hidden_size=32, num_attention_heads=4, intermediate_size=64) if args.smoke
             else dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072))
    config = transformers.RobertaConfig(**shape, num_hidden_layers=args.layers, vocab_size=1000, max_position_embeddings=args.seq + 4)
    gm = fxadapt.capture(transformers.RobertaModel(config).eval())
    for name in "abc":
        gm.add_adapter(name, "pfeiffer")
    gm.add_adapter_fusion(Fuse("a", "b", "c"), "dynamic")
    with torch.no_grad():
        for p in gm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    gm.train_adapter_fusion(Fuse("a", "b", "c"))
    return gm


def step_of(module, inputs, train: bool):
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if train else None

    def run():
        if not train:
            with torch.no_grad():
                return module(**inputs)
        opt.zero_grad(set_to_none=True)
        module(**inputs)[0].float().pow(2).mean().backward()
        opt.step()

    return run


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--kinds", default="train,infer", help="which rows: train, infer (comma-separated)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one layer, batch 2 x seq 8, eager against eager, 2 repeats")
    args = parser.parse_args(argv)
    args.device = "cpu"
    if args.smoke:
        args.layers, args.batch, args.seq, args.repeats = 1, 2, 8, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.clock = time.process_time if args.clock == "cpu" else time.perf_counter
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    gm = fused_module(args)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(3, 1000, (args.batch, args.seq), generator=g),
              "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long)}
    rows = []
    for kind in args.kinds.split(","):
        train = kind == "train"
        gm.train(train)
        torch._dynamo.reset()
        compiled = gm if args.smoke else torch.compile(gm, fullgraph=True)
        times = interleaved(args, {"eager": step_of(gm, inputs, train), "compiled": step_of(compiled, inputs, train)}, warmup=2)
        rows.append(dict(row=kind, ours=times["compiled"], theirs=times["eager"], target=TARGET))

    print(f"# AdapterFusion of 3 Pfeiffer adapters (dynamic): roberta shape, {args.layers} layers, batch {args.batch} x seq {args.seq}, "
          f"{args.repeats} repeats, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{'CPU' if args.clock is time.process_time else 'wall'} clock")
    print("| row | compiled s | eager s | ratio | target | met |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["ratio"] = r["ours"] / r["theirs"]
        r["met"] = "yes" if r["ratio"] <= r["target"] else "NO"
        print(f"| {r['row']} | {r['ours']:.4f} | {r['theirs']:.4f} | {r['ratio']:.2f} | <= {r['target']} | {r['met']} |")
    return rows


if __name__ == "__main__":
    main()
