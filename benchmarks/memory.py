"""Peak training memory with and without activation checkpointing (``gm.gradient_checkpointing_enable()``).

    python benchmarks/memory.py                  # Llama shape: 8 layers x 1024 tokens, hidden 256, LoRA r=8 on q, v
    python benchmarks/memory.py --device cuda    # the same on a GPU
    python benchmarks/memory.py --smoke          # 2 layers x 64 tokens: checks the script (seconds)

One training step is a forward and a backward of ``last_hidden_state.pow(2).mean()`` through
``LlamaModel`` (random weights, no LM head: at 1024 tokens a 32k-vocabulary head's logits alone take
131 MB per sequence, which checkpointing does not touch), base frozen, LoRA trainable.

How memory is measured. Each configuration runs in a fresh process (nothing one leaves allocated or
cached can count for the other), interleaved with the other, ``--repeats`` times; the table gives
medians. In each process, after a warm-up step (gradients allocated, as in a training loop):
- CPU, process memory: freed heap pages are returned to the kernel (``malloc_trim``), the resident
  set's high-water mark is reset (``/proc/self/clear_refs``), then one step runs; the figure is the
  high-water mark (``VmHWM``) minus the resident set before the step. This is what the process really
  needed, allocator included.
- CPU, tensors: the peak of the bytes of tensor storages alive at once that the step created (a
  ``TorchDispatchMode`` that counts each new storage until it is freed). Independent of the
  allocator: a cross-check of the first.
- CUDA: ``torch.cuda.max_memory_allocated()`` during the step minus what was allocated before it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench import LiveTensors  # noqa: E402

TARGET = 0.5  # checkpointed / plain peak training memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed pages may stay resident, the figure is then an upper bound
        pass


def build(args):
    """The adapted LlamaModel, its inputs and one training step."""
    import transformers as T

    import fxadapt

    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=1000,
                           max_position_embeddings=args.seq, pad_token_id=0)
    model = T.LlamaModel(config).to(args.device).eval()
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(r=8, alpha=16))
    gm.train_adapter("lora")
    if args.child == "on":
        gm.gradient_checkpointing_enable()
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(3, 1000, (args.batch, args.seq), generator=g).to(args.device)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    losses = []

    def step():
        loss = gm(**inputs).last_hidden_state.float().pow(2).mean()
        loss.backward()
        losses.append(loss.item())

    return gm, step, losses


def child(args) -> dict:
    """One configuration's measurements, in this process."""
    torch.set_num_threads(args.threads)
    gm, step, losses = build(args)
    step()  # warm-up: gradients exist before the measured step, as in a training loop
    out = {"regions": sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == "fxadapt_checkpoint")}
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        out["cuda"] = torch.cuda.max_memory_allocated() - before
    else:
        _trim()
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        step()
        out["rss"] = (_status_kib("VmHWM") - before) * 1024
        _trim()
        with LiveTensors() as tracker:
            step()
        out["tensors"] = tracker.peak
    out["loss"] = losses[-1]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)  # Llama's ratio, 11008 / 4096
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="2 layers x 64 tokens, hidden 64, one repeat")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.seq, args.hidden, args.intermediate, args.repeats = 2, 64, 64, 172, 1
    if args.child:
        print(json.dumps(child(args)))
        return {}

    forwarded = [f"--{k}={getattr(args, k)}" for k in ("layers", "seq", "batch", "hidden", "intermediate", "heads", "threads", "device")]
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for mode in ("off", "on"):  # interleaved
            proc = subprocess.run([sys.executable, __file__, "--child", mode, *forwarded], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"the {mode} configuration failed:\n{proc.stderr[-4000:]}")
            runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    kinds = ["cuda"] if args.device == "cuda" else ["rss", "tensors"]
    names = {"cuda": "CUDA allocated", "rss": "process memory (RSS high-water mark)", "tensors": "tensors alive at once"}
    rows = []
    for kind in kinds:
        on, off = (statistics.median(r[kind] for r in runs[m]) for m in ("on", "off"))
        rows.append({"measurement": f"peak training memory, {names[kind]}: checkpointing on / off",
                     "on_mib": on / 2**20, "off_mib": off / 2**20, "ratio": on / off, "target": TARGET})
    result = {
        "shape": f"LlamaModel: {args.layers} layers, hidden {args.hidden}, ffn {args.intermediate}, {args.heads} heads; "
                 f"batch {args.batch} x seq {args.seq}; LoRA r=8 alpha=16 on q, v; float32",
        "env": f"{args.device} ({platform.machine()}, {args.threads} thread(s)); medians of {args.repeats} interleaved runs, "
               f"a fresh process each; python {platform.python_version()}, torch {torch.__version__}",
        "regions": runs["on"][0]["regions"],
        "same_loss": all(a["loss"] == b["loss"] for a, b in zip(runs["on"], runs["off"])),
        "rows": rows,
    }
    print(result["shape"])
    print(result["env"])
    print(f"checkpointed regions: {result['regions']}; same loss with and without: {result['same_loss']}")
    print("\n| measurement | on | off | ratio | target | met |\n| --- | ---: | ---: | ---: | ---: | :---: |")
    for r in rows:
        print(f"| {r['measurement']} | {r['on_mib']:.1f} MiB | {r['off_mib']:.1f} MiB | {r['ratio']:.3f} | <= {r['target']} | "
              f"{'yes' if r['ratio'] <= r['target'] else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
