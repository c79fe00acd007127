"""Prompt tuning against AdapterHub 1.3.0's own outputs (tests/fixtures/adapterhub/roberta/prompt_tuning) and a
hand-written reference: the model itself with a forward hook on its embeddings module that puts the prompt
before the embeddings' output (AdapterHub's mechanism) and the attention mask extended by ones. Gradients
reach only the prompt; from_string rows; native round trip bit for bit; torch.export and torch.compile;
parameter counts as AdapterHub's; bad fields and models without an embedding input named; no merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import fxadapt
from conftest import captured, captured_one_layer, inputs_for, perturb_, restored
from fxadapt.errors import AdapterError, ConfigError, MergeError, SiteError
from fxadapt.testing import assert_outputs_close, relative_error, rounding_tolerance

HUB = Path(__file__).parent / "fixtures" / "adapterhub"
# The same function built from the same ops in another order (two layers of float32 sums over 32-64 terms).
RTOL = rounding_tolerance(torch.float32, 64, depth=2)
P = 4


def _put(x: torch.Tensor, p: torch.Tensor, combine: str = "prefix") -> torch.Tensor:
    """``p`` before the sequence ``x`` (dimension 1), or after its first position."""
    return torch.cat([p, x], 1) if combine == "prefix" else torch.cat([x[:, :1], p, x[:, 1:]], 1)


def _extended(mask: torch.Tensor, p: int, combine: str = "prefix") -> torch.Tensor:
    return _put(mask, torch.ones(mask.shape[0], p, dtype=mask.dtype), combine)


def _by_hooks(model, prompt: torch.Tensor, inputs: dict, combine: str = "prefix"):
    """The reference: the model with ``prompt`` put into its embeddings module's output and the mask
    extended by ones at the same place (the embeddings themselves read the mask as given: DeBERTa's)."""
    mask, extended = inputs["attention_mask"], _extended(inputs["attention_mask"], prompt.shape[0], combine)

    def own_mask(module, args, kwargs):
        return args, {k: mask if v is extended else v for k, v in kwargs.items()}

    hooks = [model.embeddings.register_forward_pre_hook(own_mask, with_kwargs=True),
             model.embeddings.register_forward_hook(lambda module, args, out: _put(out, prompt.expand(out.shape[0], -1, -1), combine))]
    try:
        return model(**{**inputs, "attention_mask": extended})
    finally:
        for hook in hooks:
            hook.remove()


def test_matches_adapterhub_outputs():
    """AdapterHub's saved prompt on its fixture model: the same last_hidden_state, prompt positions included."""
    directory = HUB / "roberta" / "prompt_tuning"
    io, meta = load_file(directory / "io.safetensors"), json.loads((directory / "meta.json").read_text())
    model = T.AutoModel.from_pretrained(HUB / "roberta" / "base").eval()
    gm = fxadapt.capture(model)
    name = gm.load_adapter(directory, set_active=True)
    assert name == "prompt_tuning" and gm.adapters[name] == fxadapt.CONFIGS["prompt_tuning"]
    row = next(r for r in gm.adapter_summary(as_dict=True) if r["name"] == name)
    assert (row["architecture"], row["params"]) == (meta["adapter_summary"]["architecture"], meta["adapter_summary"]["#param"])
    inputs = {k: io[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = gm(**inputs).last_hidden_state
    expected, base = io["last_hidden_state"], io["base_last_hidden_state"]
    assert out.shape == expected.shape == (2, 10 + base.shape[1], 128)
    mask = _extended(inputs["attention_mask"], 10)
    assert relative_error(expected[:, 10:], base) > 1e-2  # the prompt matters
    # AdapterHub ran on transformers 4.57's eager attention: another graph, 128-wide sums over two layers.
    assert_outputs_close(out, expected, rtol=rounding_tolerance(torch.float32, 128, depth=2), mask=mask)


@pytest.mark.parametrize("arch, combine", [("roberta", "prefix"), ("roberta", "prefix_after_bos"), ("bert", "prefix"),
                                           ("distilbert", "prefix"), ("deberta-v2", "prefix")])
def test_matches_the_model_with_the_prompt_hooked_in(arch, combine):
    """Prompt after the embeddings module (positions, LayerNorm), masks built from the mask with ones in front."""
    model, gm = captured(arch)
    with restored(gm, "p"):
        gm.add_adapter("p", fxadapt.PromptTuningConfig(prompt_length=P, combine=combine), set_active=True)
        prompt = gm.adapter_state_dict("p")["prompt_tunings.prompt_embedding.weight"]
        inputs = inputs_for(model)  # padding on the first row
        with torch.no_grad():
            got, want, base = gm(**inputs), _by_hooks(model, prompt, inputs, combine), model(**inputs)
        assert got[0].shape[1] == inputs["input_ids"].shape[1] + P
        assert relative_error(want[0][:, P:], base[0]) > 100 * RTOL
        assert_outputs_close(got, want, rtol=RTOL, mask=_extended(inputs["attention_mask"], P, combine))


def test_gradients_reach_only_the_prompt():
    model, gm = captured("roberta")
    with restored(gm, "p"):
        gm.add_adapter("p", fxadapt.PromptTuningConfig(prompt_length=P))
        gm.train_adapter("p")
        gm.eval()  # no dropout: the reference draws none
        inputs = inputs_for(model)
        probe = torch.randn(3, 11 + P, 32, generator=torch.Generator().manual_seed(0))
        (gm(**inputs)[0] * probe).sum().backward()
        prompt = gm.get_parameter("prompt_tunings.p.prompt_embedding.weight")
        leaf = prompt.detach().clone().requires_grad_(True)
        (_by_hooks(model, leaf, inputs)[0] * probe).sum().backward()
        assert leaf.grad.abs().max() > 0
        assert_outputs_close(prompt.grad, leaf.grad, rtol=rounding_tolerance(torch.float32, 64 * 3 * 15, depth=2))
        assert [n for n, p in gm.named_parameters() if p.grad is not None] == ["prompt_tunings.p.prompt_embedding.weight"]
        gm.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)


def test_from_string_copies_word_embedding_rows():
    model, gm = captured("bert")
    with restored(gm, "p"):
        gm.add_adapter("p", fxadapt.PromptTuningConfig(prompt_length=5, prompt_init="from_string", prompt_init_ids=[7, 3]))
        rows = gm.adapter_state_dict("p")["prompt_tunings.prompt_embedding.weight"]
        assert torch.equal(rows, model.embeddings.word_embeddings.weight[[7, 3, 7, 3, 7]])  # repeated, then cut
        with pytest.raises(ConfigError, match="prompt_init_ids") as e:
            gm.add_adapter("q", fxadapt.PromptTuningConfig(prompt_init="from_string", prompt_init_ids=[100]))
        assert e.value.field == "prompt_init_ids" and "q" not in gm.adapters
    with pytest.raises(ConfigError, match="does not tokenize") as e:
        fxadapt.PromptTuningConfig(prompt_init="from_string", prompt_init_text="classify:")
    assert e.value.field == "prompt_init_ids"


def test_native_round_trip_is_bit_identical(tmp_path):
    model, gm = captured("roberta")
    inputs = inputs_for(model)
    with restored(gm, "p"):
        gm.add_adapter("p", fxadapt.PromptTuningConfig(prompt_length=P, combine="prefix_after_bos"), set_active=True)
        perturb_(gm.adapter_state_dict("p").values())
        expected = gm(**inputs).to_tuple()
        gm.save_adapter(tmp_path, "p")
        gm.delete_adapter("p")
        assert gm.load_adapter(tmp_path, set_active=True) == "p"
        assert all(torch.equal(a, b) for a, b in zip(gm(**inputs).to_tuple(), expected))


@pytest.mark.usefixtures("fresh_dynamo")
def test_torch_export_and_compile():
    model, gm = captured_one_layer("bert")
    with restored(gm, "p"):
        gm.add_adapter("p", fxadapt.PromptTuningConfig(prompt_length=P), set_active=True)
        bind = lambda **kw: gm._fx_inputs.bind(type(model).__name__, (), inputs_for(model, **kw))  # noqa: E731
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=48)
        program = torch.export.export(gm, (), bind(), dynamic_shapes={k: {0: batch, 1: seq} for k in gm._fx_inputs.names}, strict=False)
        for b, s in ((1, 5), (4, 17)):
            inputs = bind(batch=b, seq=s)
            with torch.no_grad():
                got, want = program.module()(**inputs)[0], gm(**inputs)[0]
            assert got.shape == (b, s + P, 32)
            assert_outputs_close(got, want, rtol=RTOL)
        # Compiled whole (aot_eager: the graph-break check without inductor's minute on these CPUs).
        compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
        inputs = inputs_for(model)
        with torch.no_grad():
            assert_outputs_close(compiled(**inputs), gm(**inputs), rtol=RTOL)


def test_count_is_adapterhubs_on_roberta_base_shape():
    shapes = json.loads((HUB / "roberta_base_param_shapes.json").read_text())["adapters"]["prompt_tuning"]
    # The prompt is prompt_length x hidden: roberta-base's width, one layer is enough.
    model = T.RobertaModel(T.RobertaConfig(hidden_size=768, num_attention_heads=12, intermediate_size=64, num_hidden_layers=1, vocab_size=100))
    gm = fxadapt.capture(model.eval())
    gm.add_adapter("prompt_tuning", "prompt_tuning")
    row = next(r for r in gm.adapter_summary(as_dict=True) if r["name"] == "prompt_tuning")
    assert (row["architecture"], row["params"]) == (shapes["adapter_summary"]["architecture"], shapes["adapter_summary"]["#param"])
    assert [list(t.shape) for t in gm.adapter_state_dict("prompt_tuning").values()] == [s for _, s in shapes["params"]]


def test_no_merge_one_active_prompt_and_models_without_an_embedding_input():
    model, gm = captured("roberta")
    with restored(gm, "p", "q"):
        gm.add_adapter("p", fxadapt.PromptTuningConfig(prompt_length=P), set_active=True)
        gm.add_adapter("q", fxadapt.PromptTuningConfig(prompt_length=2))
        with pytest.raises(MergeError, match="cannot be merged"):
            gm.merge_adapter("p")
        with pytest.raises(AdapterError, match="embedding output"):
            gm.set_active_adapters(["p", "q"])
    plain = fxadapt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
    with pytest.raises(SiteError, match="PromptTuningConfig needs the embedding output"):
        plain.add_adapter("p", "prompt_tuning")
    _, vit = captured("vit")  # patches: a sequence length fixed by the image size
    with pytest.raises(SiteError, match="dynamic sequence dimension"):
        vit.add_adapter("p", "prompt_tuning", set_active=True)
    assert "p" not in vit.adapters


@pytest.mark.parametrize("field, value", [("prompt_length", 0), ("prompt_init", "from_text"), ("combine", "suffix"),
                                          ("random_uniform_scale", -1.0), ("prompt_init_ids", []), ("init_weights_seed", 0.5)])
def test_bad_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=f"PromptTuningConfig.{field} ") as e:
        fxadapt.PromptTuningConfig(**{field: value})
    assert e.value.field == field
