"""Front ends: torch.export with dynamic shapes, symbolic_trace, inputs made from a transformers config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxadapt
from conftest import build, captured, inputs_for, reference
from fxadapt.testing import assert_outputs_close


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2", "deberta-v2"])
@pytest.mark.parametrize("batch, seq", [(3, 40), (1, 1), (1, 17)])
def test_captured_at_2x8_runs_at_other_shapes(arch, batch, seq):
    model, gm = captured(arch)
    inputs = inputs_for(model, batch=batch, seq=seq, pad=seq > 4)
    with torch.no_grad():
        assert_outputs_close(gm(**inputs), reference(model, inputs), mask=inputs["attention_mask"])


def test_vision_batch_is_dynamic_and_image_size_fixed():
    model, gm = captured("vit")
    for batch in (1, 5):
        inputs = inputs_for(model, batch=batch)
        assert_outputs_close(gm(**inputs), reference(model, inputs))
    with pytest.raises(fxadapt.InputError, match=r"pixel_values.*\*x3x32x32"):
        gm(pixel_values=torch.randn(2, 3, 16, 16))


def test_omitted_attention_mask_means_no_padding():
    model, gm = captured("bert")
    ids = inputs_for(model, pad=False)["input_ids"]
    with torch.no_grad():
        assert_outputs_close(gm(input_ids=ids), model(input_ids=ids))
        assert_outputs_close(gm(ids), model(ids))  # positional, as the model takes it


def test_token_type_ids_are_an_input_where_the_model_has_segments():
    model, gm = captured("bert")
    inputs = inputs_for(model)
    inputs["token_type_ids"] = torch.randint(0, 2, inputs["input_ids"].shape)
    with torch.no_grad():
        assert_outputs_close(gm(**inputs), model(**inputs), mask=inputs["attention_mask"])


def test_call_errors_name_the_input():
    model, gm = captured("bert")
    inputs = inputs_for(model)
    with pytest.raises(fxadapt.InputError, match="captured without output_hidden_states=True"):
        gm(**inputs, output_hidden_states=True)
    gm(**inputs, output_hidden_states=False, return_dict=True)  # what the capture used: accepted
    with pytest.raises(fxadapt.InputError, match="needs input 'input_ids'"):
        gm(attention_mask=inputs["attention_mask"])
    with pytest.raises(fxadapt.InputError, match="BertModel: nonsense: no such input"):
        gm(**inputs, nonsense=torch.ones(1))
    with pytest.raises(fxadapt.InputError, match=r"captured without position_ids=<tensor \(3, 11\)>; capture it with example_kwargs"):
        gm(**inputs, position_ids=torch.arange(11).expand(3, 11))


def test_capture_restores_the_models_mode_and_config():
    model = build("llama").train()
    assert model.config.use_cache is True
    gm = fxadapt.capture(model)
    assert model.training and model.config.use_cache is True
    assert gm.training


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def test_symbolic_trace_front_end_without_example_inputs():
    model = Mlp().eval()
    gm = fxadapt.capture(model)
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))
    gm.train()
    torch.manual_seed(0)
    assert not torch.equal(gm(x), model(x))  # dropout is on in training mode


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # neither symbolic_trace nor export can capture this branch
            return self.fc(x)
        return x


def test_untraceable_module_asks_for_example_inputs():
    with pytest.raises(fxadapt.CaptureError, match="pass example_inputs"):
        fxadapt.capture(DataDependent())


def test_export_failure_says_why_and_what_to_pass():
    with pytest.raises(fxadapt.CaptureError, match="torch.export could not capture DataDependent"):
        fxadapt.capture(DataDependent(), (torch.randn(2, 4),))


def test_transformers_model_with_another_main_input_asks_for_inputs():
    class Audio(nn.Module):
        main_input_name = "input_features"

        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {})()
            self.fc = nn.Linear(4, 4)

        def forward(self, input_features):
            return self.fc(input_features)

    with pytest.raises(fxadapt.CaptureError, match="example_kwargs=\\{'input_features'"):
        fxadapt.capture(Audio())
    gm = fxadapt.capture(Audio(), example_kwargs={"input_features": torch.randn(2, 4)})
    assert gm(input_features=torch.randn(5, 4)).shape == (5, 4)


def test_capture_rejects_non_modules_and_adapted_modules():
    with pytest.raises(fxadapt.CaptureError, match="takes an nn.Module"):
        fxadapt.capture(lambda x: x)
    _, gm = captured("bert")
    with pytest.raises(fxadapt.CaptureError, match="already an AdaptedModule"):
        fxadapt.capture(gm)


def test_full_model_keeps_parameters_the_graph_never_reads():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.spare = nn.Linear(4, 4), nn.Linear(4, 100)

        def forward(self, x):
            return self.fc(x)

    model = Unused()
    gm = fxadapt.capture(model, (torch.randn(2, 4),))
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters())
