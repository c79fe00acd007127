"""VeRA against PEFT 0.21 in the same process: the same shared A and B (PEFT's draw from the same seed) and
the same d and b vectors give the same outputs and gradients, the same merged weights; merge equals the
unmerged graph and resets bit for bit; PEFT's format both ways (with and without the saved projections);
A and B stay frozen in training; export; bad fields named."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

import fxadapt
from conftest import assert_inductor_step_matches_eager, build, captured, captured_one_layer, inputs_for, perturb_, restored
from fxadapt.config import AdapterConfig
from fxadapt.errors import CheckpointError, ConfigError
from fxadapt.passes.fuse import check_merged
from fxadapt.testing import assert_outputs_close, assert_unchanged, relative_error, rounding_tolerance, snapshot

# The same function as PEFT's, built node for node in PEFT's order (sums may still be ordered otherwise):
# two layers of float32 sums of up to 64 products; gradients sum once more, over batch and sequence (3 x 11).
RTOL = rounding_tolerance(torch.float32, 64, depth=2)
GRAD_RTOL = rounding_tolerance(torch.float32, 64 * 33, depth=2)

# (id, our config, PEFT's target_modules). "mixed": projections 32 -> 32, 32 -> 64 and 64 -> 32, so that the
# shared A (4, 64) and B (64, 4) are sliced differently per projection.
CASES = {
    "qv": (dict(), ["query", "value"]),
    "mixed": (dict(selfattn_lora=False, targets=["query", "value", "intermediate.dense", "output.dense"]),
              ["query", "value", "intermediate.dense", "output.dense"]),
}
SEED = 3  # PEFT's projection_prng_key, our init_weights_seed


def _pair(case: str):
    """BERT with our VeRA "x" and PEFT's, the same A and B (drawn alike from SEED: checked, then copied
    anyway), and PEFT's d and b, moved off their initial values (b = 0 would hide everything), copied
    into ours. Returns the model, ours, PEFT's, and PEFT's tensors keyed as our adapter_state_dict."""
    fields, targets = CASES[case]
    model = build("bert")
    ours = fxadapt.capture(copy.deepcopy(model))
    ours.add_adapter("x", fxadapt.VeraConfig(r=4, alpha=4, init_weights_seed=SEED, **fields), set_active=True)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=4, target_modules=targets, d_initial=0.1,
                                                                         projection_prng_key=SEED))
    theirs.eval()
    weights = {}
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            path, param, adapter = name.removeprefix("base_model.model.").rsplit(".", 2)
            assert adapter == "default" and param in ("vera_lambda_d", "vera_lambda_b"), name
            weights[f"{path}.{param}"] = p
    perturb_(weights.values(), std=0.5)
    state = ours.adapter_state_dict("x")
    shared = {"shared_parameters.vera_A": theirs.base_model.vera_A["default"], "shared_parameters.vera_B": theirs.base_model.vera_B["default"]}
    for key, value in shared.items():
        assert torch.equal(state[key], value), key  # PEFT's draw from the same seed
    assert sorted(state) == sorted({**weights, **shared})
    with torch.no_grad():
        for key, value in {**weights, **shared}.items():
            state[key].copy_(value)
    return model, ours, theirs, weights


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_gradients_and_merged_weights_match_peft(case):
    model, ours, theirs, weights = _pair(case)
    ours.train_adapter("x")
    ours.eval()
    inputs = inputs_for(model, pad=False)
    with torch.no_grad():
        base = model(**inputs)[0]
    out_t, out_o = theirs(**inputs)[0], ours(**inputs)[0]
    assert relative_error(out_t, base) > 100 * RTOL  # PEFT's adapter acts: there is something to agree on
    assert_outputs_close(out_o, out_t, rtol=RTOL)
    probe = torch.randn(out_t.shape, generator=torch.Generator().manual_seed(0))  # a LayerNorm's output: its mean square is flat
    (out_t * probe).sum().backward()
    (out_o * probe).sum().backward()
    grads = ours.adapter_state_dict("x")
    for key, p in weights.items():
        assert p.grad.abs().max() > 0, key
        assert_outputs_close(grads[key].grad, p.grad, rtol=GRAD_RTOL)
    assert all(p.grad is None for n, p in ours.named_parameters() if ".loras." not in n)  # A, B and the model: none

    # Merged weights: W + diag(b) B diag(d) A, as PEFT's merge (sums of r products).
    ours.merge_adapter("x")
    merged = theirs.merge_and_unload()
    adapted = [n.removesuffix(".loras.x") for n, _ in ours.named_modules() if n.endswith(".loras.x")]
    assert len(adapted) == (4 if case == "qv" else 10)  # q, v, attention.output.dense, intermediate.dense, output.dense
    for path in adapted:
        assert_outputs_close(ours.get_parameter(path + ".weight").detach(), merged.get_parameter(path + ".weight").detach(),
                             rtol=rounding_tolerance(torch.float32, 4, depth=2))


def test_merge_is_the_unmerged_graph_and_reset_is_bit_exact():
    model, ours, _, _ = _pair("mixed")
    original = {k: v.detach().clone() for k, v in ours.named_parameters() if ".loras." not in k and "shared_parameters" not in k}
    inputs = inputs_for(model)
    with torch.no_grad():
        unmerged = ours(**inputs)
        ours.merge_adapter("x")
        check_merged(ours)  # no adapter node left: the base graph with other weights
        moved = [k for k, v in original.items() if not torch.equal(ours.get_parameter(k), v)]
        assert sorted(moved) == sorted(n.replace(".loras.x", ".weight") for n, _ in ours.named_modules() if n.endswith(".loras.x"))
        assert_outputs_close(ours(**inputs), unmerged, rtol=RTOL, mask=inputs["attention_mask"])
        ours.reset_adapter()
        for k, v in original.items():
            assert torch.equal(ours.get_parameter(k), v), k
        assert_outputs_close(ours(**inputs), unmerged, rtol=0, atol=0, mask=inputs["attention_mask"])


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_format_both_ways(save_projection, tmp_path):
    """A PEFT-saved adapter loads with load_adapter (A and B from the file, or drawn again from
    projection_prng_key), and fxadapt's PEFT-format save loads with PeftModel.from_pretrained: the same
    outputs as the other side each time, and the same tensors."""
    model, _, theirs, weights = _pair("mixed")
    theirs.peft_config["default"].save_projection = save_projection
    inputs = inputs_for(model)
    with torch.no_grad():
        expected = theirs(**inputs)[0]
    theirs.save_pretrained(tmp_path / "peft")
    gm = fxadapt.capture(copy.deepcopy(model))
    name = gm.load_adapter(tmp_path / "peft", set_active=True)
    assert name == "vera" and isinstance(gm.adapters[name], fxadapt.VeraConfig)
    state = gm.adapter_state_dict(name)
    assert torch.equal(state["shared_parameters.vera_A"], theirs.base_model.vera_A["default"])
    assert torch.equal(state["shared_parameters.vera_B"], theirs.base_model.vera_B["default"])
    with torch.no_grad():
        assert_outputs_close(gm(**inputs)[0], expected, rtol=RTOL, mask=inputs["attention_mask"])
    gm.save_adapter(tmp_path / "ours", name, format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_outputs_close(back(**inputs)[0], expected, rtol=RTOL, mask=inputs["attention_mask"])
    mine = {n.replace(".default", ""): p for n, p in back.named_parameters() if ".default" in n}
    for key, value in weights.items():
        assert torch.equal(mine[f"base_model.model.{key}"], value), key


def test_scaling_goes_into_b_in_peft_format(tmp_path):
    """alpha / r != 1 (AdapterHub's scaling, which PEFT lacks): written into PEFT's b, same outputs."""
    model = build("bert")
    gm = fxadapt.capture(copy.deepcopy(model))
    gm.add_adapter("x", fxadapt.VeraConfig(r=4, alpha=10, init_weights_seed=0), set_active=True)
    perturb_([t for k, t in gm.adapter_state_dict("x").items() if "vera_lambda" in k], std=0.5)
    inputs = inputs_for(model)
    with torch.no_grad():
        expected, base = gm(**inputs)[0], model(**inputs)[0]
    assert relative_error(expected, base) > 100 * RTOL
    gm.save_adapter(tmp_path / "ours", "x", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_outputs_close(back(**inputs)[0], expected, rtol=RTOL, mask=inputs["attention_mask"])


@pytest.mark.usefixtures("fresh_dynamo")
def test_torch_export_with_dynamic_shapes_and_compile():
    model, gm = captured_one_layer("bert")
    with restored(gm, "x"):
        gm.add_adapter("x", fxadapt.VeraConfig(r=4, init_weights_seed=0, intermediate_lora=True), set_active=True)
        perturb_([t for k, t in gm.adapter_state_dict("x").items() if "vera_lambda" in k], std=0.5)
        bind = lambda **kw: gm._fx_inputs.bind(type(model).__name__, (), inputs_for(model, **kw))  # noqa: E731
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
        program = torch.export.export(gm, (), bind(), dynamic_shapes={k: {0: batch, 1: seq} for k in gm._fx_inputs.names}, strict=False)
        for b, s in ((1, 5), (4, 17)):
            inputs = bind(batch=b, seq=s)
            with torch.no_grad():
                got, want = program.module()(**inputs)[0], gm(**inputs)[0]
                assert relative_error(want, model(**inputs)[0]) > 100 * RTOL
                assert_outputs_close(got, want, rtol=rounding_tolerance(torch.float32, 64))
        # Compiled whole, forward and backward (aot_eager: the graph-break check without inductor's minute here).
        gm.train_adapter("x")
        tol = rounding_tolerance(torch.float32, 64)
        assert_inductor_step_matches_eager(gm, inputs_for(model), rtol=tol, grad_rtol=tol, backend="aot_eager")



def test_summary_counts_and_default_init_is_the_base():
    """#Param: PEFT's trainable parameters (d and b) plus the shared frozen A and B, which AdapterHub's
    summary counts too (its shared_parameters); Train is 0 with them frozen, as AdapterHub's."""
    model, gm = captured("bert")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=4, target_modules=["query", "value"]))
    with restored(gm, "x"):
        gm.add_adapter("x", fxadapt.VeraConfig(r=4), set_active=True)
        state = gm.adapter_state_dict("x")
        frozen = state["shared_parameters.vera_A"].numel() + state["shared_parameters.vera_B"].numel()
        assert frozen == 4 * 32 + 32 * 4
        gm.train_adapter("x")
        row = next(r for r in gm.adapter_summary(as_dict=True) if r["name"] == "x")
        assert row["architecture"] == "lora" and not row["train"]
        assert row["params"] == theirs.get_nb_trainable_parameters()[0] + frozen
        gm.eval()
        inputs = inputs_for(model)
        with torch.no_grad():  # vera_b = 0: the adapter adds nothing
            assert_outputs_close(gm(**inputs)[0], model(**inputs)[0], rtol=0, atol=0, mask=inputs["attention_mask"])


def test_training_leaves_a_and_b_frozen():
    model, gm = captured("bert")
    with restored(gm, "x"):
        gm.add_adapter("x", fxadapt.VeraConfig(r=4, vera_b=0.5))
        gm.train_adapter("x")
        state = gm.adapter_state_dict("x")
        frozen = {k: v for k, v in state.items() if k.startswith("shared_parameters.")}
        trained = {k: v for k, v in state.items() if "vera_lambda" in k}
        assert len(frozen) == 2 and len(trained) == 8
        assert not any(v.requires_grad for v in frozen.values()) and all(v.requires_grad for v in trained.values())
        before = {k: v.detach().clone() for k, v in state.items()}
        optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
        out = gm(**inputs_for(model))[0]
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
        optimizer.step()
        assert all(v.grad is None and torch.equal(v, before[k]) for k, v in frozen.items())
        assert all(not torch.equal(v, before[k]) for k, v in trained.items())


def test_fused_projection_roles_on_gpt2(tmp_path):
    """GPT-2's c_attn (a Conv1D, x W + b, q k v side by side): VeRA on q and v only, A and B of the role
    widths. Reference: the base model with PEFT's delta weight, diag(b) B diag(d) A, added by hand."""
    model, gm = captured("gpt2")
    with restored(gm, "x"):
        gm.add_adapter("x", fxadapt.VeraConfig(r=2, alpha=2, vera_b=0.3, init_weights_seed=0), set_active=True)
        perturb_([t for k, t in gm.adapter_state_dict("x").items() if "vera_lambda" in k], std=0.5)
        shared = gm.get_submodule("shared_parameters.x")
        assert shared.vera_A.shape == (2, 32) and shared.vera_B.shape == (32, 2)
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for layer in (0, 1):
                for role, cols in (("q", slice(0, 32)), ("v", slice(64, 96))):
                    w = gm.get_submodule(f"h.{layer}.attn.c_attn.loras.x.{role}")
                    delta = (w.vera_lambda_b[:, None] * shared.vera_B) @ (w.vera_lambda_d[:, None] * shared.vera_A)
                    reference.h[layer].attn.c_attn.weight[:, cols] += delta.t()
        inputs = inputs_for(model)
        mask = inputs["attention_mask"]
        with torch.no_grad():
            expected, base, got = reference(**inputs, use_cache=False), model(**inputs, use_cache=False), gm(**inputs)
            assert relative_error(expected[0], base[0]) > 100 * RTOL
            assert_outputs_close(got[0], expected[0], rtol=RTOL, mask=mask)
            gm.merge_adapter("x")
            check_merged(gm)
            assert_outputs_close(gm(**inputs)[0], got[0], rtol=RTOL, mask=mask)
            gm.reset_adapter()
        with pytest.raises(CheckpointError, match=r"fused projection .*c_attn\[q\] has no PEFT form"):
            gm.save_adapter(tmp_path / "x", "x", format="peft")


@pytest.mark.parametrize("cls, fields, field", [
    (fxadapt.VeraConfig, dict(r=0), "r"),
    (fxadapt.VeraConfig, dict(vera_d=float("nan")), "vera_d"),
    (fxadapt.VeraConfig, dict(vera_b="0"), "vera_b"),
    (fxadapt.VeraConfig, dict(init_weights="gaussian"), "init_weights"),
    (fxadapt.VeraConfig, dict(composition_mode="scale", r=1), "composition_mode"),
    (fxadapt.VeraConfig, dict(use_dora=True), "use_dora"),
    (fxadapt.VeraConfig, dict(dropout=1.0), "dropout"),
    (fxadapt.VeraConfig, dict(init_weights_seed=2**64), "init_weights_seed"),
])
def test_bad_fields_are_named(cls, fields, field):
    with pytest.raises(ConfigError) as info:
        cls(**fields)
    assert info.value.field == field and field in str(info.value)


@pytest.mark.parametrize("config, field", [
    (fxadapt.LoRAConfig(vera_d=0.1), "vera_b"),  # a LoRA config that asks for VeRA needs both vectors
    (fxadapt.LoRAConfig(vera_b=0.0), "vera_d"),
    (fxadapt.VeraConfig(rank_pattern={"value": 2}), "rank_pattern"),  # one A and B of rank r for all
    (fxadapt.VeraConfig(use_gating=True), "use_gating"),
])
def test_configs_vera_cannot_serve_are_named_at_add_adapter(config, field):
    _, gm = captured("bert")
    before = dict(gm.named_parameters())
    with pytest.raises(ConfigError) as info:
        gm.add_adapter("x", config)
    assert info.value.field == field and field in str(info.value)
    assert "x" not in gm.adapters and dict(gm.named_parameters()) == before


def test_from_dict_round_trips_and_configs_id():
    config = fxadapt.VeraConfig(r=4, vera_d=0.2, leave_out=[1])
    assert AdapterConfig.from_dict(config.to_dict()) == config
    assert fxadapt.CONFIGS["vera"] == fxadapt.VeraConfig() and config.method == "vera"
    assert (fxadapt.VeraConfig().r, fxadapt.VeraConfig().vera_d, fxadapt.VeraConfig().vera_b) == (8, 0.1, 0.0)


@pytest.mark.parametrize("change, match", [
    (lambda meta, tensors: meta.update(r="4"), r"r must be an integer"),
    (lambda meta, tensors: meta.update(bias="all"), r"PEFT option bias='all' is not supported"),
    (lambda meta, tensors: meta.update(layers_to_transform=[0]), r"layers_to_transform=\[0\] is not supported"),
    (lambda meta, tensors: tensors.pop("base_model.vera_B"), r"has base_model.vera_A but not the other"),
    (lambda meta, tensors: tensors.update({"base_model.vera_A": tensors["base_model.vera_A"][:, :16].clone()}),
     r"vera_A has shape \(4, 16\)"),
])
def test_bad_peft_files_are_named(change, match, tmp_path):
    from safetensors.torch import load_file, save_file

    model, gm = captured("bert")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=4, target_modules=CASES["qv"][1], projection_prng_key=SEED))
    theirs.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    change(meta, tensors)
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    before = snapshot(gm)
    with pytest.raises(CheckpointError, match=match):
        gm.load_adapter(tmp_path)
    assert_unchanged(gm, before)


def test_native_format_and_deepcopy_keep_a_and_b(tmp_path):
    """fxadapt's own format saves A and B with the adapter (drawn from the global random state here: no
    seed); a deep copy merges with its own A and B (the weights' link to them is copied along)."""
    model, gm = captured("bert")
    with restored(gm, "x"):
        gm.add_adapter("x", "vera", set_active=True)
        perturb_([t for k, t in gm.adapter_state_dict("x").items() if "vera_lambda" in k], std=0.5)
        inputs = inputs_for(model)
        with torch.no_grad():
            expected = gm(**inputs)[0]
            assert relative_error(expected, model(**inputs)[0]) > 100 * RTOL
        gm.save_adapter(tmp_path, "x")
        other = fxadapt.capture(copy.deepcopy(model))
        other.load_adapter(tmp_path, set_active=True)
        twin = copy.deepcopy(gm)
        twin.merge_adapter("x")
        with torch.no_grad():
            assert_outputs_close(other(**inputs)[0], expected, rtol=0, atol=0)
            assert_outputs_close(twin(**inputs)[0], expected, rtol=RTOL, mask=inputs["attention_mask"])
