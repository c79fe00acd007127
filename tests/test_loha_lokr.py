"""LoHa and LoKr against PEFT 0.21 in the same process: same weights, same outputs and gradients, the
same merged weights and parameter counts; merge equals the unmerged graph and resets bit for bit; a fused
projection's roles (GPT-2's c_attn, which PEFT cannot adapt: Conv1D) against PEFT's own delta-weight
functions; compile and export; bad fields named."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.tuners.loha.layer import make_weight
from peft.tuners.lokr.layer import make_kron

import fxadapt
from conftest import build, captured, captured_one_layer, inputs_for, perturb_, restored
from fxadapt.config import AdapterConfig
from fxadapt.errors import ConfigError
from fxadapt.passes.fuse import check_merged
from fxadapt.testing import assert_outputs_close, relative_error, rounding_tolerance

# The same function as PEFT's (PEFT builds the delta weight the same way, but sums may be ordered otherwise):
# two layers of float32 sums of up to 64 products; gradients sum once more, over batch and sequence (3 x 11).
RTOL = rounding_tolerance(torch.float32, 64, depth=2)
GRAD_RTOL = rounding_tolerance(torch.float32, 64 * 33, depth=2)

# (id, our config class, PEFT's, fields both take). BERT's hidden 32 factors as 4 x 8: LoKr with r=4 keeps w2
# whole (r is not below 8 / 2), r=2 splits it into w2_a w2_b, decompose_both with r=1 splits w1 as well.
CASES = {
    "loha": (fxadapt.LoHaConfig, peft.LoHaConfig, dict(r=4, alpha=8)),
    "lokr": (fxadapt.LoKrConfig, peft.LoKrConfig, dict(r=4, alpha=8)),
    "lokr-w2ab": (fxadapt.LoKrConfig, peft.LoKrConfig, dict(r=2, alpha=3)),
    "lokr-both": (fxadapt.LoKrConfig, peft.LoKrConfig, dict(r=1, alpha=2, decompose_both=True)),
    "lokr-factor": (fxadapt.LoKrConfig, peft.LoKrConfig, dict(r=2, alpha=8, decompose_factor=2)),
}
PARAMS = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
          "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}


def _pair(case: str, init_weights=False):
    """BERT with our adapter "x" (q, v) and PEFT's (query, value), both with PEFT's random init, and
    PEFT's adapter tensors keyed as our adapter_state_dict keys them, copied into ours."""
    ours_cls, peft_cls, fields = CASES[case]
    model = build("bert")
    ours = fxadapt.capture(copy.deepcopy(model))
    ours.add_adapter("x", ours_cls(init_weights=init_weights, **fields), set_active=True)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft_cls(target_modules=["query", "value"], init_weights=init_weights, **fields))
    theirs.eval()
    weights = {}
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            path, param, adapter = name.removeprefix("base_model.model.").rsplit(".", 2)
            assert adapter == "default" and param in PARAMS[case[:4]], name
            weights[f"{path}.{param}"] = p
    state = ours.adapter_state_dict("x")
    assert sorted(state) == sorted(weights)
    with torch.no_grad():
        for key, value in weights.items():
            assert state[key].shape == value.shape, key
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
    out_t.pow(2).mean().backward()
    out_o.pow(2).mean().backward()
    grads = ours.adapter_state_dict("x")
    for key, p in weights.items():
        assert p.grad.abs().max() > 0, key
        assert_outputs_close(grads[key].grad, p.grad, rtol=GRAD_RTOL)
    assert all(p.grad is None for n, p in ours.named_parameters() if ".loras." not in n)

    # Merged weights: W + dW, as PEFT's merge (dW: sums of at most r products, then one more sum).
    ours.merge_adapter("x")
    merged = theirs.merge_and_unload()
    for layer in (0, 1):
        for proj in ("query", "value"):
            name = f"encoder.layer.{layer}.attention.self.{proj}.weight"
            assert_outputs_close(ours.get_parameter(name).detach(), merged.get_parameter(name).detach(),
                                 rtol=rounding_tolerance(torch.float32, 4, depth=2))


@pytest.mark.parametrize("case", ["loha", "lokr-w2ab"])
def test_merge_is_the_unmerged_graph_and_reset_is_bit_exact(case):
    model, ours, _, _ = _pair(case)
    original = {k: v.detach().clone() for k, v in ours.named_parameters() if ".loras." not in k}
    inputs = inputs_for(model)
    with torch.no_grad():
        unmerged = ours(**inputs)
        ours.merge_adapter("x")
        check_merged(ours)  # no adapter node left: the base graph with other weights
        moved = [k for k, v in original.items() if not torch.equal(ours.get_parameter(k), v)]
        assert sorted(moved) == sorted(f"encoder.layer.{i}.attention.self.{p}.weight" for i in (0, 1) for p in ("query", "value"))
        assert_outputs_close(ours(**inputs), unmerged, rtol=RTOL, mask=inputs["attention_mask"])
        ours.reset_adapter()
        for k, v in original.items():
            assert torch.equal(ours.get_parameter(k), v), k
        assert_outputs_close(ours(**inputs), unmerged, rtol=0, atol=0, mask=inputs["attention_mask"])


def _peft_delta(kind: str, w) -> torch.Tensor:
    """PEFT's own delta weight (out, in) of our weights module ``w``."""
    if kind == "loha":
        return make_weight(w.hada_w1_a, w.hada_w1_b, w.hada_w2_a, w.hada_w2_b, scale=torch.tensor(w.scaling))
    w1, w2 = w.factors()
    return make_kron(w1, w2, w.scaling)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_fused_projection_roles_on_gpt2(kind):
    """GPT-2's c_attn (a Conv1D, x W + b, q k v side by side): LoHa / LoKr on q and v only. Reference: the base
    model with PEFT's delta weight of each role added to that role's columns by hand."""
    model, gm = captured("gpt2")
    config = (fxadapt.LoHaConfig if kind == "loha" else fxadapt.LoKrConfig)(r=2, alpha=4, init_weights=False)
    with restored(gm, "x"):
        torch.manual_seed(0)
        gm.add_adapter("x", config, set_active=True)
        keys = sorted(gm.adapter_state_dict("x"))
        assert {k.split(".")[4] for k in keys} == {"q", "v"} and all(".c_attn." in k for k in keys)
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for layer in (0, 1):
                c_attn = reference.h[layer].attn.c_attn
                for role, cols in (("q", slice(0, 32)), ("v", slice(64, 96))):
                    w = gm.get_submodule(f"h.{layer}.attn.c_attn.loras.x.{role}")
                    c_attn.weight[:, cols] += _peft_delta(kind, w).t()
        inputs = inputs_for(model)
        mask = inputs["attention_mask"]
        with torch.no_grad():
            expected, base, got = reference(**inputs, use_cache=False), model(**inputs, use_cache=False), gm(**inputs)
            assert relative_error(expected[0], base[0]) > 100 * RTOL
            assert_outputs_close(got[0], expected[0], rtol=RTOL, mask=mask)
            before = gm.get_parameter("h.0.attn.c_attn.weight").detach().clone()
            gm.merge_adapter("x")
            check_merged(gm)
            assert torch.equal(gm.get_parameter("h.0.attn.c_attn.weight")[:, 32:64], before[:, 32:64])  # k untouched
            assert_outputs_close(gm(**inputs)[0], got[0], rtol=RTOL, mask=mask)
            gm.reset_adapter()
            assert torch.equal(gm.get_parameter("h.0.attn.c_attn.weight"), before)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
def test_lokr_inductor_step_matches_eager():
    """Inductor (one compilation, ~20 s) on a training step of one-layer BERT with LoKr (w2 = w2_a w2_b)."""
    from conftest import assert_inductor_step_matches_eager

    model, gm = captured_one_layer("bert")
    with restored(gm, "x"):
        gm.add_adapter("x", fxadapt.LoKrConfig(r=2, alpha=4), set_active=True)
        perturb_(gm.adapter_state_dict("x").values())
        gm.train_adapter("x")
        inputs = gm._fx_inputs.bind(type(model).__name__, (), inputs_for(model))
        assert_inductor_step_matches_eager(gm, inputs, rtol=rounding_tolerance(torch.float32, 64),
                                           grad_rtol=rounding_tolerance(torch.float32, 64 * 33, depth=2))


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_torch_export_with_dynamic_shapes(kind):
    model, gm = captured_one_layer("bert")
    config = (fxadapt.LoHaConfig if kind == "loha" else fxadapt.LoKrConfig)(r=2, alpha=4, init_weights=False)
    with restored(gm, "x"):
        torch.manual_seed(0)
        gm.add_adapter("x", config, set_active=True)
        bind = lambda **kw: gm._fx_inputs.bind(type(model).__name__, (), inputs_for(model, **kw))  # noqa: E731
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
        program = torch.export.export(gm, (), bind(), dynamic_shapes={k: {0: batch, 1: seq} for k in gm._fx_inputs.names}, strict=False)
        for b, s in ((1, 5), (4, 17)):
            inputs = bind(batch=b, seq=s)
            with torch.no_grad():
                assert_outputs_close(program.module()(**inputs)[0], gm(**inputs)[0], rtol=rounding_tolerance(torch.float32, 64))


@pytest.mark.parametrize("case", list(CASES))
def test_summary_counts_peft_trainable_parameters_and_default_init_is_the_base(case):
    ours_cls, peft_cls, fields = CASES[case]
    model, gm = captured("bert")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft_cls(target_modules=["query", "value"], **fields))
    with restored(gm, "x"):
        gm.add_adapter("x", ours_cls(**fields), set_active=True)
        row = next(r for r in gm.adapter_summary(as_dict=True) if r["name"] == "x")
        assert row["architecture"] == case[:4]
        assert row["params"] == theirs.get_nb_trainable_parameters()[0]
        inputs = inputs_for(model)
        with torch.no_grad():  # init_weights=True: one factor starts at zero, the adapter adds nothing
            assert_outputs_close(gm(**inputs)[0], model(**inputs)[0], rtol=RTOL, mask=inputs["attention_mask"])


def test_lokr_lycoris_init_zeroes_w2():
    _, gm = captured("bert")
    with restored(gm, "x"):
        gm.add_adapter("x", fxadapt.LoKrConfig(r=2, init_weights="lycoris"))
        state = gm.adapter_state_dict("x")
        assert all(v.abs().max() == 0 for k, v in state.items() if k.endswith("lokr_w2_b"))
        assert all(v.abs().max() > 0 for k, v in state.items() if not k.endswith("lokr_w2_b"))


@pytest.mark.parametrize("cls, fields, field", [
    (fxadapt.LoHaConfig, dict(r=0), "r"),
    (fxadapt.LoKrConfig, dict(r=0), "r"),
    (fxadapt.LoHaConfig, dict(alpha=float("inf")), "alpha"),
    (fxadapt.LoKrConfig, dict(alpha=float("nan")), "alpha"),
    (fxadapt.LoHaConfig, dict(rank_dropout=0.1), "rank_dropout"),
    (fxadapt.LoKrConfig, dict(module_dropout=0.5), "module_dropout"),
    (fxadapt.LoHaConfig, dict(init_weights="lycoris"), "init_weights"),
    (fxadapt.LoKrConfig, dict(init_weights="gaussian"), "init_weights"),
    (fxadapt.LoKrConfig, dict(decompose_factor=0), "decompose_factor"),
    (fxadapt.LoKrConfig, dict(decompose_both=1), "decompose_both"),
    (fxadapt.LoHaConfig, dict(attn_matrices=["x"]), "attn_matrices"),
    (fxadapt.LoKrConfig, dict(rank_pattern={"query": 0}), "rank_pattern"),
    (fxadapt.LoHaConfig, dict(selfattn_lora=False), "selfattn_lora"),
])
def test_bad_fields_are_named(cls, fields, field):
    with pytest.raises(ConfigError) as info:
        cls(**fields)
    assert info.value.field == field and field in str(info.value)


@pytest.mark.parametrize("cls", [fxadapt.LoHaConfig, fxadapt.LoKrConfig])
def test_from_dict_round_trips_and_names_unknown_fields(cls):
    config = cls(r=4, alpha=2, rank_pattern={"value": 2}, leave_out=[1])
    assert AdapterConfig.from_dict(config.to_dict()) == config
    assert fxadapt.CONFIGS[cls.method] == cls() and config.method == cls.method
    with pytest.raises(ConfigError) as info:
        AdapterConfig.from_dict({**config.to_dict(), "use_effective_conv2d": True})
    assert info.value.field == "use_effective_conv2d"


@pytest.mark.parametrize("case", ["loha", "lokr-w2ab"])
def test_peft_format_both_ways(case, tmp_path):
    """A PEFT-saved adapter loads with load_adapter, and fxadapt's PEFT-format save loads with
    PeftModel.from_pretrained: the same outputs as the other side each time, and the same tensors."""
    model, ours, theirs, weights = _pair(case)
    perturb_(weights.values())  # not PEFT's init: every tensor carries something
    inputs = inputs_for(model)
    with torch.no_grad():
        expected = theirs(**inputs)[0]
    theirs.save_pretrained(tmp_path / "peft")
    gm = fxadapt.capture(copy.deepcopy(model))
    name = gm.load_adapter(tmp_path / "peft", set_active=True)
    assert name == case[:4] and type(gm.adapters[name]).__name__ == type(CASES[case][1]()).__name__
    with torch.no_grad():
        assert_outputs_close(gm(**inputs)[0], expected, rtol=RTOL, mask=inputs["attention_mask"])
    gm.save_adapter(tmp_path / "ours", name, format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_outputs_close(back(**inputs)[0], expected, rtol=RTOL, mask=inputs["attention_mask"])
    mine = {n.replace(".default", ""): p for n, p in back.named_parameters() if ".default" in n}
    for key, value in weights.items():
        assert torch.equal(mine[f"base_model.model.{key}"], value), key


def test_a_role_of_a_fused_projection_has_no_peft_form(tmp_path):
    _, gm = captured("gpt2")
    with restored(gm, "x"):
        gm.add_adapter("x", fxadapt.LoHaConfig(r=2))
        with pytest.raises(fxadapt.CheckpointError, match=r"fused projection .*c_attn\[q\] has no PEFT form"):
            gm.save_adapter(tmp_path / "x", "x", format="peft")
        assert not (tmp_path / "x").exists()
