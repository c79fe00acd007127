"""AdapterHub 1.3.0's DoRA and VeRA checkpoints (architecture "lora" with ``use_dora`` / ``vera_d``, ``vera_b``)
against AdapterHub's own outputs (tests/fixtures/adapterhub/<model>/{dora,vera,variant_dora,variant_vera}).

AdapterHub computes both differently from PEFT (fxadapt/methods/dora.py and vera.py say how): DoRA's norm
leaves the scaling out (exact with a rescaled magnitude) and its magnitude scales the bias too (refused on
a projection with a bias); VeRA's d and b are full matrices (read as VeRA when diagonal, else as the LoRA
they equal), and its shared A and B are not saved on a bare model (drawn again from init_weights_seed)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import fxadapt
from fxadapt.errors import CheckpointError
from fxadapt.testing import relative_error, rounding_tolerance

HUB = Path(__file__).parent / "fixtures" / "adapterhub"
SHAPES = json.loads((HUB / "roberta_base_param_shapes.json").read_text())
# AdapterHub ran on transformers 4.57 (another graph, another summation order): float32 rounding over the
# hidden width, through two layers.
RTOL = rounding_tolerance(torch.float32, 128, depth=2)

_BASES: dict = {}


def base(model_dir: str):
    """A fixture's base model (transformers 5) and its capture, built once per module."""
    if model_dir not in _BASES:
        model = T.AutoModel.from_pretrained(HUB / model_dir / "base").eval()
        _BASES[model_dir] = fxadapt.capture(model)
    return _BASES[model_dir]


def run(gm, io):
    with torch.no_grad():
        return gm(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state


def masked(x, io):
    return x * io["attention_mask"][..., None]


def with_shared(directory: Path, tmp_path: Path) -> Path:
    """The fixture with the VeRA A and B that AdapterHub's save_adapter left out put back into its file
    (where a model with heads saves them: ``<prefix>.shared_parameters.<name>.lora_A``)."""
    out = tmp_path / directory.name
    shutil.copytree(directory, out)
    tensors = torch.load(out / "pytorch_adapter.bin", weights_only=True)
    tensors |= {f"roberta.{k}": v for k, v in load_file(directory / "not_saved_by_adapterhub.safetensors").items()}
    torch.save(tensors, out / "pytorch_adapter.bin")
    return out


@pytest.mark.parametrize("model_dir, config_id, method", [
    ("llama", "dora", "dora"),            # alpha = r: AdapterHub's norm is PEFT's
    ("roberta", "dora", "dora"),          # the fixture's base has zero biases (transformers' initialisation)
    ("llama", "variant_dora", "dora"),    # alpha = 4 r: the magnitude rescaled by ||W + 4 B A|| / ||W + B A||
    ("roberta", "variant_vera", "vera"),  # diagonal d, b; A and B drawn again from init_weights_seed
    ("roberta", "vera", "lora"),          # full d, b matrices: the LoRA they equal
])
def test_matches_adapterhub_outputs(model_dir, config_id, method, tmp_path):
    directory = HUB / model_dir / config_id
    io = load_file(directory / "io.safetensors")
    meta = json.loads((directory / "meta.json").read_text())
    gm = base(model_dir)
    before = run(gm, io)
    if meta["not_saved_by_adapterhub"] and config_id == "vera":
        directory = with_shared(directory, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = gm.load_adapter(directory, set_active=True)
    try:
        assert any("not diagonal" in str(w.message) for w in caught) == (method == "lora")
        assert gm.adapters[name].method == method
        out = run(gm, io)
        expected, base_out = masked(io["last_hidden_state"], io), masked(io["base_last_hidden_state"], io)
        assert relative_error(expected, base_out) > 100 * RTOL  # the adapter matters at this tolerance
        err = relative_error(masked(out, io), expected)
        assert err < RTOL, f"{model_dir}/{config_id}: relative error {err:.2e} >= {RTOL:.2e}"
        if method == "dora":  # the same parameters as AdapterHub's: A, B and the magnitude
            assert sum(t.numel() for t in gm.adapter_state_dict(name).values()) == meta["adapter_summary"]["#param"]
    finally:
        gm.delete_adapter(name)
    after = run(gm, io)
    assert torch.equal(after, before)  # the base model as it was
    assert relative_error(masked(after, io), masked(io["base_last_hidden_state"], io)) < RTOL


def test_dora_with_a_bias_is_refused():
    """AdapterHub's DoRA scales the bias by m / ||W + B A||, which no fxadapt (PEFT) DoRA does: a nonzero
    bias on an adapted projection (as in any trained RoBERTa) is a CheckpointError naming it."""
    model = T.AutoModel.from_pretrained(HUB / "roberta" / "base").eval()
    with torch.no_grad():
        model.encoder.layer[1].attention.self.value.bias.normal_()
    gm = fxadapt.capture(model)
    with pytest.raises(CheckpointError, match="encoder.layer.1.attention.self.value, which has a bias"):
        gm.load_adapter(HUB / "roberta" / "dora")
    assert list(gm.adapters) == []


def test_vera_without_its_shared_matrices_is_refused():
    """AdapterHub's file of a bare model lacks A and B; without init_weights_seed nothing can draw them
    again, and the full d, b matrices (a LoRA made from A and B) cannot wait for them."""
    gm = base("roberta")
    with pytest.raises(CheckpointError, match="lora_A / lora_B\\) are not in the file"):
        gm.load_adapter(HUB / "roberta" / "vera")
    assert "vera" not in gm.adapters


def test_vera_redraws_adapterhubs_shared_matrices():
    """variant_vera's A and B, drawn from its init_weights_seed, are AdapterHub's to the bit."""
    gm = base("roberta")
    name = gm.load_adapter(HUB / "roberta" / "variant_vera")
    try:
        state = gm.adapter_state_dict(name)
        saved = load_file(HUB / "roberta" / "variant_vera" / "not_saved_by_adapterhub.safetensors")
        assert torch.equal(state["shared_parameters.vera_A"], saved["shared_parameters.variant_vera.lora_A"])
        assert torch.equal(state["shared_parameters.vera_B"], saved["shared_parameters.variant_vera.lora_B"])
    finally:
        gm.delete_adapter(name)


def test_summary_counts_on_roberta_base():
    """On the roberta-base shape: DoRA's row is AdapterHub's count; VeRA's is AdapterHub's less what its
    full matrices hold beyond the vectors (out^2 - out for b, r^2 - r for d, per projection)."""
    torch.manual_seed(0)
    gm = fxadapt.capture(T.RobertaModel(T.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)).eval())
    for config_id in ("dora", "vera"):
        gm.add_adapter(config_id, config_id)
    rows = {r["name"]: r for r in gm.adapter_summary(as_dict=True)}
    assert rows["dora"]["params"] == SHAPES["adapters"]["dora"]["adapter_summary"]["#param"]
    hub = SHAPES["adapters"]["vera"]["params"]
    full = sum(s[0] * s[1] - s[0] for n, s in hub if n.endswith((".vera_B", ".vera_D")))
    assert rows["vera"]["params"] == SHAPES["adapters"]["vera"]["adapter_summary"]["#param"] - full
