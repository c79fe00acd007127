"""Encoder-decoders capture with no ``use_cache`` argument (the capture turns the cache off, so the
outputs are the model's with ``use_cache=False``), their sites get the roles and layers their module
names say (encoder self-attention, decoder self-attention, cross-attention, feed-forward), and LoRA
on them gives what PEFT gives (task_type SEQ_2_SEQ_LM) with the same weights, cross-attention included."""

from __future__ import annotations

import copy
import re

import peft
import pytest
import torch
import transformers as T

import fxadapt
from conftest import H
from fxadapt.testing import assert_outputs_close, relative_error, rounding_tolerance

_BART = dict(d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
             decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             decoder_start_token_id=2)
MODELS = {
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=H, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                                                          vocab_size=100, decoder_start_token_id=0)),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(**_BART)),
    "marian": lambda: T.MarianMTModel(T.MarianConfig(**{**_BART, "decoder_start_token_id": 0})),
    "whisper": lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(**{k: v for k, v in _BART.items() if k != "max_position_embeddings"},
                                                                         num_mel_bins=16, max_source_positions=32, max_target_positions=64)),
}
TARGETS = {"t5": ["q", "v"]}  # PEFT's names of the q and v projections, self- and cross-attention alike
# LoRA on q and v of 2 + 2 layers, cross-attention, the head: float32 sums over the hidden size, a few deep.
RTOL = rounding_tolerance(torch.float32, H, depth=10)


def _inputs(name: str, seed: int = 1) -> dict:
    """A padded encoder batch, and decoder inputs of another length than the capture's."""
    g = torch.Generator().manual_seed(seed)
    decoder = torch.randint(3, 100, (3, 5), generator=g)
    if name == "whisper":  # log-mel features: 2 x max_source_positions frames, fixed by the model
        return {"input_features": torch.randn(3, 16, 64, generator=g), "decoder_input_ids": decoder}
    ids = torch.randint(3, 100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder}


def _capture(name: str, model):
    if name == "whisper":  # main input input_features: no inputs made from the config
        example = _inputs(name, seed=0)
        return fxadapt.capture(model, example_kwargs={k: v[:2, :7] if k == "decoder_input_ids" else v[:2] for k, v in example.items()})
    return fxadapt.capture(model)  # no example inputs, no use_cache argument


def _expected_site(path: str, encoder_layers: int) -> tuple[int, str]:
    """(layer, role) of a linear from its module path: the oracle the dataflow analysis must agree with."""
    parts = path.split(".")
    index = int(next(p for p in parts if p.isdigit()))
    layer = index + (encoder_layers if "decoder" in parts else 0)
    leaf = parts[-1]
    ffn = {"wi": "ffn_in", "fc1": "ffn_in", "wo": "ffn_out", "fc2": "ffn_out"}
    if leaf in ffn:
        return layer, ffn[leaf]
    letter = {"out_proj": "o"}.get(leaf, leaf[0])
    cross = any(p in ("EncDecAttention", "encoder_attn") for p in parts)
    return layer, ("cross_" if cross else "") + letter


@pytest.mark.parametrize("name", list(MODELS))
def test_encoder_decoder_captures_with_its_sites_and_matches_peft(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    gm = _capture(name, copy.deepcopy(model))
    inputs = _inputs(name)
    with torch.no_grad():
        base, ref = gm(**inputs), model(**inputs, use_cache=False)
    assert "past_key_values" not in base.keys() and "cache" not in base.keys()
    assert_outputs_close(base, ref, rtol=RTOL)

    # Every attention and feed-forward linear is a site, with the role and layer its module path names.
    encoder_layers = model.config.num_layers if name == "t5" else model.config.encoder_layers
    sites = {s.path: (s.layer, s.role) for s in gm.sites()}
    linears = [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.search(r"\.\d+\.", p)]
    assert sites == {p: _expected_site(p, encoder_layers) for p in linears}
    assert {role for _, role in sites.values()} == {"q", "k", "v", "o", "cross_q", "cross_k", "cross_v", "cross_o", "ffn_in", "ffn_out"}

    # LoRA's default sites (q and v, self- and cross-attention) are the linears PEFT adapts for these names.
    targets = TARGETS.get(name, ["q_proj", "v_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules=targets,
                                                                          init_lora_weights=False)).eval()
    gm.add_adapter("lora", fxadapt.LoRAConfig(r=4, alpha=8), set_active=True)
    state = gm.adapter_state_dict("lora")
    copied = set()
    with torch.no_grad():
        for key, p in theirs.named_parameters():
            if "lora_" in key:
                path, param = key.removeprefix("base_model.model.").replace(".default", "").rsplit(".", 2)[:2]
                state[f"{path}.{param}"].copy_(p)
                copied.add(f"{path}.{param}")
    assert copied == set(state)
    assert any(_expected_site(k.rsplit(".", 1)[0], encoder_layers)[1].startswith("cross_") for k in copied)
    with torch.no_grad():
        # PeftModelForSeq2SeqLM passes input_ids=..., which Whisper does not take: call its LoraModel.
        want = (theirs.base_model if name == "whisper" else theirs)(**inputs, use_cache=False).logits
        ours = gm(**inputs).logits
    assert relative_error(want, ref.logits) > 100 * RTOL  # the adapter changes the logits: there is something to agree on
    assert_outputs_close(ours, want, rtol=RTOL)


def test_t5_model_captures_without_use_cache():
    """T5Model: its decoder stack keeps its own config, so only the use_cache argument turns its cache off."""
    torch.manual_seed(0)
    model = T.T5Model(T.T5Config(d_model=H, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4, vocab_size=100,
                                 decoder_start_token_id=0)).eval()
    gm = fxadapt.capture(model)
    inputs = _inputs("t5")
    with torch.no_grad():
        assert_outputs_close(gm(**inputs), model(**inputs, use_cache=False), rtol=RTOL)
        assert_outputs_close(gm(**inputs, use_cache=False), model(**inputs, use_cache=False), rtol=RTOL)
    with pytest.raises(fxadapt.InputError, match="use_cache=True"):
        gm(**inputs, use_cache=True)


def test_seq2seq_captured_with_labels_takes_calls_without_them():
    """Captured with labels and decoder_input_ids (as DataCollatorForSeq2Seq gives them): the loss is
    the model's, gradients reach the adapter, and calls without labels give loss None and the same logits."""
    torch.manual_seed(0)
    model = MODELS["bart"]().eval()
    inputs = _inputs("bart")
    labels = inputs["decoder_input_ids"].clone()
    labels[1, 3:] = -100
    gm = fxadapt.capture(model, example_kwargs={**_inputs("bart", seed=0), "labels": _inputs("bart", seed=0)["decoder_input_ids"]})
    assert gm._fx_inputs.optional == ("labels",)
    gm.add_adapter("lora", fxadapt.LoRAConfig(r=4, alpha=8, init_weights="bert"), set_active=True)
    out = gm(**inputs, labels=labels)
    with torch.no_grad():
        base = gm.merge_and_unload()(**inputs, labels=labels, use_cache=False)
    assert relative_error(out.loss, base.loss) < RTOL and relative_error(out.logits, base.logits) < RTOL
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gm.adapter_state_dict("lora").values())
    with torch.no_grad():
        plain = gm(**inputs)
    assert plain.loss is None and "loss" not in plain.keys()
    assert_outputs_close(plain.logits, out.logits.detach(), rtol=RTOL)
    # Captured with labels and no decoder_input_ids, the decoder reads the shifted labels: they stay required.
    example = {k: v for k, v in _inputs("bart", seed=0).items() if k != "decoder_input_ids"}
    shifted = fxadapt.capture(model, example_kwargs={**example, "labels": _inputs("bart", seed=0)["decoder_input_ids"]})
    assert shifted._fx_inputs.optional == ()
    with torch.no_grad():
        assert_outputs_close(shifted(**example, labels=labels), model(**example, labels=labels, use_cache=False), rtol=RTOL)
    with pytest.raises(fxadapt.InputError, match="needs input 'labels'"):
        shifted(**example)
