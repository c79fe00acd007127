"""More architectures than the issues name: parallel residual layers (GPT-J, Falcon), shared layers
(ALBERT), ALiBi with an interleaved fused projection (BLOOM), multi-query attention through a
transposed weight (Falcon). Every family of methods places, runs and trains on each."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import fxadapt
from conftest import restored
from fxadapt.config import ParBnConfig, PrefixTuningConfig, SeqBnConfig
from fxadapt.testing import assert_outputs_close

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


def _model(name):
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _inputs(model):
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module", params=list(MODELS))
def captured(request):
    model = _model(request.param)
    return request.param, model, fxadapt.capture(model)


def test_every_layer_has_attention_and_ffn_roles(captured):
    name, _, gm = captured
    roles = {(s.layer, s.role) for s in gm.sites()}
    for layer in (0, 1):
        if name != "albert":  # ALBERT's shared weights are one site each, seen in its last layer
            assert {(layer, r) for r in ("q", "k", "v", "o", "ffn_in", "ffn_out")} <= roles
    assert [(b.layer, b.location) for b in gm._fx_blocks] == [(0, "mh"), (0, "output"), (1, "mh"), (1, "output")]
    assert [a.layer for a in gm._fx_attentions] == [0, 1]


@pytest.mark.parametrize("method", list(CONFIGS))
def test_methods_change_the_output_and_train(captured, method):
    name, model, gm = captured
    inputs = _inputs(model)
    gm.add_adapter("m", CONFIGS[method])
    with restored(gm, "m"):
        gm.train_adapter("m")
        gm.eval()
        out = gm(**inputs)[0]
        with torch.no_grad():
            base = model(**inputs, **({"use_cache": False} if hasattr(model.config, "use_cache") else {}))[0]
        assert not torch.allclose(out * inputs["attention_mask"][..., None], base * inputs["attention_mask"][..., None])
        out.pow(2).mean().backward()
        params = gm._adapter_parameters("m")
        assert {id(p) for p in gm.parameters() if p.grad is not None} == {id(p) for p in params}


def test_zero_initialised_adapters_keep_the_base(captured):
    _, model, gm = captured
    inputs = _inputs(model)
    gm.add_adapter("z", fxadapt.ConfigUnion(ParBnConfig(), fxadapt.LoRAConfig(attn_matrices=["q", "k", "v", "o"])), set_active=True)
    with restored(gm, "z"):
        with torch.no_grad():
            expected = model(**inputs, **({"use_cache": False} if hasattr(model.config, "use_cache") else {}))
            assert_outputs_close(gm(**inputs), expected, mask=inputs["attention_mask"])


def test_shared_layers_get_an_adapter_each():
    gm = fxadapt.rewrite(_model("albert"), SeqBnConfig(init_weights="bert"))
    keys = sorted(k for k in gm.adapter_state_dict("pfeiffer") if k.endswith("adapter_up.weight"))
    assert keys == ["encoder.albert_layer_groups.0.albert_layers.0.ffn_output.layer0.adapter_up.weight",
                    "encoder.albert_layer_groups.0.albert_layers.0.ffn_output.layer1.adapter_up.weight"]


def test_parallel_residual_layers_adapt_the_sublayer_output():
    # GPT-J: x + attn(ln(x)) + mlp(ln(x)). A Houlsby adapter after the feed-forward projection turns
    # its output f into f + A(f) (AdapterHub's rule for layers whose residual comes in later).
    model = _model("gptj")
    gm = fxadapt.rewrite(model, fxadapt.DoubleSeqBnConfig(mh_adapter=False, init_weights="bert"), name="h")
    adapters = {p.block.layer: gm.get_submodule(p.module) for p in gm._fx_adapters["h"].placements}
    handles = []
    for i, layer in enumerate(model.h):
        def hook(module, args, output, a=adapters[i]):
            return output + (a.adapter_up(a.adapter_down(output)) * a.scaling)
        handles.append(layer.mlp.register_forward_hook(hook))
    inputs = _inputs(model)
    try:
        with torch.no_grad():
            assert_outputs_close(gm(**inputs), model(**inputs, use_cache=False), mask=inputs["attention_mask"])
    finally:
        for h in handles:
            h.remove()
