"""DoRA against PEFT 0.21 (LoraConfig(use_dora=True)) in the same process: same weights, same outputs and
gradients (PEFT detaches the weight norm: so must we), the same initial magnitude (PEFT's own update_layer)
and merged weights; merge equals the unmerged graph and resets bit for bit (AdapterHub 1.3.0 leaves the merged
weight in place); PEFT's format both ways; a fused projection's roles (GPT-2's c_attn) against PEFT's norm
function; export; parameter counts; bad fields named."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from peft.tuners.lora.dora import DoraLinearLayer

import fxadapt
from conftest import assert_inductor_step_matches_eager, build, captured, captured_one_layer, inputs_for, perturb_, restored
from fxadapt.config import AdapterConfig
from fxadapt.errors import CheckpointError, ConfigError
from fxadapt.passes.fuse import check_merged
from fxadapt.testing import assert_outputs_close, relative_error, rounding_tolerance

# The same function as PEFT's, summed in other orders at most: two layers of float32 sums of up to 64
# products (the norm sums 32 squares); gradients sum once more, over batch and sequence (3 x 11).
RTOL = rounding_tolerance(torch.float32, 64, depth=2)
GRAD_RTOL = rounding_tolerance(torch.float32, 64 * 33, depth=2)
# A merged weight: one product of rank r, a norm over 32 inputs and a product.
MERGE_RTOL = rounding_tolerance(torch.float32, 32, depth=3)
PROJECTIONS = [f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
OURS = {"lora_A.default.weight": "lora_A", "lora_B.default.weight": "lora_B", "lora_magnitude_vector.default.weight": "magnitude"}


def _pair(dropout: float = 0.0, dtype: torch.dtype = torch.float32):
    """BERT with our DoRA "x" (q, v) and PEFT's (query, value), PEFT's weights moved off their initial
    values (so that m / ||W + s B A|| is not 1) and copied into ours, keyed as our adapter_state_dict keys them."""
    model = build("bert").to(dtype)
    ours = fxadapt.capture(copy.deepcopy(model))
    ours.add_adapter("x", fxadapt.DoRAConfig(r=4, alpha=8, dropout=dropout), set_active=True)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(use_dora=True, r=4, lora_alpha=8, lora_dropout=dropout,
                                                                       target_modules=["query", "value"], init_lora_weights=False))
    theirs.eval()
    weights = {}
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            path, _, param = name.removeprefix("base_model.model.").partition(".lora_")
            weights[f"{path}.{OURS['lora_' + param]}"] = p
    perturb_(weights.values())
    state = ours.adapter_state_dict("x")
    assert sorted(state) == sorted(weights) and len(weights) == 12
    with torch.no_grad():
        for key, value in weights.items():
            assert state[key].shape == value.shape, key
            state[key].copy_(value)
    return model, ours, theirs, weights


def test_outputs_gradients_and_merged_weights_match_peft():
    model, ours, theirs, weights = _pair()
    ours.train_adapter("x")
    ours.eval()
    inputs = inputs_for(model, pad=False)
    with torch.no_grad():
        base = model(**inputs)[0]
    out_t, out_o = theirs(**inputs)[0], ours(**inputs)[0]
    assert relative_error(out_t, base) > 100 * RTOL  # PEFT's adapter acts: there is something to agree on
    assert_outputs_close(out_o, out_t, rtol=RTOL)
    out_t.pow(2).mean().backward()
    out_o.pow(2).mean().backward()
    grads = ours.adapter_state_dict("x")
    for key, p in weights.items():
        assert p.grad.abs().max() > 0, key
        assert_outputs_close(grads[key].grad, p.grad, rtol=GRAD_RTOL)
    assert all(p.grad is None for n, p in ours.named_parameters() if ".loras." not in n)

    # Merged: (m / ||W + s B A||)[:, None] * (W + s B A), as PEFT's merge.
    ours.merge_adapter("x")
    merged = theirs.merge_and_unload()
    for proj in PROJECTIONS:
        name = f"{proj}.weight"
        assert relative_error(merged.get_parameter(name), model.get_parameter(name)) > 100 * MERGE_RTOL
        assert_outputs_close(ours.get_parameter(name).detach(), merged.get_parameter(name).detach(), rtol=MERGE_RTOL)


def test_dropout_in_training_matches_peft():
    """With dropout, PEFT takes W dropout(x) for the base term (not y - b): in training mode, under one seed
    (the same masks: the model's own dropouts and the adapter's drawn in the same order), outputs and gradients."""
    model, ours, theirs, weights = _pair(dropout=0.3)
    ours.train_adapter("x")
    theirs.train()
    inputs = inputs_for(model, pad=False)
    torch.manual_seed(5)
    out_t = theirs(**inputs)[0]
    torch.manual_seed(5)
    out_o = ours(**inputs)[0]
    with torch.no_grad():
        ours.eval()
        assert relative_error(ours(**inputs)[0], out_t) > 100 * RTOL  # dropout acts
    assert_outputs_close(out_o, out_t, rtol=RTOL)
    out_t.pow(2).mean().backward()
    out_o.pow(2).mean().backward()
    grads = ours.adapter_state_dict("x")
    for key, p in weights.items():
        assert_outputs_close(grads[key].grad, p.grad, rtol=GRAD_RTOL)


def test_bf16_model_with_fp32_adapter_matches_peft():
    """A bf16 model: the adapter in float32 (PEFT's autocast_adapter_dtype, fxadapt's too), the input cast to
    it, the sum rounded to bf16 once. The same operations in the same dtypes as PEFT: a few bf16 roundings
    of the output apart at most."""
    model, ours, theirs, weights = _pair(dtype=torch.bfloat16)
    assert all(w.dtype == torch.float32 for w in ours.adapter_state_dict("x").values())
    inputs = inputs_for(model, pad=False)
    with torch.no_grad():
        out_t, out_o, base = theirs(**inputs)[0], ours(**inputs)[0], model(**inputs)[0]
    rtol = 2 * torch.finfo(torch.bfloat16).eps
    assert out_o.dtype == torch.bfloat16 and relative_error(out_t, base) > 4 * rtol
    assert_outputs_close(out_o, out_t, rtol=rtol)


def test_initial_magnitude_is_peft_update_layer():
    """A new adapter's magnitude is PEFT's (DoraLinearLayer.update_layer on the same base layer, A and B);
    with B = 0 (init_weights="lora") the adapter leaves the model as it is."""
    model, gm = captured("bert")
    with restored(gm, "x", "y"):
        gm.add_adapter("x", fxadapt.DoRAConfig(r=4, alpha=8, init_weights="bert"), set_active=True)  # B != 0
        for proj in PROJECTIONS:
            w = gm.get_submodule(f"{proj}.loras.x")
            layer = DoraLinearLayer(fan_in_fan_out=False)
            layer.update_layer(base_layer=model.get_submodule(proj), lora_A=w.lora_A.detach(), lora_B=w.lora_B.detach(), scaling=w.scaling)
            assert relative_error(w.magnitude, w.magnitude.new_ones(())) > 0.5  # a norm, not 1
            assert_outputs_close(w.magnitude.detach(), layer.weight.detach(), rtol=MERGE_RTOL)
        gm.delete_adapter("x")
        gm.add_adapter("y", fxadapt.DoRAConfig(r=4, alpha=8), set_active=True)
        inputs = inputs_for(model)
        with torch.no_grad():
            assert_outputs_close(gm(**inputs)[0], model(**inputs)[0], rtol=RTOL, mask=inputs["attention_mask"])
            perturb_([gm.get_submodule(f"{p}.loras.y").magnitude for p in PROJECTIONS])
            assert relative_error(gm(**inputs)[0], model(**inputs)[0]) > 100 * RTOL  # the magnitude acts


def test_merge_is_the_unmerged_graph_and_reset_is_bit_exact():
    """AdapterHub 1.3.0's DoRA reset leaves the merged weight in place; ours gives back every base weight bit for bit."""
    model, ours, _, _ = _pair()
    original = {k: v.detach().clone() for k, v in ours.named_parameters() if ".loras." not in k}
    inputs = inputs_for(model)
    with torch.no_grad():
        unmerged = ours(**inputs)
        ours.merge_adapter("x")
        check_merged(ours)  # no adapter node left: the base graph with other weights
        moved = [k for k, v in original.items() if not torch.equal(ours.get_parameter(k), v)]
        assert sorted(moved) == sorted(f"{p}.weight" for p in PROJECTIONS)  # biases stay
        assert_outputs_close(ours(**inputs), unmerged, rtol=RTOL, mask=inputs["attention_mask"])
        ours.reset_adapter()
        for k, v in original.items():
            assert torch.equal(ours.get_parameter(k), v), k
        assert_outputs_close(ours(**inputs), unmerged, rtol=0, atol=0, mask=inputs["attention_mask"])
        ours.set_active_adapters(None)
        assert_outputs_close(ours(**inputs), model(**inputs), rtol=0, atol=0, mask=inputs["attention_mask"])


def test_peft_format_both_ways(tmp_path):
    """A PEFT-saved DoRA loads with load_adapter (a DoRAConfig), and fxadapt's PEFT-format save loads with
    PeftModel.from_pretrained: the same outputs as PEFT each time, and the same tensors."""
    model, _, theirs, weights = _pair()
    inputs = inputs_for(model)
    with torch.no_grad():
        expected = theirs(**inputs)[0]
    theirs.save_pretrained(tmp_path / "peft")
    gm = fxadapt.capture(copy.deepcopy(model))
    name = gm.load_adapter(tmp_path / "peft", set_active=True)
    assert name == "dora" and type(gm.adapters[name]) is fxadapt.DoRAConfig
    with torch.no_grad():
        assert_outputs_close(gm(**inputs)[0], expected, rtol=RTOL, mask=inputs["attention_mask"])
    gm.save_adapter(tmp_path / "ours", name, format="peft")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_outputs_close(back(**inputs)[0], expected, rtol=RTOL, mask=inputs["attention_mask"])
    mine = {n.replace(".default", ""): p for n, p in back.named_parameters() if ".default" in n}
    for key, value in weights.items():
        path, param = key.rsplit(".", 1)
        theirs_key = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector.weight"}[param]
        assert torch.equal(mine[f"base_model.model.{path}.{theirs_key}"], value), key
    # fxadapt's own format keeps it too.
    gm.save_adapter(tmp_path / "native", name)
    again = fxadapt.capture(copy.deepcopy(model))
    assert again.load_adapter(tmp_path / "native", set_active=True) == name
    with torch.no_grad():
        assert_outputs_close(again(**inputs)[0], expected, rtol=RTOL, mask=inputs["attention_mask"])


def test_fused_projection_roles_on_gpt2(tmp_path):
    """GPT-2's c_attn (a Conv1D, x W + b, q k v side by side): DoRA on q and v, each role its own rows of W.
    Reference: the base model with each role's columns replaced by (m / n) (W + s B A), n by PEFT's
    get_weight_norm. k's columns stay; merge, reset; no PEFT form for a role."""
    model, gm = captured("gpt2")
    with restored(gm, "x"):
        torch.manual_seed(0)
        gm.add_adapter("x", fxadapt.DoRAConfig(r=2, alpha=4, init_weights="bert"), set_active=True)
        keys = sorted(gm.adapter_state_dict("x"))
        assert {k.split(".")[4] for k in keys} == {"q", "v"} and all(".c_attn." in k for k in keys)
        perturb_(v for k, v in gm.adapter_state_dict("x").items() if k.endswith("magnitude"))
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for layer in (0, 1):
                c_attn = reference.h[layer].attn.c_attn
                for role, cols in (("q", slice(0, 32)), ("v", slice(64, 96))):
                    w = gm.get_submodule(f"h.{layer}.attn.c_attn.loras.x.{role}")
                    W = c_attn.weight[:, cols].t()
                    lora_weight = w.lora_B @ w.lora_A
                    norm = DoraLinearLayer(fan_in_fan_out=False).get_weight_norm(W, lora_weight, w.scaling)
                    c_attn.weight[:, cols] = ((w.magnitude / norm)[:, None] * (W + w.scaling * lora_weight)).t()
        inputs = inputs_for(model)
        mask = inputs["attention_mask"]
        with torch.no_grad():
            expected, base, got = reference(**inputs, use_cache=False), model(**inputs, use_cache=False), gm(**inputs)
            assert relative_error(expected[0], base[0]) > 100 * RTOL
            assert_outputs_close(got[0], expected[0], rtol=RTOL, mask=mask)
            before = gm.get_parameter("h.0.attn.c_attn.weight").detach().clone()
            gm.merge_adapter("x")
            check_merged(gm)
            merged = gm.get_parameter("h.0.attn.c_attn.weight")
            assert torch.equal(merged[:, 32:64], before[:, 32:64])  # k untouched
            assert_outputs_close(merged.detach(), reference.h[0].attn.c_attn.weight.detach(), rtol=MERGE_RTOL)
            assert_outputs_close(gm(**inputs)[0], got[0], rtol=RTOL, mask=mask)
            gm.reset_adapter()
            assert torch.equal(gm.get_parameter("h.0.attn.c_attn.weight"), before)
        with pytest.raises(CheckpointError, match=r"DoRA on one role of the fused projection .*c_attn\[q\] has no PEFT form"):
            gm.save_adapter(tmp_path / "x", "x", format="peft")
        assert not (tmp_path / "x").exists()


@pytest.mark.usefixtures("fresh_dynamo")
def test_torch_export_with_dynamic_shapes_and_compile():
    model, gm = captured_one_layer("bert")
    with restored(gm, "x"):
        gm.add_adapter("x", fxadapt.DoRAConfig(r=2, alpha=4, init_weights="bert"), set_active=True)
        perturb_(gm.adapter_state_dict("x").values())
        bind = lambda **kw: gm._fx_inputs.bind(type(model).__name__, (), inputs_for(model, **kw))  # noqa: E731
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
        program = torch.export.export(gm, (), bind(), dynamic_shapes={k: {0: batch, 1: seq} for k in gm._fx_inputs.names}, strict=False)
        for b, s in ((1, 5), (4, 17)):
            inputs = bind(batch=b, seq=s)
            with torch.no_grad():
                got, want, base = program.module()(**inputs)[0], gm(**inputs)[0], model(**inputs)[0]
                assert relative_error(want, base) > 100 * RTOL
                assert_outputs_close(got, want, rtol=rounding_tolerance(torch.float32, 64))
        # Compiled whole, forward and backward (aot_eager: the graph-break check without inductor's minute here).
        gm.train_adapter("x")
        tol = rounding_tolerance(torch.float32, 64)
        assert_inductor_step_matches_eager(gm, inputs_for(model), rtol=tol, grad_rtol=tol, backend="aot_eager")



def test_summary_counts_peft_trainable_parameters():
    model, gm = captured("bert")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(use_dora=True, r=4, lora_alpha=8, target_modules=["query", "value"]))
    with restored(gm, "x"):
        gm.add_adapter("x", fxadapt.DoRAConfig(r=4, alpha=8))
        row = next(r for r in gm.adapter_summary(as_dict=True) if r["name"] == "x")
        assert row["architecture"] == "lora"
        assert row["params"] == theirs.get_nb_trainable_parameters()[0] == 2 * 2 * (4 * 32 + 32 * 4 + 32)


def test_config_ids_and_round_trip():
    config = fxadapt.DoRAConfig(r=4, alpha=2, leave_out=[1])
    assert config.method == "dora" and fxadapt.LoRAConfig(use_dora=True).method == "dora"
    assert fxadapt.CONFIGS["dora"] == fxadapt.DoRAConfig()
    assert AdapterConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("cls, fields, field, names", [
    (fxadapt.DoRAConfig, dict(composition_mode="scale", r=1), "composition_mode", "use_dora"),
    (fxadapt.LoRAConfig, dict(use_dora=True, composition_mode="scale", r=1), "composition_mode", "use_dora"),
    (fxadapt.DoRAConfig, dict(use_dora="yes"), "use_dora", "use_dora"),
    (fxadapt.DoRAConfig, dict(vera_d=0.1), "use_dora", "vera_d"),
    (fxadapt.DoRAConfig, dict(r=0), "r", "r"),
])
def test_bad_fields_are_named(cls, fields, field, names):
    with pytest.raises(ConfigError) as info:
        cls(**fields)
    assert info.value.field == field and field in str(info.value) and names in str(info.value)


def test_gated_dora_and_a_bad_peft_file_are_refused(tmp_path):
    _, gm = captured("bert")
    with restored(gm, "x"):
        with pytest.raises(ConfigError) as info:
            gm.add_adapter("x", fxadapt.DoRAConfig(use_gating=True))
        assert info.value.field == "use_gating" and "use_gating" in str(info.value) and "x" not in gm.adapters
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": "true", "target_modules": ["query"]}))
    with pytest.raises(CheckpointError, match="use_dora must be true or false"):
        gm.load_adapter(tmp_path)
