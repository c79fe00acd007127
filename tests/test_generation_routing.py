"""generate(adapter_names=...): per-row routing in the decode steps with a KV cache.

Oracles: each row of ``gm.generate`` with that row's adapter active alone (tokens equal, each step's
logits within rounding); the model's own ``generate`` for ``"__base__"`` rows; PEFT's
``generate(..., adapter_names=...)`` on the same LoRA weights. Beams and returned sequences expand
the rows; bad names are an InputError that leaves the module as it was.
"""

import copy
import functools

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fxadapt
from conftest import copy_peft_lora
from fxadapt.errors import InputError
from fxadapt.testing import assert_outputs_close, assert_unchanged, relative_error, rounding_tolerance, snapshot

NEW = 5
# The same function with the rows' factors gathered and batched: float32 sums of up to 64 products,
# through the two layers of each step.
RTOL = rounding_tolerance(torch.float32, 64, depth=2)
NAMES = ["one", "__base__", "bn", "two", "one"]


def _prompt(batch=5):
    """Prompts of 7 tokens, every other row left-padded by 2."""
    ids = torch.randint(3, 97, (batch, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1::2, :2], mask[1::2, :2] = 0, 0
    return ids, mask


@functools.cache
def _setup():
    """A tiny Llama, PEFT's LoRA adapters "one" (q, v) and "two" (q, k, v) on a copy, and a module with
    the same LoRA weights and a Pfeiffer bottleneck "bn" moved off its initial values."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=None, bos_token_id=1)
    model = LlamaForCausalLM(cfg).eval()
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                                        init_lora_weights=False), adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False))
    theirs.eval()
    gm = fxadapt.capture(model).eval()
    gm.add_adapter("one", fxadapt.LoRAConfig(r=8, alpha=16))
    gm.add_adapter("two", fxadapt.LoRAConfig(r=4, alpha=12, attn_matrices=["q", "k", "v"]))
    gm.add_adapter("bn", "pfeiffer")
    copy_peft_lora(theirs, gm)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in gm._adapter_parameters("bn"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, theirs, gm


def _generate(gm, ids, mask, **kwargs):
    return gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                       return_dict_in_generate=True, **kwargs)


def _alone(gm, name, ids, mask, **kwargs):
    """gm.generate with only ``name`` active (none for "__base__")."""
    gm.set_active_adapters(None if name == "__base__" else name)
    try:
        return _generate(gm, ids, mask, **kwargs)
    finally:
        gm.set_active_adapters(None)


def test_routed_rows_equal_each_adapter_alone_and_peft():
    model, theirs, gm = _setup()
    ids, mask = _prompt()
    routed = _generate(gm, ids, mask, adapter_names=NAMES)
    base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    for row, name in enumerate(NAMES):
        alone = _alone(gm, name, ids, mask)
        assert torch.equal(routed.sequences[row], alone.sequences[row]), (row, name)
        for step, (got, expected) in enumerate(zip(routed.logits, alone.logits)):
            assert_outputs_close(got[row], expected[row], rtol=RTOL)
            if name != "__base__" and step == 0:
                assert relative_error(expected[row], base.logits[0][row]) > 100 * RTOL, f"{name} hardly changes its row"
        if name == "__base__":
            assert torch.equal(routed.sequences[row], base.sequences[row])
    # PEFT's generate with adapter_names, LoRA rows and the base: the same tokens and logits
    peft_names = ["one", "two", "__base__", "two", "one"]
    ours = _generate(gm, ids, mask, adapter_names=peft_names)
    expected = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, adapter_names=peft_names)
    assert torch.equal(ours.sequences, expected.sequences)
    for got, want in zip(ours.logits, expected.logits):
        assert_outputs_close(got, want, rtol=RTOL)
    # the index tensor routes the same
    assert torch.equal(gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, adapter_names=gm.adapter_indices(NAMES)),
                       routed.sequences)


def test_beams_and_returned_sequences_expand_the_rows():
    model, theirs, gm = _setup()
    ids, mask = _prompt(3)
    names = ["bn", "two", "__base__"]
    routed = gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2, num_return_sequences=2, adapter_names=names)
    assert routed.shape == (6, 7 + NEW)
    for row, name in enumerate(names):
        gm.set_active_adapters(None if name == "__base__" else name)
        try:
            expected = gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2, num_return_sequences=2)
        finally:
            gm.set_active_adapters(None)
        assert torch.equal(routed[2 * row:2 * row + 2], expected[2 * row:2 * row + 2]), name
    lora = ["two", "one", "__base__"]
    ours = gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2, do_sample=False, adapter_names=lora)
    expected = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2, do_sample=False, adapter_names=lora)
    assert torch.equal(ours, expected)


def test_bad_adapter_names_are_input_errors_and_change_nothing():
    model, theirs, gm = _setup()
    ids, mask = _prompt(3)
    gm.add_adapter("prefix", "prefix_tuning")
    try:
        before = snapshot(gm)
        cases = [(["one", "two"], "2 names for a batch of 3 rows"),
                 (["one", "nope", "__base__"], "'nope', which is no adapter"),
                 (["one", "prefix", "__base__"], "'prefix', which cannot be routed per row"),
                 ("one", "list of adapter names"),
                 (torch.tensor([0, 1, 9]), "index 9")]
        for names, message in cases:
            with pytest.raises(InputError, match=message):
                gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, adapter_names=names)
        assert_unchanged(gm, before)
        gm.merge_adapter("one")
        before = snapshot(gm)
        with pytest.raises(InputError, match=r"merged.*reset_adapter"):
            gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, adapter_names=["one"] * 3)
        assert_unchanged(gm, before)
        gm.reset_adapter("one")
    finally:
        gm.delete_adapter("prefix")
        gm.set_active_adapters(None)


def test_encoder_decoder_rows_equal_each_adapter_alone():
    """T5: the encoder runs the routed forward, the decoder steps the routed step graphs."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=None)).eval()
    gm = fxadapt.capture(model).eval()
    gm.add_adapter("lora", "lora")
    gm.add_adapter("bn", "houlsby")
    for i, name in enumerate(("lora", "bn")):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in gm._adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ids, _ = _prompt(3)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # encoder inputs padded on the right
    names = ["bn", "__base__", "lora"]
    base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
    for kwargs in ({}, {"num_beams": 2}):
        routed = gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, adapter_names=names, **kwargs)
        for row, name in enumerate(names):
            gm.set_active_adapters(None if name == "__base__" else name)
            expected = (model.generate if name == "__base__" else gm.generate)(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, **kwargs)
            gm.set_active_adapters(None)
            assert torch.equal(routed[row], expected[row]), (name, kwargs)
            if name != "__base__" and not kwargs:
                assert not torch.equal(expected[row], base[row]), f"{name} changes no token of its row"
