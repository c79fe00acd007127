"""Prefix tuning, ConfigUnion, MAM and UniPELT: placement at every attention, gates and their
scores, folding the prefix MLP, and what unions refuse."""

from __future__ import annotations

import pytest
import torch

import fxadapt
from conftest import ARCHS, build, captured, inputs_for, restored
from fxadapt.config import ConfigUnion, IA3Config, LoRAConfig, MAMConfig, ParBnConfig, PrefixTuningConfig, SeqBnConfig, UniPELTConfig
from fxadapt.testing import assert_outputs_close, relative_error, rounding_tolerance

# The same float32 sums in another order, over reductions of up to 64 terms through two layers.
RTOL = rounding_tolerance(torch.float32, 64, depth=2)

SMALL = {
    "prefix": PrefixTuningConfig(prefix_length=5, bottleneck_size=16),
    "flat": PrefixTuningConfig(prefix_length=5, flat=True),
    "mam": MAMConfig(PrefixTuningConfig(prefix_length=4, bottleneck_size=16)),
    "unipelt": UniPELTConfig(PrefixTuningConfig(prefix_length=3, bottleneck_size=16, use_gating=True)),
}


# What prefix tuning computes is checked against AdapterHub's fixtures (BERT, RoBERTa, GPT-2, Llama,
# ViT, DeBERTa-v2) and hand-written references (test_references.py); here: training reaches exactly
# the adapter's parameters on every architecture.
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(SMALL))
def test_training_reaches_exactly_the_adapter(arch, method):
    model, gm = captured(arch)
    gm.add_adapter("pt", SMALL[method])
    with restored(gm, "pt"):
        gm.train_adapter("pt")
        torch.manual_seed(0)
        gm(**inputs_for(model))[0].float().pow(2).mean().backward()
        params = gm._adapter_parameters("pt")
        assert {id(p) for p in gm.parameters() if p.grad is not None} == {id(p) for p in params}
        assert any(p.grad.abs().sum() > 0 for p in params)  # zero-initialised parts (LoRA B, MAM up) pass none back


class OneLayer(torch.nn.Module):
    """A pre-LN attention block, written out: the reference for where the prefix goes."""

    def __init__(self, d: int = 16, heads: int = 4, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln = torch.nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x, prefix=None):
        b, s, d = x.shape
        h = self.ln(x)
        q, k, v = (m(h).view(b, s, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        if prefix is None:
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            k = torch.cat([prefix[0].expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([prefix[1].expand(b, -1, -1, -1), v], dim=2)
            p = prefix.shape[2]
            mask = torch.cat([torch.ones(s, p, dtype=torch.bool), torch.ones(s, s, dtype=torch.bool).tril()], -1) if self.causal else None
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.o(a.transpose(1, 2).reshape(b, s, d))


@pytest.mark.parametrize("causal", [False, True])
def test_prefix_matches_hand_written_attention(causal):
    torch.manual_seed(0)
    model = OneLayer(causal=causal).eval()
    x = torch.randn(2, 5, 16)
    gm = fxadapt.rewrite(model, PrefixTuningConfig(prefix_length=3, flat=True), example_inputs=(x,))
    gm.graph.lint()
    # AdapterHub's flat layout: (P, layers * 2, heads, head_dim), keys in slot 0 and values in slot 1.
    (flat,) = gm.adapter_state_dict("prefix_tuning").values()
    prefixes = flat.detach().view(3, 2, 4, 4).permute(1, 2, 0, 3)
    with torch.no_grad():
        expected, base = model(x, prefixes), model(x)
        assert_outputs_close(gm(x), expected, rtol=RTOL)
        assert relative_error(base, expected) > 100 * RTOL


def test_prefix_longer_than_the_position_limit():
    model, gm = captured("gpt2")  # n_positions = 64
    gm.add_adapter("long", PrefixTuningConfig(prefix_length=100, bottleneck_size=8), set_active=True)
    with restored(gm, "long"):
        with torch.no_grad():
            out = gm(**inputs_for(model, seq=60))
        assert out.last_hidden_state.shape == (3, 60, 32)


def test_causal_sdpa_without_a_mask_gets_the_same_prefix_attention():
    model = build("llama")
    ids = inputs_for(model, pad=False)["input_ids"]
    with_mask = fxadapt.capture(model)
    without = fxadapt.capture(model, example_kwargs={"input_ids": ids})
    for gm in (with_mask, without):
        gm.add_adapter("p", PrefixTuningConfig(prefix_length=3, flat=True, init_weights_seed=0), set_active=True)
    with torch.no_grad():
        without.get_submodule("prefix_tunings.p").control_trans.copy_(with_mask.get_submodule("prefix_tunings.p").control_trans)
        expected = with_mask(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert_outputs_close(without(input_ids=ids).logits, expected, rtol=RTOL)
        assert relative_error(model(input_ids=ids, use_cache=False).logits, expected) > 100 * RTOL  # the prefix matters


def test_eject_folds_the_mlp_into_flat_prefixes():
    model, gm = captured("deberta-v2")
    gm.add_adapter("pt", PrefixTuningConfig(prefix_length=6, bottleneck_size=16), set_active=True)
    with restored(gm, "pt", "l"):
        inputs = inputs_for(model)
        with torch.no_grad():
            before = gm(**inputs)[0]
            gm.eject_prefix_tuning("pt")
            after = gm(**inputs)[0]
        assert_outputs_close(after, before, rtol=RTOL)
        params = gm._adapter_parameters("pt")
        assert len(params) == 1 and params[0].numel() == 6 * 2 * 2 * 4 * 8  # P x layers x (k, v) x heads x head_dim
        with pytest.raises(fxadapt.AdapterError, match="no prefix tuning"):
            gm.add_adapter("l", "lora")
            gm.eject_prefix_tuning("l")


def test_gating_scores_are_reported_on_request_only():
    model, gm = captured("roberta")
    gm.add_adapter("u", SMALL["unipelt"], set_active=True)
    with restored(gm, "u"):
        inputs = inputs_for(model)
        with torch.no_grad():
            plain = gm(**inputs)
            scored = gm(**inputs, output_adapter_gating_scores=True)
        assert "adapter_gating_scores" not in plain
        torch.testing.assert_close(scored.last_hidden_state, plain.last_hidden_state, rtol=0, atol=0)
        scores = scored.adapter_gating_scores["u"]
        assert sorted(scores) == [0, 1]
        assert sorted(scores[0]) == ["output_adapter", "self_prefix", "selfattn_lora"]
        assert scores[0]["selfattn_lora"].shape == (3, 2)  # q and v gates, one column each
        assert scores[0]["self_prefix"].shape == (3,) and scores[0]["output_adapter"].shape == (3,)
        assert all(0 < v.min() and v.max() < 1 for layer in scores.values() for v in layer.values())


def test_union_errors_say_which():
    with pytest.raises(fxadapt.ConfigError, match="SeqBnConfig and ParBnConfig both put a bottleneck adapter at output"):
        ConfigUnion(SeqBnConfig(), ParBnConfig())
    with pytest.raises(fxadapt.ConfigError, match="PrefixTuningConfig and PrefixTuningConfig both put prefix_tuning"):
        ConfigUnion(PrefixTuningConfig(), PrefixTuningConfig(flat=True))
    with pytest.raises(fxadapt.ConfigError, match="IA3Config cannot gate"):
        ConfigUnion(LoRAConfig(), IA3Config(use_gating=True))
    ConfigUnion(LoRAConfig(attn_matrices=["q"]), LoRAConfig(attn_matrices=["v"]))  # different places: fine


def test_union_adapters_do_not_merge_and_summarise_as_union():
    _, gm = captured("bert")
    gm.add_adapter("mam", SMALL["mam"])
    with restored(gm, "mam"):
        assert "mam                      union" in gm.adapter_summary()
        with pytest.raises(fxadapt.MergeError):
            gm.merge_adapter("mam")


def test_one_prefix_per_attention_at_a_time():
    _, gm = captured("bert")
    gm.add_adapter("a", SMALL["prefix"], set_active=True)
    gm.add_adapter("b", SMALL["flat"])
    with restored(gm, "a", "b"):
        with pytest.raises(fxadapt.AdapterError, match="both put a prefix adapter"):
            gm.set_active_adapters(["a", "b"])


def test_compiles_whole_with_prefix_and_gates():
    import torch._dynamo
    model, gm = captured("bert")
    gm.add_adapter("u", SMALL["unipelt"], set_active=True)
    with restored(gm, "u"):
        inputs = inputs_for(model)
        torch._dynamo.reset()
        compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            assert_outputs_close(compiled(**inputs), gm(**inputs), rtol=RTOL)


def test_union_of_lora_and_bottleneck_on_the_same_projection():
    # LoRA on the feed-forward down projection and a Pfeiffer adapter closing the same block keep
    # separate weights (AdapterHub's containers: loras, adapters).
    model, gm = captured("bert")
    gm.add_adapter("u", ConfigUnion(LoRAConfig(selfattn_lora=False, output_lora=True, init_weights="bert"), SeqBnConfig()), set_active=True)
    with restored(gm, "u"):
        keys = sorted(k for k in gm.adapter_state_dict("u") if k.startswith("encoder.layer.0.output.dense."))
        assert keys == ["encoder.layer.0.output.dense.adapter_down.0.bias", "encoder.layer.0.output.dense.adapter_down.0.weight",
                        "encoder.layer.0.output.dense.adapter_up.bias", "encoder.layer.0.output.dense.adapter_up.weight",
                        "encoder.layer.0.output.dense.lora_A", "encoder.layer.0.output.dense.lora_B"]
        gm.train_adapter("u")
        gm(**inputs_for(model))[0].sum().backward()
        assert all(p.grad is not None for p in gm._adapter_parameters("u"))
