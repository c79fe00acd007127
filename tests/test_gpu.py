"""On a CUDA device: capture, rewrite, train with inductor, merge in bfloat16, export and save/load
models whose weights live on the GPU. Skipped where torch sees no CUDA device (CI has none);
``benchmarks/gpu.sh`` runs these with the GPU benchmark. ``FXADAPT_TEST_DEVICE=cpu`` runs them on
the CPU (to check the tests themselves)."""

from __future__ import annotations

import os

import pytest
import torch

import fxadapt
from conftest import ONE_LAYER, assert_inductor_step_matches_eager, distinct_configs, inputs_for, perturb_
from fxadapt.testing import assert_outputs_close, rounding_tolerance

DEVICE = os.environ.get("FXADAPT_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("fresh_dynamo")]
CONFIGS = distinct_configs()  # Compacter at a size valid for hidden 32
RTOL = rounding_tolerance(torch.float32, 64)  # one layer; another device sums in another order

def _on_device(arch: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return ONE_LAYER[arch]().to(DEVICE, dtype).eval()


def _device_inputs(model, **kw) -> dict:
    return {k: v.to(DEVICE) for k, v in inputs_for(model, **kw).items()}


def test_capture_on_device_runs_other_shapes_with_the_models_outputs():
    model = _on_device("llama")
    gm = fxadapt.capture(model)
    assert next(gm.parameters()).device.type == DEVICE
    for batch, seq in ((1, 5), (4, 40)):
        inputs = _device_inputs(model, batch=batch, seq=seq)
        with torch.no_grad():
            assert_outputs_close(gm(**inputs).logits, model(**inputs, use_cache=False).logits, rtol=RTOL)


def test_rewritten_on_the_cpu_then_moved_computes_the_same():
    torch.manual_seed(0)
    model = ONE_LAYER["llama"]().eval()
    gm = fxadapt.rewrite(model, "unipelt")
    perturb_(gm.adapter_state_dict("unipelt").values())
    gm.add_adapter("lora", "lora", set_active=False)
    perturb_(gm.adapter_state_dict("lora").values())
    gm.set_active_adapters(["unipelt", "lora"])
    gm.merge_adapter("lora")
    inputs = inputs_for(model)
    with torch.no_grad():
        expected = gm(**inputs).logits
        gm.to(DEVICE)
        got = gm(**{k: v.to(DEVICE) for k, v in inputs.items()}).logits
        assert_outputs_close(got.cpu(), expected, rtol=RTOL)
        gm.reset_adapter("lora")
        assert all(p.device.type == DEVICE for p in gm.parameters())
        gm.cpu()  # and back, with the LoRA now acting unmerged
        assert_outputs_close(gm(**inputs).logits, expected, rtol=RTOL)


def test_bfloat16_merge_equals_unmerged_and_reset_is_bit_exact():
    model = _on_device("llama", torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(attn_matrices=("q", "k", "v", "o"), intermediate_lora=True, output_lora=True))
    gm.add_adapter("ia3", "ia3", set_active=True)
    gm.set_active_adapters(["lora", "ia3"])
    for name in ("lora", "ia3"):
        perturb_(gm.adapter_state_dict(name).values())
    inputs = _device_inputs(model)
    with torch.no_grad():
        unmerged = gm(**inputs).logits
        gm.merge_adapter(["lora", "ia3"])
        merged = gm(**inputs).logits
        gm.reset_adapter()
        gm.set_active_adapters(None)
        base = gm(**inputs).logits
    assert not torch.allclose(unmerged, base)
    assert_outputs_close(merged, unmerged, rtol=4 * torch.finfo(torch.bfloat16).eps)  # a few bfloat16 roundings of W + BA and after
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_export_on_device_keeps_dynamic_shapes_and_round_trips(tmp_path):
    model = _on_device("bert")
    gm = fxadapt.rewrite(model, "unipelt")
    perturb_(gm.adapter_state_dict("unipelt").values())
    program = fxadapt.export(gm, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    gm.eval()
    for batch, seq in ((1, 5), (3, 30)):
        inputs = gm._fx_inputs.bind("BertModel", (), _device_inputs(model, batch=batch, seq=seq))
        with torch.no_grad():
            expected = gm(**inputs)[0]
            for module in (program.module(), loaded):
                assert_outputs_close(module(**inputs)[0], expected, rtol=RTOL)


def test_save_and_load_adapter_of_a_device_model_is_bit_identical(tmp_path):
    model = _on_device("llama")
    gm = fxadapt.rewrite(model, "mam")
    perturb_(gm.adapter_state_dict("mam").values())
    inputs = _device_inputs(model)
    with torch.no_grad():
        expected = gm(**inputs).logits
    gm.save_adapter(tmp_path / "mam", "mam")
    gm.delete_adapter("mam")
    name = gm.load_adapter(tmp_path / "mam")
    gm.set_active_adapters(name)
    assert all(p.device.type == DEVICE for p in gm.adapter_state_dict(name).values())
    with torch.no_grad():
        assert torch.equal(gm(**inputs).logits, expected)


@pytest.mark.slow
@pytest.mark.parametrize("arch, config_id", [
    *(("bert", c) for c in ("lora", "ia3", "pfeiffer", "houlsby+inv", "scaled_parallel", "compacter++", "prefix_tuning", "mam", "unipelt")),
    *(("llama", c) for c in ("lora", "prefix_tuning", "unipelt")),
])
def test_inductor_training_step_on_device_matches_eager(arch, config_id):
    model = _on_device(arch)
    gm = fxadapt.rewrite(model, CONFIGS[config_id], name="x")
    perturb_(gm.adapter_state_dict("x").values())
    gm.train_adapter("x")
    inputs = gm._fx_inputs.bind(type(model).__name__, (), _device_inputs(model))  # every graph input: the compiled pre-hook is test_compile's
    assert_inductor_step_matches_eager(gm, inputs, rtol=RTOL, grad_rtol=rounding_tolerance(torch.float32, 64 * 33, depth=2))
