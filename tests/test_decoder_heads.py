"""Decoder models with classification heads (and Gemma3's text model) capture with no example
inputs (no data-dependent guard in capture or site analysis: the head picks each row's last token
by the data), and with LoRA give what PEFT gives (task_type SEQ_CLS / TOKEN_CLS) with the same weights."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers as T

import fxadapt
from conftest import H
from fxadapt.testing import assert_outputs_close, relative_error, rounding_tolerance

_DECODER = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=3)
HEADS = {
    "llama-seq": lambda: T.LlamaForSequenceClassification(T.LlamaConfig(**_DECODER)),
    "qwen2-seq": lambda: T.Qwen2ForSequenceClassification(T.Qwen2Config(**_DECODER)),
    "mistral-seq": lambda: T.MistralForSequenceClassification(T.MistralConfig(**_DECODER)),
    "gpt2-seq": lambda: T.GPT2ForSequenceClassification(T.GPT2Config(n_embd=H, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                                                      pad_token_id=0, num_labels=3)),
    "llama-token": lambda: T.LlamaForTokenClassification(T.LlamaConfig(**_DECODER)),
}
# LoRA on q and v of 2 layers, then the head: float32 sums over the hidden size, a few deep.
RTOL = rounding_tolerance(torch.float32, H, depth=6)


def _inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    ids[mask == 0] = 0  # the pad token: sequence classifiers find each row's last token by it
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("head", list(HEADS))
def test_decoder_heads_capture_and_match_peft(head):
    torch.manual_seed(0)
    model = HEADS[head]().eval()
    task = "TOKEN_CLS" if head.endswith("token") else "SEQ_CLS"
    targets = ["c_attn"] if head.startswith("gpt2") else ["q_proj", "v_proj"]
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=targets,
                                                                          init_lora_weights=False)).eval()
    gm = fxadapt.capture(copy.deepcopy(model))  # no example inputs
    assert {s.role for s in gm.sites()} >= {"q", "k", "v", "o", "ffn_in", "ffn_out"}
    config = fxadapt.LoRAConfig(r=4, alpha=8, selfattn_lora=False, targets=targets)
    gm.add_adapter("lora", config, set_active=True)
    state = gm.adapter_state_dict("lora")
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                path, param = name.removeprefix("base_model.model.").replace(".default", "").rsplit(".", 2)[:2]
                state[f"{path}.{param}"].copy_(p)
    inputs = _inputs()
    with torch.no_grad():
        ours, ref, base = gm(**inputs).logits, theirs(**inputs).logits, model(**inputs).logits
    assert relative_error(ref, base) > 100 * RTOL  # the adapter changes the logits: there is something to agree on
    assert_outputs_close(ours, ref, rtol=RTOL)
    # Without the mask, as the model takes it.
    with torch.no_grad():
        assert_outputs_close(gm(input_ids=inputs["input_ids"]).logits, theirs(input_ids=inputs["input_ids"]).logits, rtol=RTOL)


def test_gemma3_text_model_captures_with_its_sites():
    config = T.Gemma3TextConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                vocab_size=100, max_position_embeddings=64, head_dim=8, sliding_window=4, pad_token_id=0)
    torch.manual_seed(0)
    model = T.Gemma3TextModel(config).eval()
    gm = fxadapt.capture(model)
    assert [(s.layer, s.role) for s in gm.sites()] == [(i, r) for i in (0, 1) for r in ("q", "k", "v", "o", "ffn_in", "ffn_in", "ffn_out")]
    inputs = _inputs()
    with torch.no_grad():
        assert_outputs_close(gm(**inputs).last_hidden_state, model(**inputs).last_hidden_state, rtol=RTOL, mask=inputs["attention_mask"])


def test_captured_with_labels_a_call_may_still_pass_a_mask():
    """Example kwargs of input_ids and labels: the graph takes attention_mask too (ones when left out),
    and gives the model's loss and logits with and without one."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**{**_DECODER, "num_labels": 2})).eval()
    ids = torch.randint(3, 100, (2, 8))
    gm = fxadapt.capture(model, example_kwargs={"input_ids": ids, "labels": ids})
    inputs = _inputs()
    for call in ({"input_ids": inputs["input_ids"]}, inputs):
        call = {**call, "labels": inputs["input_ids"]}
        with torch.no_grad():
            ours, ref = gm(**call), model(**call)
        assert_outputs_close(ours.logits, ref.logits, rtol=RTOL)
        assert_outputs_close(ours.loss, ref.loss, rtol=RTOL)


LABELLED = {
    "llama-causal": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DECODER)), "CAUSAL_LM"),
    "llama-seq": (HEADS["llama-seq"], "SEQ_CLS"),
}


@pytest.mark.parametrize("head", list(LABELLED))
def test_captured_with_labels_calls_may_leave_them_out(head):
    """Captured with labels: with them, the loss and the adapter's gradients are PEFT's (same weights);
    without them, loss None and the same logits, as the model gives. The causal LM's example passes one
    tensor as input_ids and labels: the graph still takes them apart (a call's labels differ)."""
    build, task = LABELLED[head]
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(3, 100, (2, 8))
    gm = fxadapt.capture(copy.deepcopy(model), example_kwargs={"input_ids": ids, "labels": ids if task == "CAUSAL_LM" else torch.tensor([0, 2])})
    assert gm._fx_inputs.optional == ("labels",)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                          init_lora_weights=False)).eval()
    gm.add_adapter("lora", fxadapt.LoRAConfig(r=4, alpha=8), set_active=True)
    state = gm.adapter_state_dict("lora")
    pairs = []
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                path, param = name.removeprefix("base_model.model.").replace(".default", "").rsplit(".", 2)[:2]
                state[f"{path}.{param}"].copy_(p)
                pairs.append((state[f"{path}.{param}"], p))
    inputs = _inputs()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100) if task == "CAUSAL_LM" else torch.tensor([1, 0, 2])
    ours, ref = gm(**inputs, labels=labels), theirs(**inputs, labels=labels)
    assert_outputs_close(ours.logits, ref.logits, rtol=RTOL)
    assert_outputs_close(ours.loss, ref.loss, rtol=RTOL)
    ours.loss.backward()
    ref.loss.backward()
    for mine, theirs_p in pairs:
        assert relative_error(mine.grad, theirs_p.grad) < RTOL
    with torch.no_grad():
        for call in (inputs, {"input_ids": inputs["input_ids"]}):
            plain, want = gm(**call), theirs(**call)
            assert plain.loss is None and "loss" not in plain.keys()
            assert_outputs_close(plain.logits, want.logits, rtol=RTOL)
