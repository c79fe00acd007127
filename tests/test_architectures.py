"""More architectures than the issues name: parallel residual layers (GPT-J, Falcon), shared layers
(ALBERT), ALiBi with an interleaved fused projection (BLOOM), multi-query attention through a
transposed weight (Falcon). Every family of methods places and trains on each; test_references.py
checks what each computes against hand-written references."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as T

import fxadapt
from conftest import restored
from fxadapt.config import ParBnConfig, PrefixTuningConfig, SeqBnConfig
from fxadapt.testing import assert_outputs_close, rounding_tolerance

H = 32
MODELS = {
    "gptj": lambda: T.GPTJModel(T.GPTJConfig(n_embd=H, n_layer=2, n_head=4, vocab_size=100, n_positions=64, rotary_dim=4)),
    "falcon": lambda: T.FalconModel(T.FalconConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)),
    "bloom": lambda: T.BloomModel(T.BloomConfig(hidden_size=H, n_layer=2, n_head=4, vocab_size=100)),
    "albert": lambda: T.AlbertModel(T.AlbertConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                                   vocab_size=100, embedding_size=16)),
    "mistral": lambda: T.MistralModel(T.MistralConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                      intermediate_size=64, vocab_size=100, max_position_embeddings=64)),
}
CONFIGS = {
    "lora": fxadapt.LoRAConfig(attn_matrices=["q", "k", "v", "o"], intermediate_lora=True, output_lora=True, init_weights="bert"),
    "houlsby+inv": "houlsby+inv",
    "parallel": ParBnConfig(init_weights="bert"),
    "prefix": PrefixTuningConfig(prefix_length=4, bottleneck_size=8),
    "unipelt": "unipelt",
}


def _inputs(model):
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@functools.lru_cache(maxsize=None)
def capture_of(name: str):
    """(name, model, capture) of one of MODELS, captured once per session (test_references shares it).
    Tests that add adapters delete them again."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    return name, model, fxadapt.capture(model)


@pytest.fixture(params=list(MODELS))
def captured(request):
    return capture_of(request.param)


def test_every_layer_has_attention_and_ffn_roles(captured):
    name, _, gm = captured
    roles = {(s.layer, s.role) for s in gm.sites()}
    for layer in (0, 1):
        if name != "albert":  # ALBERT's shared weights are one site each, seen in its last layer
            assert {(layer, r) for r in ("q", "k", "v", "o", "ffn_in", "ffn_out")} <= roles
    assert [(b.layer, b.location) for b in gm._fx_blocks] == [(0, "mh"), (0, "output"), (1, "mh"), (1, "output")]
    assert [a.layer for a in gm._fx_attentions] == [0, 1]


# What each method computes on these models is checked against hand-written references in
# test_references.py; here: training reaches exactly the adapter's parameters.
@pytest.mark.parametrize("method", list(CONFIGS))
def test_training_reaches_exactly_the_adapter(captured, method):
    _, model, gm = captured
    gm.add_adapter("m", CONFIGS[method])
    with restored(gm, "m"):
        gm.train_adapter("m")
        gm.eval()
        gm(**_inputs(model))[0].pow(2).mean().backward()
        params = gm._adapter_parameters("m")
        assert {id(p) for p in gm.parameters() if p.grad is not None} == {id(p) for p in params}
        assert any(p.grad.abs().sum() > 0 for p in params)  # zero-initialised parts (LoRA B, MAM up) pass none back


def test_zero_initialised_adapters_keep_the_base(captured):
    _, model, gm = captured
    inputs = _inputs(model)
    gm.add_adapter("z", fxadapt.ConfigUnion(ParBnConfig(), fxadapt.LoRAConfig(attn_matrices=["q", "k", "v", "o"])), set_active=True)
    with restored(gm, "z"):
        with torch.no_grad():
            expected = model(**inputs, **({"use_cache": False} if hasattr(model.config, "use_cache") else {}))
            # the same float32 sums in another order, reductions of up to 128 terms through two layers
            assert_outputs_close(gm(**inputs), expected, rtol=rounding_tolerance(torch.float32, 128, depth=2), mask=inputs["attention_mask"])


def test_shared_layers_get_an_adapter_each():
    _, _, gm = capture_of("albert")
    gm.add_adapter("pfeiffer", SeqBnConfig(init_weights="bert"))
    with restored(gm, "pfeiffer"):
        keys = sorted(k for k in gm.adapter_state_dict("pfeiffer") if k.endswith("adapter_up.weight"))
    assert keys == ["encoder.albert_layer_groups.0.albert_layers.0.ffn_output.layer0.adapter_up.weight",
                    "encoder.albert_layer_groups.0.albert_layers.0.ffn_output.layer1.adapter_up.weight"]
