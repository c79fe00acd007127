"""``with gm.disable_adapter():`` (PEFT's): the base model inside, merged adapters included; on leaving
(normally, from a nested block, or by an exception) the active and merged adapters, the merged
weights (the same tensors, bit for bit) and the outputs are back exactly."""

from __future__ import annotations

import pytest
import torch

import fxadapt
from conftest import captured, inputs_for, perturb_, reference, restored
from fxadapt.testing import assert_outputs_close, relative_error, rounding_tolerance

RTOL = rounding_tolerance(torch.float32, 64, depth=2)


def _setup(gm):
    """An active LoRA and a merged (IA)^3, both moved off their initial values."""
    gm.add_adapter("lora", fxadapt.LoRAConfig(r=4), set_active=True)
    gm.add_adapter("ia3", "ia3")
    perturb_(gm._adapter_parameters("lora"), std=0.2, seed=0)
    perturb_(gm._adapter_parameters("ia3"), std=0.2, seed=1)
    gm.merge_adapter("ia3")


def _state(gm):
    merged = {k: p for k, p in gm.named_parameters() if k in gm._fx_originals}
    return gm.active_adapters, gm.merged_adapters, gm.code, merged


def _assert_back(gm, state, expected, inputs):
    active, merged, code, weights = state
    assert (gm.active_adapters, gm.merged_adapters, gm.code) == (active, merged, code)
    assert weights and all(gm.get_parameter(k) is p for k, p in weights.items())  # the merged tensors themselves
    with torch.no_grad():
        assert torch.equal(gm(**inputs)[0], expected)


def test_base_inside_merged_included_and_everything_back_after():
    model, gm = captured("bert")
    with restored(gm, "lora", "ia3"):
        _setup(gm)
        inputs = inputs_for(model)
        base = reference(model, inputs)[0]
        state = _state(gm)
        merged_values = {k: p.detach().clone() for k, p in state[3].items()}
        with torch.no_grad():
            before = gm(**inputs)[0]
        assert relative_error(before, base) > 100 * RTOL  # the adapters act
        with gm.disable_adapter():
            assert gm.active_adapters == [] and gm.merged_adapters == []
            with torch.no_grad():
                assert_outputs_close(gm(**inputs)[0], base, rtol=RTOL, mask=inputs["attention_mask"])
        _assert_back(gm, state, before, inputs)
        assert all(torch.equal(gm.get_parameter(k), v) for k, v in merged_values.items())
        gm.reset_adapter("ia3")  # the originals came back too: reset still works


def test_nested_and_raising_blocks_restore_their_own_state():
    model, gm = captured("bert")
    with restored(gm, "lora", "ia3"):
        _setup(gm)
        inputs = inputs_for(model)
        base = reference(model, inputs)[0]
        state = _state(gm)
        with torch.no_grad():
            before = gm(**inputs)[0]
            with gm.disable_adapter():
                with gm.disable_adapter():
                    assert_outputs_close(gm(**inputs)[0], base, rtol=RTOL, mask=inputs["attention_mask"])
                assert gm.active_adapters == []  # the inner block restores the outer's (disabled) state
                assert_outputs_close(gm(**inputs)[0], base, rtol=RTOL, mask=inputs["attention_mask"])
            _assert_back(gm, state, before, inputs)
            with pytest.raises(KeyError, match="inside"):
                with gm.disable_adapter():
                    raise KeyError("inside")
            _assert_back(gm, state, before, inputs)
