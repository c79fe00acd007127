"""A decoder LM fine-tuned with LoRA on a causal-LM loss, generating before and after, offline.

A tiny random Llama (built from a config: nothing is downloaded) learns to reverse a sequence of
five symbols written after a separator: ``<bos> 3 7 4 9 5 <sep>`` -> ``5 9 4 7 3``. Only the LoRA
weights train (base frozen). Greedy ``gm.generate`` (transformers' generate with the adapter and a
KV cache) writes the continuation of 200 held-out prompts; the accuracy (all five symbols right) is
printed before and after training, and after ``gm.merge_and_unload()``, whose plain
``LlamaForCausalLM`` must generate the same tokens. Runs in well under a minute on 2 CPU cores.

    python examples/causal_lm.py [--steps N]
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import fxadapt

PAD, BOS, SEP = 0, 1, 2
SYMBOLS, LENGTH = 10, 5  # tokens 3..12, sequences of five


def sequences(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` prompts ``<bos> x <sep>`` and their targets ``reversed(x)``."""
    x = torch.randint(3, 3 + SYMBOLS, (n, LENGTH), generator=generator)
    prompts = torch.cat([torch.full((n, 1), BOS), x, torch.full((n, 1), SEP)], dim=1)
    return prompts, x.flip(1)


def generated(model, prompts: torch.Tensor) -> torch.Tensor:
    """The greedy continuation (``LENGTH`` tokens) of each prompt; ``model`` is the AdaptedModule or a transformers model."""
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=LENGTH, do_sample=False)
    return out[:, prompts.shape[1]:]


def accuracy(tokens: torch.Tensor, targets: torch.Tensor) -> float:
    return (tokens == targets).all(dim=1).float().mean().item()


def main(steps: int = 300, batch_size: int = 64) -> dict:
    torch.manual_seed(0)
    # initializer_range 0.1 (not 0.02): the frozen LM head then has weights large enough for confident logits.
    config = LlamaConfig(vocab_size=3 + SYMBOLS, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=32, initializer_range=0.1,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    gm = fxadapt.capture(model)  # the graph of one forward (no cache); generate() captures the decode step itself
    # LoRA on every projection: reversing needs attention by position (q, k) and what it copies (v, o, feed-forward).
    lora = fxadapt.LoRAConfig(r=16, alpha=32, attn_matrices=("q", "k", "v", "o"), intermediate_lora=True, output_lora=True)
    gm.add_adapter("reverse", lora, set_active=True)
    print(f"captured {type(model).__name__}: {len(gm.sites())} sites in {config.num_hidden_layers} layers")

    test_prompts, test_targets = sequences(200, torch.Generator().manual_seed(1))
    before = accuracy(generated(gm.eval(), test_prompts), test_targets)
    print(f"before training: {before:.3f} of 200 held-out sequences reversed (greedy gm.generate)")

    gm.train_adapter("reverse")  # base frozen, adapter trainable, training mode
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in (bar := tqdm(range(steps), desc="training LoRA")):
        prompts, targets = sequences(batch_size, generator)
        ids = torch.cat([prompts, targets], dim=1)
        logits = gm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        # Causal-LM loss on the answer only: the logits at <sep> and after predict the reversed symbols.
        answer = logits[:, prompts.shape[1] - 1:-1]
        loss = torch.nn.functional.cross_entropy(answer.reshape(-1, answer.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f}s, final loss {loss.item():.4f}")

    gm.eval()
    tokens = generated(gm, test_prompts)
    after = accuracy(tokens, test_targets)
    print(f"after training: {after:.3f} reversed (LoRA unmerged)")
    for prompt, out in zip(test_prompts[:3].tolist(), tokens[:3].tolist()):
        print(f"  {prompt[1:-1]} -> {out}")

    plain = gm.merge_and_unload()  # a LlamaForCausalLM with the adapter merged; gm and model unchanged
    merged_tokens = generated(plain, test_prompts)
    merged = accuracy(merged_tokens, test_targets)
    same = torch.equal(merged_tokens, tokens)
    print(f"merge_and_unload -> {type(plain).__name__}: {merged:.3f} reversed, tokens identical to unmerged: {same}")
    return {"before": before, "after": after, "merged": merged, "merged_tokens_equal": same, "loss": loss.item()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
