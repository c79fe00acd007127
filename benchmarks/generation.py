"""Generation speed: ``gm.generate`` (KV cache, adapters in the decode-step graphs) against a loop
without a cache, PEFT's ``generate`` and the base model's, measured in one run, interleaved, as
ratios of medians.

    python benchmarks/generation.py                                  # Llama shape, CPU, float32, batch 1 and 4
    python benchmarks/generation.py --device cuda --dtype bfloat16   # the same on a GPU
    python benchmarks/generation.py --smoke                          # tiny shapes, seconds: checks the script

Every call writes ``--new`` tokens (greedy; no EOS, so always all of them) after a ``--prompt``-token
prompt. Rows, for each batch size (ratio = fxadapt / other; below 1: fxadapt is faster):
  (g1) LoRA r=8 on q, v unmerged: ``gm.generate`` / a greedy loop over ``gm``'s full forward without
       a cache (the whole sequence again for each new token)
  (g2) the same ``gm.generate`` / PEFT's ``generate`` (``get_peft_model``, the same LoRA weights)
  (g3) merged (``gm.merge_adapter``) ``gm.generate`` / the base model's own ``generate``, beside the
       noise floor: the base model's ``generate`` / another instance's
  (g4) with ``--compile``: ``gm.compile()`` (the decode steps compiled) / eager ``gm.generate``, and
       / PEFT's eager ``generate`` (target: 1.5x faster, a ratio of at most 0.667)
All models read the same weight tensors; the tokens each contender writes are compared and reported.
Clock as ``benchmarks/bench.py``: process CPU time of one thread on CPU, synchronised wall time on CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import fxadapt  # noqa: E402
from bench import TABLE_HEAD, Row, format_row, interleaved  # noqa: E402

LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
LORA = dict(r=8, alpha=8)


def llama(args, like: torch.nn.Module | None = None) -> torch.nn.Module:
    """A random LlamaForCausalLM of the benchmark's shape, in eval mode; with ``like``, one that reads
    the same weight tensors."""
    torch.manual_seed(0)
    shape = TINY if args.smoke else LLAMA
    config = transformers.LlamaConfig(**shape, max_position_embeddings=args.prompt + args.new, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=None)
    model = transformers.LlamaForCausalLM(config).to(args.device, args.dtype).eval()
    if like is not None:
        model.load_state_dict(like.state_dict(), assign=True)
    return model


def adapted(args, base, lora_dir: str | None = None):
    """fxadapt with LoRA on q, v: random B (so that the adapter acts, as after training), or the
    adapter saved in ``lora_dir``."""
    if lora_dir is not None:
        gm = fxadapt.capture(llama(args, like=base))
        gm.load_adapter(lora_dir, "lora", set_active=True)
        return gm.eval()
    gm = fxadapt.rewrite(llama(args, like=base), fxadapt.LoRAConfig(**LORA, attn_matrices=("q", "v")), name="lora")
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator(p.device).manual_seed(0))
    return gm.eval()


def peft_model(args, base, lora_dir: str):
    """PEFT's LoRA on q_proj, v_proj (``get_peft_model``) with fxadapt's weights, saved in PEFT's format."""
    import peft
    from safetensors.torch import load_file

    config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(llama(args, like=base), config)
    state = load_file(str(Path(lora_dir) / "adapter_model.safetensors"), device=args.device)
    result = peft.set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys, result.unexpected_keys
    return model.eval()


def greedy_without_cache(gm, ids, new: int) -> torch.Tensor:
    """Each token from ``gm``'s full forward over the whole sequence so far (no KV cache)."""
    with torch.no_grad():
        for _ in range(new):
            logits = gm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def generating(model, ids, new: int):
    def run():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)

    return run


def prompt_ids(args, batch: int) -> torch.Tensor:
    vocab = (TINY if args.smoke else LLAMA)["vocab_size"]
    return torch.randint(3, vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch)).to(args.device)


def batch_rows(args, batch: int, base, fx, merged, pf, base_again) -> list[Row]:
    """(g1) to (g3) at one batch size, all contenders timed in the same rounds."""
    ids = prompt_ids(args, batch)
    fns = {"fx": generating(fx, ids, args.new), "merged": generating(merged, ids, args.new), "base": generating(base, ids, args.new),
           "base_again": generating(base_again, ids, args.new), "peft": generating(pf, ids, args.new),
           "loop": lambda: greedy_without_cache(fx, ids, args.new)}
    tokens = {name: fn() for name, fn in fns.items()}  # also the warm-up: the step graphs are built on the first call
    args.tokens[batch] = {other: torch.equal(tokens["fx"], tokens[other]) for other in ("loop", "peft", "merged")}
    t = interleaved(args, fns, warmup=0)
    tag = f"batch {batch}:"
    return [
        Row("g1", f"{tag} LoRA unmerged, gm.generate (KV cache) / no-cache greedy loop over gm's forward", t["fx"], t["loop"], "ms", 0.5),
        Row("g2", f"{tag} LoRA unmerged, gm.generate / PEFT generate", t["fx"], t["peft"], "ms", 1.0),
        Row("g3", f"{tag} LoRA merged, gm.generate / base model generate", t["merged"], t["base"], "ms", 1.02),
        Row("g3", f"{tag}   noise floor: base model generate / another instance's", t["base"], t["base_again"], "ms"),
    ]


def compiled_rows(args, batch: int, fx, compiled, pf) -> list[Row]:
    """(g4) at one batch size: the slowest to set up (two compilations per batch size), so it runs last."""
    ids = prompt_ids(args, batch)
    fns = {"fx": generating(fx, ids, args.new), "compiled": generating(compiled, ids, args.new), "peft": generating(pf, ids, args.new)}
    for _ in range(2):  # compiles the prompt and token steps for this batch size before the clock runs
        out = fns["compiled"]()
    args.tokens[batch]["compiled"] = torch.equal(fns["fx"](), out)
    t = interleaved(args, fns, warmup=0)
    options = f", options={args.options}" if args.options else ""
    what = f"batch {batch}: LoRA unmerged, gm.generate: decode steps compiled (gm.compile(backend={args.backend!r}{options}))"
    # The target: compiled at least 1.5x faster than PEFT's eager generate, i.e. a ratio <= 1 / 1.5.
    return [Row("g4", f"{what} / eager", t["compiled"], t["fx"], "ms"),
            Row("g4", f"{what} / PEFT generate (eager)", t["compiled"], t["peft"], "ms", round(1 / 1.5, 3))]


def describe(args) -> str:
    import peft

    shape = TINY if args.smoke else LLAMA
    if args.device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name()}), wall clock"
    else:
        clock = "process CPU time" if args.clock is time.process_time else "wall clock"
        device = f"cpu ({platform.machine()}, {torch.get_num_threads()} thread(s)), {clock}"
    return (
        f"LlamaForCausalLM random weights: hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads, ffn {shape['intermediate_size']}, vocab {shape['vocab_size']}; "
        f"{args.new} new tokens (greedy) after a {args.prompt}-token prompt, batch {', '.join(map(str, args.batches))}; "
        f"LoRA r={LORA['r']} alpha={LORA['alpha']} on q,v; {str(args.dtype).removeprefix('torch.')}\n"
        f"{device}; medians of {args.repeats} interleaved repeats; all models read the same weight tensors\n"
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, fxadapt {fxadapt.__version__}"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repeats: checks that the script runs")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4; smoke 2)")
    p.add_argument("--prompt", type=int, default=None, help="prompt length (default 256, smoke 16)")
    p.add_argument("--new", type=int, default=None, help="new tokens per call (default 32, smoke 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7, smoke 2)")
    p.add_argument("--compile", action="store_true", help="also row g4: gm.compile() (needs AdaptedModule.compile)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of row g4 (default inductor)")
    p.add_argument("--options", type=json.loads, default=None,
                   help='torch.compile options of row g4, as JSON (e.g. \'{"cpp_wrapper": true}\': inductor\'s C++ wrapper)')
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1; 0: torch's default)")
    p.add_argument("--clock", default=None, choices=["cpu", "wall"], help="CPU: process time (default) or wall; CUDA: wall")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.compile and "compile" not in vars(fxadapt.AdaptedModule):
        p.error("--compile: this fxadapt has no AdaptedModule.compile (compiled decode steps)")
    args.dtype = getattr(torch, args.dtype)
    args.clock = time.process_time if args.device == "cpu" and args.clock != "wall" else time.perf_counter
    args.batches = [int(b) for b in (args.batches or ("2" if args.smoke else "1,4")).split(",")]
    args.prompt = args.prompt or (16 if args.smoke else 256)
    args.new = args.new or (4 if args.smoke else 32)
    args.repeats = args.repeats or (2 if args.smoke else 7)
    args.tokens = {}
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the measurements, print the table (rows as they are measured), return its rows."""
    args = parse(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    print(describe(args), "", TABLE_HEAD, sep="\n", flush=True)
    base = llama(args)
    fx = adapted(args, base)
    with tempfile.TemporaryDirectory() as tmp:
        fx.save_adapter(tmp, "lora", format="peft")
        pf = peft_model(args, base, tmp)
        merged = adapted(args, base, tmp)
        merged.merge_adapter("lora")
        compiled = None
        if args.compile:
            compiled = adapted(args, base, tmp)
            compiled.compile(backend=args.backend, options=args.options)
    base_again = llama(args, like=base)
    rows: list[Row] = []
    # Rows print as they are measured, so that a run cut short still reports what it measured.
    measures = [lambda b=b: batch_rows(args, b, base, fx, merged, pf, base_again) for b in args.batches]
    measures += [lambda b=b: compiled_rows(args, b, fx, compiled, pf) for b in args.batches if compiled is not None]
    for measure in measures:
        for row in measure():
            rows.append(row)
            print(format_row(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"setup": describe(args), "tokens_equal": {str(b): s for b, s in args.tokens.items()},
                           "rows": [{**asdict(r), "ratio": r.ratio, "met": r.met} for r in rows]}, f, indent=1)
    print("\ngm.generate's tokens equal to: " + "; ".join(
        f"batch {b}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items()) for b, same in args.tokens.items()))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
