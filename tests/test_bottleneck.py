"""Bottleneck adapters (Pfeiffer, Houlsby, parallel, invertible, Compacter): placement around the
residual add and norm, training, and what they refuse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxadapt
from conftest import captured, inputs_for, reference, restored
from fxadapt.config import CompacterConfig, CompacterPlusPlusConfig, ParBnConfig
from fxadapt.methods.bottleneck import kronecker
from fxadapt.testing import assert_outputs_close, relative_error
from test_references import RTOL, adapter_weights, body_by_hand, randomise_

# hidden 32 in the tiny models: Compacter needs a bottleneck divisible by phm_dim 4.
METHODS = {
    "pfeiffer": "pfeiffer", "houlsby": "houlsby", "parallel": "parallel", "scaled_parallel": "scaled_parallel",
    "pfeiffer+inv": "pfeiffer+inv", "houlsby+inv": "houlsby+inv",
    "compacter": CompacterConfig(reduction_factor=8), "compacter++": CompacterPlusPlusConfig(reduction_factor=8),
}
TRAIN_ARCHS = ["bert", "roberta", "deberta-v2", "vit", "gpt2", "llama"]


class PostLN(nn.Module):
    """One post-LN transformer layer, written out: the reference for where adapters sit."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, adapters=None):
        b, s, d = x.shape
        q, k, v = (m(x).view(b, s, 2, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        h = self.o(a)
        x = adapters["mh"](h, x, self.ln1) if adapters and "mh" in adapters else self.ln1(h + x)
        h = self.down(nn.functional.gelu(self.up(x)))
        return adapters["output"](h, x, self.ln2) if adapters and "output" in adapters else self.ln2(h + x)


def test_pfeiffer_houlsby_parallel_formulas_on_a_post_ln_layer():
    torch.manual_seed(0)
    model = PostLN().eval()
    x = torch.randn(2, 5, 16)
    formulas = {  # AdapterHub's pre_forward / post_forward around LN(h + r), A the adapter body
        "pfeiffer": lambda a: (lambda h, r, ln: ln(a(ln(h + r)) + h + r)),
        "houlsby": lambda a: (lambda h, r, ln: ln(a(h) + h + r)),
        "parallel": lambda a: (lambda h, r, ln: ln(h + a(r) + r)),
    }
    for cid, formula in formulas.items():
        gm = fxadapt.rewrite(model, cid, example_inputs=(x,))
        gm.graph.lint()
        randomise_(gm, cid, std=0.3)
        w, config = adapter_weights(gm, cid), gm.adapters[cid]
        paths = {p.block.location: p.module.removesuffix(f".adapters.{cid}") for p in gm._fx_adapters[cid].placements}
        assert paths == ({"mh": "o", "output": "down"} if cid == "houlsby" else {"output": "down"})
        with torch.no_grad():
            expected = model(x, {loc: formula(body_by_hand(w, path, config)) for loc, path in paths.items()})
            assert_outputs_close(gm(x), expected, rtol=RTOL)
            assert relative_error(model(x), expected) > 100 * RTOL  # the adapter matters


def test_kronecker_is_torch_kron():
    a, b = torch.randn(3, 2, 4), torch.randn(3, 5, 3)
    for i in range(3):
        assert torch.equal(kronecker(a, b)[i], torch.kron(a[i], b[i]))  # the same products, no sum


@pytest.mark.parametrize("arch", TRAIN_ARCHS)
@pytest.mark.parametrize("method", list(METHODS))
def test_training_reaches_exactly_the_adapter(arch, method):
    model, gm = captured(arch)
    gm.add_adapter("bn", METHODS[method])
    with restored(gm, "bn"):
        gm.train_adapter("bn")
        inputs = inputs_for(model)
        torch.manual_seed(0)
        gm(**inputs)[0].float().pow(2).mean().backward()
        adapter = {id(p) for p in gm._adapter_parameters("bn")}
        with_grad = {id(p) for p in gm.parameters() if p.grad is not None}
        assert with_grad == adapter
        assert any(p.grad.abs().sum() > 0 for p in gm._adapter_parameters("bn"))
        gm.eval()
        with torch.no_grad():
            assert torch.equal(gm(**inputs)[0], gm(**inputs)[0])


def test_zero_initialised_parallel_adapter_is_the_base():
    # mam_adapter init zeroes the up projection: the output is exactly the base model's.
    for arch in ("bert", "llama"):
        model, gm = captured(arch)
        inputs = inputs_for(model)
        gm.add_adapter("par", "parallel", set_active=True)
        with restored(gm, "par"):
            assert_outputs_close(gm(**inputs), reference(model, inputs), rtol=RTOL, mask=inputs["attention_mask"])


def test_adapter_dropout_follows_train_and_eval():
    model, gm = captured("bert")
    gm.add_adapter("d", ParBnConfig(dropout=0.5, init_weights="bert"), set_active=True)
    with restored(gm, "d"):
        inputs = inputs_for(model)
        gm.train()
        torch.manual_seed(0)
        a = gm(**inputs)[0]
        gm.eval()
        assert torch.equal(gm(**inputs)[0], gm(**inputs)[0])
        assert relative_error(a, gm(**inputs)[0]) > 100 * RTOL


def test_bottleneck_adapters_refuse_to_merge():
    _, gm = captured("bert")
    gm.add_adapter("p", "pfeiffer", set_active=True)
    with restored(gm, "p"):
        with pytest.raises(fxadapt.MergeError, match="'p'.*cannot be merged"):
            gm.merge_adapter("p")
        assert gm.merged_adapters == []


def test_one_bottleneck_per_block_at_a_time():
    _, gm = captured("bert")
    gm.add_adapter("a", "pfeiffer", set_active=True)
    gm.add_adapter("b", "houlsby")
    with restored(gm, "a", "b", "l"):
        with pytest.raises(fxadapt.AdapterError, match="'a' and 'b' both put a bottleneck adapter at layer 0 \\(output\\)"):
            gm.set_active_adapters(["a", "b"])
        assert gm.active_adapters == ["a"]
        gm.set_active_adapters(["b"])  # one at a time is fine, and LoRA composes with either
        gm.add_adapter("l", "lora")
        gm.set_active_adapters(["b", "l"])


@pytest.mark.parametrize("config, field, value", [
    (fxadapt.config.SeqBnConfig(reduction_factor=5), "reduction_factor", 5),
    (CompacterConfig(reduction_factor=16), "phm_dim", 4),
])
def test_sizes_that_do_not_fit_name_the_field(config, field, value):
    _, gm = captured("bert")
    with pytest.raises(fxadapt.ConfigError, match=f"{field}={value}") as info:
        gm.add_adapter("x", config)
    assert info.value.field == field and "x" not in gm.adapters


@pytest.mark.parametrize("kwargs, field", [
    ({"non_linearity": "swishy"}, "non_linearity"), ({"reduction_factor": 0}, "reduction_factor"),
    ({"scaling": "big"}, "scaling"), ({"residual_before_ln": "before"}, "residual_before_ln"),
    ({"inv_adapter": "glow2"}, "inv_adapter"), ({"reduction_factor": {"0": 2}}, "reduction_factor"),
    ({"mh_adapter": False, "output_adapter": False}, "output_adapter"), ({"phm_dim": 0}, "phm_dim"),
])
def test_invalid_bottleneck_configs(kwargs, field):
    with pytest.raises(fxadapt.ConfigError, match=f"SeqBnConfig.{field} ") as info:
        fxadapt.config.SeqBnConfig(**kwargs)
    assert info.value.field == field


def test_per_layer_reduction_factor_and_leave_out():
    _, gm = captured("bert")
    gm.add_adapter("m", fxadapt.config.DoubleSeqBnConfig(reduction_factor={"1": 4, "default": 16}, leave_out=[0]))
    with restored(gm, "m"):
        shapes = {k: tuple(v.shape) for k, v in gm.adapter_state_dict("m").items() if k.endswith("adapter_up.weight")}
        assert shapes == {"encoder.layer.1.attention.output.dense.adapter_up.weight": (32, 8), "encoder.layer.1.output.dense.adapter_up.weight": (32, 8)}


def test_summary_architecture_column():
    _, gm = captured("bert")
    gm.add_adapter("pfeiffer", "pfeiffer")
    with restored(gm, "pfeiffer"):
        assert "pfeiffer                 bottleneck" in gm.adapter_summary()


def test_shared_phm_weights_equal_per_layer_copies():
    # shared_W_phm: one down / up weight for every layer. The same weights copied into every
    # layer's own PHM layers give the same function.
    model, gm = captured("bert")
    shared_cfg = CompacterPlusPlusConfig(reduction_factor=8, shared_W_phm=True, init_weights_seed=1)
    own_cfg = CompacterPlusPlusConfig(reduction_factor=8, init_weights_seed=2)
    gm.add_adapter("shared", shared_cfg)
    gm.add_adapter("own", own_cfg)
    with restored(gm, "shared", "own"):
        shared = gm.adapter_state_dict("shared")
        own = gm.adapter_state_dict("own")
        assert "shared_parameters.W_down_left" in shared and not any(".W_left" in k for k in shared)
        with torch.no_grad():
            for key, value in own.items():
                if key.startswith("shared_parameters."):
                    value.copy_(shared[key])
                elif ".W_" in key:
                    position = "down" if ".adapter_down." in key else "up"
                    value.copy_(shared[f"shared_parameters.W_{position}_{key.rsplit('_', 1)[1]}"])
                else:
                    value.copy_(shared[key])
        inputs = inputs_for(model)
        gm.set_active_adapters("shared")
        a = gm(**inputs)[0]
        gm.set_active_adapters("own")
        assert_outputs_close(gm(**inputs)[0], a, rtol=RTOL)
        gm.train_adapter("shared")
        gm(**inputs)[0].sum().backward()
        assert shared["shared_parameters.W_down_left"].grad is not None


def test_learn_phm_false_keeps_the_rule_frozen():
    _, gm = captured("bert")
    gm.add_adapter("c", CompacterConfig(reduction_factor=8, learn_phm=False))
    with restored(gm, "c"):
        gm.train_adapter("c")
        state = gm.adapter_state_dict("c")
        assert not state["shared_parameters.phm_rule"].requires_grad
        assert all(t.requires_grad for k, t in state.items() if "phm_rule" not in k)


def test_init_weights_seed_makes_initialisation_reproducible():
    _, gm = captured("bert")
    for name in ("a", "b"):
        gm.add_adapter(name, fxadapt.config.DoubleSeqBnInvConfig(init_weights_seed=7))
    with restored(gm, "a", "b"):
        a, b = gm.adapter_state_dict("a"), gm.adapter_state_dict("b")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not torch.equal(a["encoder.layer.0.output.dense.adapter_down.0.weight"], a["encoder.layer.1.output.dense.adapter_down.0.weight"])
