"""Properties over random configs and every architecture (hypothesis; HYPOTHESIS_PROFILE=thorough for more):
a zero-initialised adapter is the base model; merged == unmerged and reset restores the weights bit for bit
(every mergeable method: LoRA, (IA)^3); save -> load round trips in every format; the model's call
signature and output type are kept."""

from __future__ import annotations

import contextlib
import inspect
import tempfile

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import ARCHS, captured, inputs_for, perturb_, reference
from fxadapt.testing import adapter_configs, assert_outputs_close, assert_unchanged, ia3_configs, lora_configs, rounding_tolerance, snapshot

archs = st.sampled_from(ARCHS)
# Merged against unmerged: W + s*BA rounded once more, then two layers of float32 sums of up to 64 products.
MERGE_RTOL = rounding_tolerance(torch.float32, 64, depth=2)


@contextlib.contextmanager
def adapter(arch, config, name="prop", seed=None):
    """The shared capture of ``arch`` with one active adapter (perturbed when ``seed`` is given), removed afterwards."""
    model, gm = captured(arch)
    torch.manual_seed(0)  # the adapter's initial weights: the same whatever ran before
    gm.add_adapter(name, config, set_active=True)
    try:
        if seed is not None:
            perturb_(gm.adapter_state_dict(name).values(), seed=seed)
        yield model, gm
    finally:
        for n in list(gm.adapters):
            gm.delete_adapter(n)
        gm.eval()


def run(gm, inputs):
    with torch.no_grad():
        return gm(**inputs)


@given(archs, st.one_of(lora_configs(init_weights=("lora",)), ia3_configs()))
def test_zero_initialised_adapter_is_the_base(arch, config):
    model, base = captured(arch)
    inputs = inputs_for(model)
    base_out = run(base, inputs)
    with adapter(arch, config) as (_, gm):
        out = run(gm, inputs)
        for a, b in zip(out.to_tuple(), base_out.to_tuple()):
            assert torch.equal(a, b)
        assert_outputs_close(out, reference(model, inputs), mask=inputs.get("attention_mask"))


@given(archs, adapter_configs(), st.integers(0, 2**16))
def test_merged_equals_unmerged_and_reset_is_bit_exact(arch, config, seed):
    model, _ = captured(arch)
    inputs = inputs_for(model)
    with adapter(arch, config, seed=seed) as (_, gm):
        before, tensors = snapshot(gm), dict(gm.state_dict(keep_vars=True))
        unmerged = run(gm, inputs)
        assert not torch.allclose(unmerged[0], reference(model, inputs)[0])  # the adapter acts: the merge has something to fold
        gm.merge_adapter("prop")
        assert gm.merged_adapters == ["prop"]
        assert_outputs_close(run(gm, inputs), unmerged, rtol=MERGE_RTOL, mask=inputs.get("attention_mask"))
        gm.reset_adapter()
        assert_unchanged(gm, before)  # keys, values bit for bit, active and merged state, code
        after = gm.state_dict(keep_vars=True)
        assert all(after[k] is v for k, v in tensors.items())  # the very tensors: the user's parameters are back
        assert all(p.is_leaf for p in gm.parameters())
        assert_outputs_close(run(gm, inputs), unmerged, rtol=0, atol=0)


@pytest.mark.parametrize("format", ["fxadapt", "peft"])
@given(arch=archs, config=adapter_configs(), seed=st.integers(0, 2**16))
def test_save_and_load_round_trip(format, arch, config, seed):
    """Saved, deleted and loaded back: the same outputs (bit for bit in fxadapt's own format; PEFT's
    writes fused projections as one block LoRA, the same function up to rounding)."""
    model, _ = captured(arch)
    inputs = inputs_for(model)
    with adapter(arch, config, seed=seed) as (_, gm), tempfile.TemporaryDirectory() as directory:
        expected = run(gm, inputs)
        gm.save_adapter(directory, "prop", format=format)
        gm.delete_adapter("prop")
        assert not torch.equal(run(gm, inputs)[0], expected[0])
        name = gm.load_adapter(directory, set_active=True)
        got = run(gm, inputs)
        if format == "fxadapt":
            assert name == "prop"
            for a, b in zip(got.to_tuple(), expected.to_tuple()):
                assert torch.equal(a, b)
        else:
            assert_outputs_close(got, expected, rtol=MERGE_RTOL)


@given(archs, adapter_configs())
def test_signature_and_output_type_are_kept(arch, config):
    model, _ = captured(arch)
    inputs = inputs_for(model, batch=2, seq=5)
    with adapter(arch, config) as (_, gm):
        out = run(gm, inputs)
        ref = reference(model, inputs)
        assert type(out) is type(ref)
        assert out.keys() == ref.keys()
        # positional call, as the model's own signature allows
        main = model.main_input_name
        first = next(iter(inspect.signature(model.forward).parameters))
        if first == main:
            with torch.no_grad():
                assert type(gm(inputs[main])) is type(ref)
