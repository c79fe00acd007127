"""ReFT (LoReFT, NoReFT, DiReFT) against AdapterHub 1.3.0's fixtures (its outputs, its orthogonal
projections, its parameter counts) and against a hand-written reference: forward hooks on the eager
model's layers that rewrite the positions AdapterHub picks, with R from torch's own orthogonal
parametrization. Gradients, native round trip, export, one inductor step, bad inputs and fields."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import fxadapt
from conftest import captured, captured_one_layer, inputs_for, perturb_, restored
from fxadapt.errors import ConfigError, InputError, MergeError
from fxadapt.methods.reft import householder
from fxadapt.testing import assert_outputs_close, relative_error, rounding_tolerance

HUB = Path(__file__).parent / "fixtures" / "adapterhub"
# One function computed in another order (and AdapterHub's graph on transformers 4.57): two layers of
# float32 sums over the hidden size (128 in the fixtures, 32 here).
HUB_RTOL = rounding_tolerance(torch.float32, 128, depth=2)
RTOL = rounding_tolerance(torch.float32, 64, depth=2)
GRAD_RTOL = rounding_tolerance(torch.float32, 64 * 33, depth=2)


def _perturb(gm, name: str = "x") -> None:
    """Move the adapter's weights off their initial values; an orthogonal ``original`` keeps its diagonal
    of signs (torch's parametrization reads it through ``.int()`` and passes no gradient to it)."""
    state = gm.adapter_state_dict(name)
    perturb_(state.values(), std=0.3)
    with torch.no_grad():
        for key, value in state.items():
            if key.endswith(".original"):
                value.diagonal().copy_(value.diagonal().sign())


# -- AdapterHub's fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_models():
    cache = {}

    def get(model_dir: str):
        if model_dir not in cache:
            model = T.AutoModel.from_pretrained(HUB / model_dir / "base").eval()
            cache[model_dir] = (model, fxadapt.capture(model))
        return cache[model_dir]
    return get


@pytest.mark.parametrize("model_dir, config_id", [("roberta", "loreft"), ("roberta", "noreft"), ("roberta", "direft"), ("llama", "loreft")])
def test_adapterhub_fixture_outputs_projections_and_counts(hub_models, model_dir, config_id, tmp_path):
    directory = HUB / model_dir / config_id
    meta = json.loads((directory / "meta.json").read_text())
    notes = meta["method_notes"]
    if "subtract_projection" not in json.loads((directory / "adapter_config.json").read_text())["config"]:
        # AdapterHub's JSON cannot tell DiReFT from NoReFT: say which, as the loader's warning asks.
        shutil.copytree(directory, tmp_path / config_id)
        directory = tmp_path / config_id
        data = json.loads((directory / "adapter_config.json").read_text())
        data["config"]["subtract_projection"] = notes["subtract_projection"]
        (directory / "adapter_config.json").write_text(json.dumps(data))
    io = load_file(directory / "io.safetensors")
    inputs = {k: io[k] for k in ("input_ids", "attention_mask")}
    model, gm = hub_models(model_dir)
    with restored(gm, config_id):
        assert gm.load_adapter(directory, set_active=True) == config_id
        config = gm.adapters[config_id]
        assert (config.orthogonality, config.subtract_projection) == (notes["orthogonality"], notes["subtract_projection"])
        row = next(r for r in gm.adapter_summary(as_dict=True) if r["name"] == config_id)
        assert (row["architecture"], row["params"]) == ("reft", meta["adapter_summary"]["#param"])
        with torch.no_grad():
            out = gm(**inputs).last_hidden_state
        mask = inputs["attention_mask"][..., None]  # padded rows (the second example) included, padding itself not
        expected, base = io["last_hidden_state"] * mask, io["base_last_hidden_state"] * mask
        assert relative_error(base, expected) > 100 * HUB_RTOL
        assert relative_error(out * mask, expected) < HUB_RTOL
        if notes["orthogonality"]:  # R as AdapterHub computes it from original and base, from our converted original
            for key, weight in load_file(directory / "orthogonal_projections.safetensors").items():
                path = key.split(".reft_layer.")[0] + ".refts." + config_id + "." + key.split(f".refts.{config_id}.")[1].removesuffix(".weight")
                ours = householder(gm.get_submodule(path).parametrizations["weight"].original)
                assert relative_error(ours, weight) < rounding_tolerance(torch.float32, weight.shape[1]), key


def test_direft_checkpoint_without_subtract_projection_is_read_as_adapterhub_reads_it(hub_models):
    _, gm = hub_models("roberta")
    with restored(gm, "direft"), pytest.warns(UserWarning, match="subtract_projection"):
        gm.load_adapter(HUB / "roberta" / "direft")
        assert type(gm.adapters["direft"]) is fxadapt.NoReftConfig


# -- the hand-written reference ---------------------------------------------------------------


def _positions(mask: torch.Tensor | None, batch: int, length: int, prefix: int, suffix: int) -> list[tuple[list[int], list[int]]]:
    """AdapterHub's positions, per example, in plain Python: from the first 1 of the mask, and to it plus the number of ones."""
    out = []
    for b in range(batch):
        row = [1] * length if mask is None else mask[b].tolist()
        first = row.index(1) if 1 in row else 0
        end = first + sum(1 for v in row if v == 1)
        out.append((list(range(first, first + prefix)), list(range(end - suffix, end))))
    return out


def _unit(h: torch.Tensor, w: dict, config) -> torch.Tensor:
    """AdapterHub's ReftUnit on rows h, R from torch's orthogonal parametrization of our original."""
    if config.orthogonality:
        linear = torch.nn.Linear(h.shape[-1], config.r, bias=False)
        torch.nn.utils.parametrizations.orthogonal(linear, orthogonal_map="householder", use_trivialization=False)
        del linear.parametrizations.weight.original
        linear.parametrizations.weight.original = w["projection.parametrizations.weight.original"]
        r = linear.weight
    else:
        r = w["projection.weight"]
    source = h @ w["learned_source.weight"].T + w["learned_source.bias"]
    source = torch.tanh(source) if config.non_linearity == "tanh" else source
    if config.subtract_projection:
        source = source - h @ r.T
    return h + source @ r


def _reference(model, gm, name: str, inputs: dict, weights: dict):
    """The eager model with a forward hook on each adapted layer (the module our weights sit in) that
    rewrites its output at AdapterHub's positions: prefix first, then suffix (which wins on overlaps)."""
    config = gm.adapters[name]
    handles = []
    layers = {}
    for key, tensor in weights.items():
        layer, _, param = key.partition(".refts.")
        layers.setdefault(layer, {})[param] = tensor

    def hook(params):
        def run(module, args, output):
            h = output if isinstance(output, torch.Tensor) else output[0]
            batch, length, _ = h.shape
            new = h.clone()
            for b, (pre, suf) in enumerate(_positions(inputs.get("attention_mask"), batch, length, config.prefix_positions,
                                                      config.suffix_positions)):
                units = [0, 0] if config.tied_weights else [0, 1]
                for positions, unit in ((pre, units[0]), (suf, units[1])):
                    if positions:
                        w = {k.removeprefix(f"units.{unit}."): v for k, v in params.items() if k.startswith(f"units.{unit}.")}
                        new[b, positions] = _unit(h[b, positions], w, config)
            return new if isinstance(output, torch.Tensor) else (new, *output[1:])
        return run

    for layer, params in layers.items():
        handles.append(model.get_submodule(layer).register_forward_hook(hook(params)))
    try:
        extra = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
        return model(**inputs, **extra)[0]
    finally:
        for h in handles:
            h.remove()


def _left_padded(model, seq: int = 11) -> dict:
    inputs = inputs_for(model, seq=seq)  # right padding on the first row
    inputs["attention_mask"][1, :4] = 0  # left padding on the second
    return inputs


CASES = {
    "loreft": (fxadapt.LoReftConfig(prefix_positions=2, suffix_positions=3, r=2, dropout=0.0), "roberta"),
    "tied": (fxadapt.LoReftConfig(prefix_positions=3, suffix_positions=2, r=3, tied_weights=True, dropout=0.0, layers=[1]), "llama"),
    "noreft": (fxadapt.NoReftConfig(prefix_positions=0, suffix_positions=4, r=2, dropout=0.0, non_linearity="tanh"), "bert"),
    "direft": (fxadapt.DiReftConfig(prefix_positions=2, suffix_positions=2, r=2, dropout=0.0), "vit"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_match_the_hook_reference(case):
    config, arch = CASES[case]
    model, gm = captured(arch)
    with restored(gm, "x"):
        gm.add_adapter("x", config)
        _perturb(gm)
        gm.train_adapter("x")
        gm.eval()
        inputs = _left_padded(model) if "input_ids" in inputs_for(model) else inputs_for(model)
        ours = gm(**inputs)[0]
        weights = {k: v.detach().clone().requires_grad_(True) for k, v in gm.adapter_state_dict("x").items()}
        expected = _reference(model, gm, "x", inputs, weights)
        with torch.no_grad():
            base = model(**inputs)[0]
        mask = inputs.get("attention_mask")
        assert relative_error(expected, base) > 100 * RTOL
        assert_outputs_close(ours, expected, rtol=RTOL, mask=mask)
        probe = torch.randn(ours.shape, generator=torch.Generator().manual_seed(0))
        keep = 1 if mask is None else mask[..., None]
        (ours * probe * keep).sum().backward()
        (expected * probe * keep).sum().backward()
        state = gm.adapter_state_dict("x")
        # Without prefix positions the prefix's unit (units.0) has nothing to do, as in AdapterHub.
        used = [k for k in state if config.prefix_positions or ".units.0." not in k]
        assert len(used) < len(state) if not config.prefix_positions else len(used) == len(state)
        for key in used:
            assert state[key].grad is not None and state[key].grad.abs().max() > 0, key
            assert_outputs_close(state[key].grad, weights[key].grad, rtol=GRAD_RTOL)
        frozen = [n for n, p in gm.named_parameters() if ".refts." not in n and (p.requires_grad or p.grad is not None)]
        assert not frozen, frozen[:3]  # gradients reach only the intervention weights


def test_merge_is_refused_and_the_native_round_trip_is_bit_exact(tmp_path):
    model, gm = captured("roberta")
    inputs = _left_padded(model)
    with restored(gm, "x"):
        gm.add_adapter("x", fxadapt.LoReftConfig(prefix_positions=2, suffix_positions=1, r=2), set_active=True)
        _perturb(gm)
        with pytest.raises(MergeError, match="'x'"):
            gm.merge_adapter("x")
        assert gm.merged_adapters == []
        with torch.no_grad():
            expected = gm(**inputs)[0]
        gm.save_adapter(tmp_path, "x")
        again = fxadapt.capture(copy.deepcopy(model))
        assert again.load_adapter(tmp_path, set_active=True) == "x"
        for key, value in gm.adapter_state_dict("x").items():
            assert torch.equal(again.adapter_state_dict("x")[key], value), key
        with torch.no_grad():
            assert torch.equal(again(**inputs)[0], expected)


def test_torch_export_with_dynamic_shapes():
    model, gm = captured_one_layer("bert")
    with restored(gm, "x"):
        gm.add_adapter("x", fxadapt.LoReftConfig(prefix_positions=1, suffix_positions=2, r=2), set_active=True)
        _perturb(gm)
        bind = lambda **kw: gm._fx_inputs.bind(type(model).__name__, (), inputs_for(model, **kw))  # noqa: E731
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
        program = torch.export.export(gm, (), bind(), dynamic_shapes={k: {0: batch, 1: seq} for k in gm._fx_inputs.names}, strict=False)
        for b, s in ((2, 5), (4, 17)):
            inputs = bind(batch=b, seq=s)
            with torch.no_grad():
                got, want, base = program.module()(**inputs)[0], gm(**inputs)[0], model(**inputs)[0]
            assert relative_error(want, base) > 100 * RTOL
            assert_outputs_close(got, want, rtol=rounding_tolerance(torch.float32, 64))


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiles_whole_and_trains_as_eager():
    """torch.compile(fullgraph=True): no graph break (the positions are tensor ops), the same outputs and
    gradients. aot_eager traces forward and backward as inductor does, without its minutes of codegen here."""
    model, gm = captured_one_layer("llama")
    with restored(gm, "x"):
        gm.add_adapter("x", fxadapt.LoReftConfig(prefix_positions=2, suffix_positions=2, r=2, dropout=0.1))
        _perturb(gm)
        gm.train_adapter("x")
        gm.eval()
        inputs = _left_padded(model)
        params = [p for p in gm.parameters() if p.requires_grad]

        def step(module):
            out = module(**inputs)[0]
            return out, torch.autograd.grad((out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum(), params)

        got, got_grads = step(torch.compile(gm, fullgraph=True, backend="aot_eager"))
        expected, expected_grads = step(gm)
        assert_outputs_close(got.detach(), expected.detach(), rtol=RTOL)
        for g, e in zip(got_grads, expected_grads):
            assert e.abs().max() > 0
            assert_outputs_close(g, e, rtol=GRAD_RTOL)


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, change, field", [
    (dict(suffix_positions=4, prefix_positions=0), lambda m: m.__setitem__((0, slice(3, None)), 0), "suffix_positions"),  # 3 tokens
    (dict(prefix_positions=5), lambda m: m.__setitem__((1, slice(0, 7)), 0), "prefix_positions"),  # left padded: 4 from 7
    (dict(prefix_positions=12), lambda m: None, "prefix_positions"),  # longer than the sequence
])
def test_positions_beyond_the_sequence_are_an_input_error(fields, change, field):
    model, gm = captured("roberta")
    with restored(gm, "x"):
        gm.add_adapter("x", fxadapt.LoReftConfig(**fields), set_active=True)
        inputs = inputs_for(model, pad=False)
        change(inputs["attention_mask"])
        with pytest.raises(InputError, match=rf"LoReftConfig\.{field}="):
            gm(**inputs)


@pytest.mark.parametrize("config, field", [
    (fxadapt.LoReftConfig(layers=[0, 5]), "layers"), (fxadapt.LoReftConfig(layers=[]), "layers"),
    (fxadapt.LoReftConfig(r=33), "r"),
])
def test_configs_the_model_cannot_take_name_the_field(config, field):
    model, gm = captured("bert")
    with restored(gm, "x"), pytest.raises(ConfigError) as info:
        gm.add_adapter("x", config)
    assert info.value.field == field and f".{field}=" in str(info.value)
    assert "x" not in gm.adapters


@pytest.mark.parametrize("fields, field", [
    (dict(prefix_positions=-1), "prefix_positions"), (dict(prefix_positions=0), "prefix_positions"), (dict(layers="some"), "layers"),
    (dict(r=0), "r"), (dict(orthogonality="true"), "orthogonality"), (dict(output_reft=False), "output_reft"),
    (dict(non_linearity="bogus"), "non_linearity"), (dict(dtype="int8"), "dtype"),
])
def test_bad_fields_are_named(fields, field):
    with pytest.raises(ConfigError, match=rf"^LoReftConfig\.{field} ") as info:
        fxadapt.LoReftConfig(**fields)
    assert info.value.field == field
