"""merge_and_unload: the original model class with the active adapters merged, a copy by default."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import fxadapt
from conftest import build, first_tensor, inputs_for, masked, perturb_
from fxadapt.testing import assert_outputs_close, rounding_tolerance

MERGEABLE = ["bert", "gpt2", "llama"]  # plain linear, Conv1D (addmm, transposed), a causal LM
# Merged weights W + s*BA and diag(l) W are rounded once more than the unmerged sums: two layers of
# float32 sums of up to 64 products.
RTOL = rounding_tolerance(torch.float32, 64, depth=2)


def perturb_adapters(gm, seed: int = 0) -> None:
    perturb_([p for name in gm.adapters for p in gm.adapter_state_dict(name).values()], seed=seed)


def adapted(arch: str):
    """A fresh model and its capture with LoRA (q, v, ffn) and (IA)^3 active, weights moved off init."""
    model = build(arch)
    gm = fxadapt.capture(model)
    gm.add_adapter("lora", fxadapt.LoRAConfig(r=4, alpha=8, intermediate_lora=True, output_lora=True), set_active=True)
    gm.add_adapter("ia3", "ia3", set_active=True)
    perturb_adapters(gm)
    return model, gm.eval()


def out(module, x):
    with torch.no_grad():
        return masked(module(**x, **({"use_cache": False} if hasattr(module, "config") and hasattr(module.config, "use_cache") else {})), x)


@pytest.mark.parametrize("arch", MERGEABLE)
def test_copy_is_the_original_class_with_the_adapted_outputs(arch):
    model, gm = adapted(arch)
    before = {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    x = inputs_for(model)
    want = out(gm, x)
    plain = gm.merge_and_unload()
    assert type(plain) is type(model) and plain is not model
    assert_outputs_close(out(plain.eval(), x), want, rtol=RTOL)
    # the user's model: the same parameter objects, the same values; it still computes the base function
    for k, v in model.state_dict(keep_vars=True).items():
        assert v is before[k][0] and torch.equal(v, before[k][1]), k
    assert not torch.allclose(out(model, x), want)
    # the module is as it was: same adapters, active and unmerged, same outputs
    assert gm.active_adapters == ["lora", "ia3"] and gm.merged_adapters == []
    assert_outputs_close(out(gm, x), want, rtol=0, atol=0)
    # the copy shares no tensor with the model
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not model_ptrs & {p.data_ptr() for p in plain.parameters()}


def test_inplace_writes_into_the_model_and_unloads_the_module():
    model, gm = adapted("bert")
    gm.add_adapter("idle", "pfeiffer")  # inactive: left out, and stays on the module
    perturb_(gm.adapter_state_dict("idle").values(), seed=1)
    x = inputs_for(model)
    want = out(gm, x)
    params = dict(model.named_parameters())
    assert gm.merge_and_unload(inplace=True) is model
    assert dict(model.named_parameters()) == params  # the same Parameter objects, new values
    assert_outputs_close(out(model, x), want, rtol=RTOL)
    assert list(gm.adapters) == ["idle"] and gm.active_adapters == [] and gm.merged_adapters == []
    assert_outputs_close(out(gm, x), want, rtol=RTOL)
    # The module goes on working on the merged weights: the idle adapter acts on them as it would on a
    # fresh capture of the merged model with the same adapter weights.
    gm.set_active_adapters("idle")
    oracle = fxadapt.capture(model)
    oracle.add_adapter("idle", "pfeiffer", set_active=True)
    with torch.no_grad():
        for k, v in oracle.adapter_state_dict("idle").items():
            v.copy_(gm.adapter_state_dict("idle")[k])
    got = out(gm, x)
    assert not torch.allclose(got, want)
    assert_outputs_close(got, out(oracle, x), rtol=0, atol=0)


def test_already_merged_adapters_are_included():
    model, gm = adapted("bert")
    x = inputs_for(model)
    want = out(gm, x)
    gm.merge_adapter("lora")
    plain = gm.merge_and_unload()
    assert_outputs_close(out(plain.eval(), x), want, rtol=RTOL)
    assert gm.merged_adapters == ["lora"]


def test_an_active_adapter_that_cannot_merge_is_refused_and_nothing_changes():
    model, gm = adapted("bert")
    gm.add_adapter("bottleneck", "pfeiffer", set_active=True)
    x = inputs_for(model)
    want, base = out(gm, x), out(model, x)
    with pytest.raises(fxadapt.MergeError, match="'bottleneck'.*set_active_adapters"):
        gm.merge_and_unload()
    with pytest.raises(fxadapt.MergeError, match="'bottleneck'.*set_active_adapters"):
        gm.merge_and_unload(inplace=True)
    assert gm.active_adapters == ["lora", "ia3", "bottleneck"] and gm.merged_adapters == []
    assert_outputs_close(out(gm, x), want, rtol=0, atol=0)
    assert_outputs_close(out(model, x), base, rtol=0, atol=0)


def test_a_module_whose_weights_are_not_the_models_is_refused():
    model, gm = adapted("bert")
    gm.__dict__["_fx_source"] = build("bert", seed=1)  # another model: its parameters are not the graph's
    with pytest.raises(fxadapt.MergeError, match="no longer"):
        gm.merge_and_unload()
    assert gm.merged_adapters == [] and gm.active_adapters == ["lora", "ia3"]
    del gm.__dict__["_fx_source"]
    with pytest.raises(fxadapt.MergeError, match="no reference"):
        gm.merge_and_unload()


def test_save_pretrained_round_trip(tmp_path):
    model, gm = adapted("roberta")
    x = inputs_for(model)
    want = out(gm, x)
    gm.merge_and_unload().save_pretrained(tmp_path)
    loaded = T.AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is T.RobertaModel
    with torch.no_grad():
        assert_outputs_close(first_tensor(loaded(**x)) * x["attention_mask"][..., None], want, rtol=RTOL)


def test_symbolic_trace_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(r=2, targets=["0", "2"], selfattn_lora=False, init_weights="bert"))
    x = torch.randn(3, 4)
    plain = gm.merge_and_unload()
    assert type(plain) is torch.nn.Sequential
    assert not torch.allclose(plain(x), model(x))
    assert_outputs_close(plain(x), gm(x), rtol=rounding_tolerance(torch.float32, 8, depth=2))
