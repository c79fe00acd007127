"""PEFT 0.21 in the same process is the oracle for LoRA (scaling, rsLoRA) and (IA)^3: same weights,
same outputs and the same gradients."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxadapt
from conftest import build, inputs_for
from fxadapt.testing import assert_outputs_close, rounding_tolerance

# The same function as PEFT's, written with other ops (and a merged weight rounded once more): two layers
# of float32 sums of up to 64 products; gradients sum once more, over batch and sequence (3 x 11).
RTOL = rounding_tolerance(torch.float32, 64, depth=2)
GRAD_RTOL = rounding_tolerance(torch.float32, 64 * 33, depth=2)


def _peft_weights(peft_model, kind: str) -> dict[str, torch.Tensor]:
    """PEFT's adapter weights keyed by module path and our parameter name."""
    out = {}
    for name, p in peft_model.named_parameters():
        if f".{kind}" not in name:
            continue
        path = name.removeprefix("base_model.model.").split(f".{kind}")[0]
        if kind == "lora_":
            which = "lora_A" if ".lora_A." in name else "lora_B"
            out[f"{path}.{which}"] = p
        else:
            out[f"{path}.scale"] = p
    return out


def _load_into(gm, name: str, weights: dict[str, torch.Tensor]) -> None:
    ours = gm.adapter_state_dict(name)
    assert sorted(ours) == sorted(weights)
    with torch.no_grad():
        for key, value in weights.items():
            ours[key].copy_(value.reshape(ours[key].shape))


def _loss(output) -> torch.Tensor:
    return output[0].float().pow(2).mean()


@pytest.mark.parametrize("arch, targets", [("bert", ["query", "value"]), ("llama", ["q_proj", "v_proj"])])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_outputs_and_gradients_match_peft(arch, targets, rslora):
    model = build(arch)
    ours = fxadapt.rewrite(copy.deepcopy(model), fxadapt.LoRAConfig(r=8, alpha=16, use_rslora=rslora))
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_rslora=rslora,
                                                        init_lora_weights=False, lora_dropout=0.0))
    theirs.eval()
    weights = _peft_weights(theirs, "lora_")
    _load_into(ours, "lora", weights)
    ours.train_adapter("lora")
    ours.eval()

    inputs = inputs_for(model, pad=False)
    extra = {"use_cache": False} if arch == "llama" else {}
    with theirs.disable_adapter(), torch.no_grad():
        base = theirs(**inputs, **extra)[0]
    out_t, out_o = theirs(**inputs, **extra), ours(**inputs)
    assert not torch.allclose(out_t[0], base)  # PEFT's adapter acts: there is something to agree on
    assert_outputs_close(out_o[0], out_t[0], rtol=RTOL)
    _loss(out_t).backward()
    _loss(out_o).backward()
    grads = ours.adapter_state_dict("lora")
    for key, p in weights.items():
        assert p.grad.abs().max() > 0, key
        assert_outputs_close(grads[key].grad, p.grad, rtol=GRAD_RTOL)
    assert all(p.grad is None for n, p in ours.named_parameters() if ".loras." not in n)


def test_ia3_matches_peft():
    model = build("bert")
    ours = fxadapt.rewrite(copy.deepcopy(model), "ia3")
    theirs = peft.get_peft_model(model, peft.IA3Config(target_modules=["key", "value", "intermediate.dense"], feedforward_modules=[],
                                                       init_ia3_weights=False))
    theirs.eval()
    weights = _peft_weights(theirs, "ia3_l")
    _load_into(ours, "ia3", weights)
    inputs = inputs_for(model, pad=False)
    with torch.no_grad():
        with theirs.disable_adapter():
            base = theirs(**inputs)[0]
        expected = theirs(**inputs)[0]
        assert not torch.allclose(expected, base)
        assert_outputs_close(ours(**inputs)[0], expected, rtol=RTOL)
        merged = copy.deepcopy(ours)
        merged.merge_adapter("ia3")
        theirs.merge_adapter()
        assert_outputs_close(merged(**inputs)[0], theirs(**inputs)[0], rtol=RTOL)


def test_merge_matches_peft_merge():
    model = build("bert")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ours = fxadapt.rewrite(copy.deepcopy(model), fxadapt.LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"]))
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value"], init_lora_weights=False))
    _load_into(ours, "lora", _peft_weights(theirs, "lora_"))
    ours.merge_adapter("lora")
    merged = theirs.merge_and_unload()
    for layer in (0, 1):
        for path in ("query", "key", "value"):
            name = f"encoder.layer.{layer}.attention.self.{path}.weight"
            expected = merged.get_parameter(name).detach()
            assert not torch.allclose(expected, original[name])  # the merge moved the weight
            # W + s*BA: a sum of 4 products and one more sum, each rounded (PEFT may order them otherwise)
            assert_outputs_close(ours.get_parameter(name).detach(), expected, rtol=rounding_tolerance(torch.float32, 4, depth=2))
