"""Adapter arithmetic (``average_adapter``'s ``combine_strategy``) against its oracles: AdapterHub 1.3.0's
own averages of two saved LoRA adapters (tests/fixtures/adapterhub/roberta/average_*, made by
tests/fixtures/make_average_fixtures.py) and PEFT 0.21's ``add_weighted_adapter`` in the same process on
the same weights; task arithmetic on merged weights; bad arguments."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import fxadapt
from conftest import build, copy_peft_lora, inputs_for
from fxadapt.errors import AdapterError, ConfigError
from fxadapt.naming import state_key
from fxadapt.testing import assert_outputs_close, assert_unchanged, relative_error, rounding_tolerance, snapshot

HUB = Path(__file__).parent / "fixtures" / "adapterhub" / "roberta"
# AdapterHub ran on transformers 4.57 (another graph): float32 rounding over the hidden width, two layers.
HUB_RTOL = rounding_tolerance(torch.float32, 128, depth=2)
# Factors computed by the same formula in another order of sums (two to four terms, or a rank-8 product).
FACTOR_RTOL = rounding_tolerance(torch.float32, 8)
# Two layers of sums over the hidden width 32 (tests/conftest.py's models), one merged weight rounded once more.
RTOL = rounding_tolerance(torch.float32, 32, depth=2)


def products(gm, name: str) -> dict[str, torch.Tensor]:
    """Each site's ``scaling * B A`` of adapter ``name``."""
    return {state_key(p.module, name): gm.get_submodule(p.module).delta() for p in gm._fx_adapters[name].placements}


# -- AdapterHub's strategies -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub():
    model = T.AutoModel.from_pretrained(HUB / "base").eval()
    gm = fxadapt.capture(model)
    for name in ("a", "b"):
        gm.load_adapter(HUB / f"average_{name}", name)
    return gm


@pytest.mark.parametrize("case", ["linear", "lora_linear_only_negate_b", "lora_delta_w_svd"])
def test_adapterhub_strategies_match_adapterhub(hub, case):
    directory = HUB / f"average_{case}"
    meta, io = json.loads((directory / "meta.json").read_text()), load_file(directory / "io.safetensors")
    kwargs = {k: meta[k] for k in ("weights", "normalize_weights", "combine_strategy", "svd_rank") if k in meta}
    hub.average_adapter("ours", ["a", "b"], **kwargs, set_active=True)
    theirs = hub.load_adapter(directory, "theirs")
    try:
        assert hub.adapters["ours"] == hub.adapters["theirs"]  # r = svd_rank, alpha kept
        ours_state, their_state = hub.adapter_state_dict("ours"), hub.adapter_state_dict(theirs)
        if case != "lora_delta_w_svd":  # A and B themselves
            errors = [relative_error(ours_state[k], their_state[k]) for k in their_state]
        else:  # singular vectors are defined up to sign: their products
            mine, other = products(hub, "ours"), products(hub, theirs)
            errors = [relative_error(mine[k], other[k]) for k in other]
        assert max(errors) <= FACTOR_RTOL, errors
        mask = io["attention_mask"][..., None]
        with torch.no_grad():
            out = hub(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state
        assert relative_error(io["last_hidden_state"] * mask, io["base_last_hidden_state"] * mask) > 1e-3  # the adapter acts
        assert_outputs_close(out * mask, io["last_hidden_state"] * mask, rtol=HUB_RTOL)
    finally:
        hub.delete_adapter("ours")
        hub.delete_adapter(theirs)


def test_negate_b_and_cat_on_merged_weights(hub):
    """On the merged weights: ``lora_linear_only_negate_b`` with ``[-1]`` is ``W - dW`` exactly, with ``[1, -1]``
    it is ``W + (B_a - B_b)(A_a + A_b) s`` (cross terms: no task arithmetic); ``cat`` with ``[1, -1]`` is
    ``W + dW_a - dW_b``."""
    path = "encoder.layer.1.attention.self.value.weight"
    base = hub.get_parameter(path).detach().clone()
    state = hub.adapter_state_dict

    def merged(name: str) -> torch.Tensor:
        hub.merge_adapter(name)
        try:
            return hub.get_parameter(path).detach().clone()
        finally:
            hub.reset_adapter(name)
            hub.delete_adapter(name)

    key = "encoder.layer.1.attention.self.value"
    a_, b_ = (products(hub, n)[key] for n in ("a", "b"))
    A = {n: state(n)[f"{key}.lora_A"].detach() for n in "ab"}
    B = {n: state(n)[f"{key}.lora_B"].detach() for n in "ab"}
    scaling = hub.adapters["a"].scaling
    hub.average_adapter("neg", ["a"], [-1.0], normalize_weights=False, combine_strategy="lora_linear_only_negate_b")
    hub.average_adapter("zhang", ["a", "b"], [1.0, -1.0], normalize_weights=False, combine_strategy="lora_linear_only_negate_b")
    hub.average_adapter("diff", ["a", "b"], [1.0, -1.0], normalize_weights=False, combine_strategy="cat")
    assert hub.adapters["diff"].r == 8 and hub.adapters["diff"].alpha == 8  # the sum of the ranks, scaling 1
    tol = rounding_tolerance(torch.float32, 8)
    assert relative_error(merged("neg") - base, -a_) <= tol
    zhang = (B["a"] - B["b"]) @ (A["a"] + A["b"]) * scaling
    assert relative_error(merged("zhang") - base, zhang) <= tol
    diff = merged("diff") - base
    assert relative_error(diff, a_ - b_) <= tol  # task arithmetic, exactly up to rounding
    assert relative_error(zhang, a_ - b_) > 0.1  # what negate_b gives on two adapters is something else


# -- PEFT's combination types ------------------------------------------------------------------------------

PEFT_CASES = [("cat", {}), ("svd", {}), ("svd", {"svd_rank": 2}), ("ties", {"density": 0.5}),
              ("ties", {"density": 0.3, "majority_sign_method": "frequency"}), ("dare_linear", {"density": 0.6}),
              ("dare_ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.4}), ("dare_ties_svd", {"density": 0.5})]


@pytest.fixture(scope="module")
def pair():
    """PEFT's and fxadapt's roberta with the same two LoRA adapters (ranks 4, alphas 8 and 12)."""
    model = build("roberta")
    ours = fxadapt.capture(copy.deepcopy(model))
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False),
                                 adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=12, target_modules=["query", "value"], init_lora_weights=False))
    theirs.eval()
    for name, alpha in (("a", 8), ("b", 12)):
        ours.add_adapter(name, fxadapt.LoRAConfig(r=4, alpha=alpha))
    copy_peft_lora(theirs, ours)
    return theirs, ours


def peft_state(theirs, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in theirs.named_parameters():
        if f".{name}." in n and ".lora_" in n:
            path, which = n.removeprefix("base_model.model.").split(".lora_")
            out[f"{path}.lora_{which.split('.')[0]}"] = p.detach()
    return out


@pytest.mark.parametrize("strategy, kwargs", PEFT_CASES, ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(map(str, v.values())))
def test_peft_combination_types_match_add_weighted_adapter(pair, strategy, kwargs, monkeypatch):
    theirs, ours = pair
    weights = [0.7, -0.4]
    # DARE's masks: PEFT draws them with torch.bernoulli after its new adapter's random initialisation has
    # moved the global generator, so no seed reproduces them; record PEFT's and hand them to ours in
    # order (same count, same shapes: the same draws in the same order).
    masks, bernoulli = [], torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda p: masks.append(bernoulli(p)) or masks[-1])
    theirs.add_weighted_adapter(["a", "b"], weights, "m", combination_type=strategy, **kwargs)
    monkeypatch.setattr(torch, "bernoulli", lambda p: masks.pop(0) if masks[0].shape == p.shape else pytest.fail("mask shape"))
    try:
        ours.average_adapter("m", ["a", "b"], weights, normalize_weights=False, combine_strategy=strategy, **kwargs)
        monkeypatch.undo()
        assert not masks  # as many draws as PEFT's
        mine, other = ours.adapter_state_dict("m"), peft_state(theirs, "m")
        assert sorted(mine) == sorted(other)
        if "svd" in strategy:  # singular vectors up to sign: compare the products (scaling 1 on both sides)
            errors = [relative_error(mine[k.replace("_A", "_B")] @ mine[k], other[k.replace("_A", "_B")] @ other[k])
                      for k in other if k.endswith("lora_A")]
        else:
            errors = [relative_error(mine[k], other[k]) for k in other]
        assert max(errors) <= FACTOR_RTOL, errors
        assert ours.adapters["m"].scaling_for("encoder.layer.0.attention.self.query") == 1.0
        inputs = inputs_for(theirs.base_model.model)
        theirs.set_adapter("m")
        ours.set_active_adapters("m")
        with torch.no_grad():
            assert_outputs_close(ours(**inputs)[0], theirs(**inputs)[0], rtol=RTOL)
    finally:
        ours.set_active_adapters(None)
        if "m" in ours.adapters:
            ours.delete_adapter("m")
        theirs.set_adapter("a")
        theirs.delete_adapter("m")


def test_dare_draws_from_seed_without_moving_the_global_generator(pair):
    _, ours = pair
    state = torch.random.get_rng_state()
    for name in ("x", "y"):
        ours.average_adapter(name, ["a", "b"], combine_strategy="dare_linear", density=0.5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    x, y = ours.adapter_state_dict("x"), ours.adapter_state_dict("y")
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert any((x[k] == 0).any() for k in x)  # something was dropped
    ours.delete_adapter("x")
    ours.delete_adapter("y")


# -- bad input -------------------------------------------------------------------------------------------


def test_bad_arguments_name_the_field_and_change_nothing(pair):
    _, ours = pair
    ours.add_adapter("ia3", "ia3")
    ours.add_adapter("wide", fxadapt.LoRAConfig(r=4, alpha=8, intermediate_lora=True))
    before = snapshot(ours)
    cases = [
        (dict(combine_strategy="mean"), ConfigError, "combine_strategy"),
        (dict(combine_strategy="ties"), ConfigError, "density"),
        (dict(combine_strategy="ties", density=1.5), ConfigError, "density"),
        (dict(combine_strategy="dare_linear", density=0), ConfigError, "density"),
        (dict(combine_strategy="linear", density=0.5), ConfigError, "density"),
        (dict(combine_strategy="lora_delta_w_svd"), ConfigError, "svd_rank"),
        (dict(combine_strategy="svd", svd_rank=0), ConfigError, "svd_rank"),
        (dict(combine_strategy="svd", svd_rank=33), ConfigError, "svd_rank"),  # more than the hidden size
        (dict(combine_strategy="cat", svd_rank=2), ConfigError, "svd_rank"),
        (dict(combine_strategy="ties", density=0.5, majority_sign_method="most"), ConfigError, "majority_sign_method"),
    ]
    for kwargs, error, field in cases:
        with pytest.raises(error) as e:
            ours.average_adapter("m", ["a", "b"], **kwargs)
        assert e.value.field == field, kwargs
        assert_unchanged(ours, before)
    with pytest.raises(AdapterError, match="'ia3' is a IA3Config"):
        ours.average_adapter("m", ["a", "ia3"], combine_strategy="cat")
    with pytest.raises(AdapterError, match=r"differ in \['intermediate_lora'\]"):
        ours.average_adapter("m", ["a", "wide"], combine_strategy="cat")
    with pytest.raises(AdapterError, match="2 weights for 1 adapters"):
        ours.average_adapter("m", ["a"], [1.0, 2.0], combine_strategy="svd")
    assert_unchanged(ours, before)
    ours.delete_adapter("ia3")
    ours.delete_adapter("wide")
