"""Inputs at call time: what the eager model accepts, the captured graph accepts with the same output
(the eager model is the oracle); what the graph cannot take raises InputError naming the input, what
was captured and what to do; torch.export takes the kwargs the model was captured with."""

from __future__ import annotations

import pytest
import torch

import fxadapt
from conftest import build, captured, inputs_for, reference
from fxadapt.testing import assert_outputs_close


def _eager_refuses(model, inputs: dict) -> None:
    """The eager model cannot run these inputs either (any error: it has no typed ones)."""
    with torch.no_grad(), pytest.raises(Exception):
        reference(model, inputs)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.int32], ids=["bool", "float", "int32"])
def test_attention_mask_of_another_dtype_works_as_in_the_eager_model(dtype):
    model, gm = captured("bert")
    inputs = inputs_for(model)
    inputs["attention_mask"] = inputs["attention_mask"].to(dtype)
    with torch.no_grad():
        assert_outputs_close(gm(**inputs), reference(model, inputs), mask=inputs["attention_mask"].long())


def test_float_pixel_values_of_another_precision_are_cast_as_the_model_does():
    model, gm = captured("vit")
    inputs = {"pixel_values": inputs_for(model)["pixel_values"].double()}
    with torch.no_grad():
        expected = reference(model, inputs)
        assert expected[0].dtype == torch.float32  # the eager model casts to its own dtype
        assert_outputs_close(gm(**inputs), expected)


def test_mask_values_the_captured_dtype_cannot_hold_are_refused():
    model, gm = captured("bert")
    inputs = inputs_for(model)
    inputs["attention_mask"] = inputs["attention_mask"].float() * 0.5
    with pytest.raises(fxadapt.InputError, match=r"input 'attention_mask' is torch\.float32 .*captured with torch\.int64.*pass attention_mask as torch\.int64"):
        gm(**inputs)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_sequence_longer_than_the_models_positions(arch):
    """64 positions: 64 works as in the eager model, 65 is an InputError (the eager model fails too)."""
    model, gm = captured(arch)
    inputs = inputs_for(model, seq=64)
    with torch.no_grad():
        assert_outputs_close(gm(**inputs), reference(model, inputs), mask=inputs["attention_mask"])
    inputs = inputs_for(model, seq=65)
    _eager_refuses(model, inputs)
    with pytest.raises(fxadapt.InputError, match=r"input 'input_ids' has 65 in dimension 1, the captured graph takes at most 64 .*truncate it to 64"):
        gm(**inputs)


def test_rotary_model_takes_sequences_beyond_its_configured_positions():
    """Llama computes its positions: the capture must not refuse what the eager model accepts."""
    model, gm = captured("llama")
    inputs = inputs_for(model, batch=2, seq=70)
    with torch.no_grad():
        assert_outputs_close(gm(**inputs), reference(model, inputs), mask=inputs["attention_mask"])


def test_mismatched_lengths_name_both_inputs():
    model, gm = captured("bert")
    inputs = inputs_for(model, seq=11)
    inputs["attention_mask"] = inputs["attention_mask"][:, :5]
    with pytest.raises(fxadapt.InputError, match=r"'attention_mask' has 5 in dimension 1 but 'input_ids' has 11 .*needs them equal"):
        gm(**inputs)
    inputs = inputs_for(model, seq=11)
    inputs["token_type_ids"] = torch.zeros(3, 12, dtype=torch.long)
    with pytest.raises(fxadapt.InputError, match=r"'token_type_ids' has 12 in dimension 1 but 'input_ids' has 11"):
        gm(**inputs)


@pytest.mark.parametrize("dim", [0, 1], ids=["batch", "sequence"])
def test_empty_batch_or_sequence_is_an_input_error(dim):
    model, gm = captured("bert")
    inputs = {k: v.narrow(dim, 0, 0) for k, v in inputs_for(model).items()}
    _eager_refuses(model, inputs)
    with pytest.raises(fxadapt.InputError, match=rf"input 'input_ids' has shape \(\d+, \d+\), empty in dimension {dim}"):
        gm(**inputs)


@pytest.mark.parametrize("typo, meant", [("input_id", "input_ids"), ("attention_masks", "attention_mask"),
                                         ("output_hidden_state", "output_hidden_states")])
def test_misspelt_keyword_suggests_the_close_match(typo, meant):
    model, gm = captured("bert")
    ids = inputs_for(model)["input_ids"]
    with pytest.raises(fxadapt.InputError, match=rf"BertModel: {typo}: did you mean {meant}\?"):
        gm(input_ids=ids, **{typo: True if typo.startswith("output") else ids})
    with pytest.raises(fxadapt.InputError, match=r"BertModel: nonsense: no such input \(captured inputs: input_ids, attention_mask, token_type_ids\)"):
        gm(input_ids=ids, nonsense=1)


def test_capture_from_sliced_example_inputs_runs_other_inputs():
    """torch.export guards on the base of an input that is a view; capture passes it copies."""
    model = build("llama")
    inputs = inputs_for(model, seq=11)
    gm = fxadapt.capture(model, example_kwargs={k: v[:, :8] for k, v in inputs.items()} | {"use_cache": False})
    other = inputs_for(model, batch=2, seq=6, seed=3)
    with torch.no_grad():
        assert_outputs_close(gm(**other), reference(model, other), mask=other["attention_mask"])


def test_torch_export_takes_the_kwargs_of_the_capture_flags_included():
    model = build("llama")
    kwargs = {**inputs_for(model, batch=2, seq=8), "use_cache": False}
    gm = fxadapt.capture(model, example_kwargs=kwargs)
    gm.add_adapter("lora", fxadapt.LoRAConfig(init_weights="bert"), set_active=True)
    program = torch.export.export(gm, (), kwargs=kwargs)
    with torch.no_grad():
        expected = gm(**kwargs)
        assert_outputs_close(program.module()(**kwargs), expected)
    # The default capture of a transformers model, with the example inputs it made.
    model, gm = captured("bert")
    example = gm._fx_example[1]
    program = torch.export.export(gm, (), kwargs=example)
    with torch.no_grad():
        assert_outputs_close(program.module()(**example), reference(model, example))
