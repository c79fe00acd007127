"""Properties over random configs and every architecture (hypothesis; HYPOTHESIS_PROFILE=thorough for more)."""

from __future__ import annotations

import contextlib
import inspect

import torch
from hypothesis import given, strategies as st

from conftest import ARCHS, captured, inputs_for, reference
from fxadapt.testing import adapter_configs, assert_outputs_close, ia3_configs, lora_configs

archs = st.sampled_from(ARCHS)


@contextlib.contextmanager
def adapter(arch, config, name="prop"):
    """The shared capture of ``arch`` with one active adapter, removed afterwards."""
    model, gm = captured(arch)
    gm.add_adapter(name, config, set_active=True)
    try:
        yield model, gm
    finally:
        gm.delete_adapter(name)
        gm.eval()


@given(archs, st.one_of(lora_configs(init_weights=("lora",)), ia3_configs()))
def test_zero_initialised_adapter_is_the_base(arch, config):
    model, base = captured(arch)
    inputs = inputs_for(model)
    with torch.no_grad():
        base_out = base(**inputs)
    with adapter(arch, config) as (_, gm):
        with torch.no_grad():
            out = gm(**inputs)
        for a, b in zip(out.to_tuple(), base_out.to_tuple()):
            assert torch.equal(a, b)
        assert_outputs_close(out, reference(model, inputs), mask=inputs.get("attention_mask"))


@given(archs, adapter_configs(), st.integers(0, 2**16))
def test_merged_equals_unmerged_and_reset_is_bit_exact(arch, config, seed):
    model, _ = captured(arch)
    inputs = inputs_for(model)
    with adapter(arch, config) as (_, gm):
        for p in gm.adapter_state_dict("prop").values():
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
        before = {k: v for k, v in gm.state_dict(keep_vars=True).items()}
        with torch.no_grad():
            unmerged = gm(**inputs)
        gm.merge_adapter("prop")
        with torch.no_grad():
            merged = gm(**inputs)
        assert_outputs_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        gm.reset_adapter()
        after = gm.state_dict(keep_vars=True)
        assert before.keys() == after.keys()
        for k in before:
            assert after[k] is before[k], k  # the very same tensors: bit for bit
        for p in gm.parameters():
            assert p.is_leaf


@given(archs, adapter_configs())
def test_signature_and_output_type_are_kept(arch, config):
    model, _ = captured(arch)
    inputs = inputs_for(model, batch=2, seq=5)
    with adapter(arch, config) as (_, gm):
        with torch.no_grad():
            out = gm(**inputs)
        ref = reference(model, inputs)
        assert type(out) is type(ref)
        assert out.keys() == ref.keys()
        # positional call, as the model's own signature allows
        main = model.main_input_name
        first = next(iter(inspect.signature(model.forward).parameters))
        if first == main:
            with torch.no_grad():
                assert type(gm(inputs[main])) is type(ref)
