"""No half-done changes: add_adapter, merge_adapter, reset_adapter, delete_adapter, set_active_adapters
and train_adapter either complete or leave the module bit for bit as it was (fxadapt.testing.snapshot /
assert_unchanged), whatever raises and wherever; sizes are checked before anything is allocated."""

from __future__ import annotations

import dataclasses
import math
import os

import peft
import pytest
import torch

import fxadapt
import fxadapt.module
from conftest import build, captured, perturb_, restored
from fxadapt.methods import METHODS
from fxadapt.testing import assert_unchanged, snapshot

GiB = 2**30
H, LAYERS = 32, 2  # the tiny BERT of conftest


@pytest.fixture
def bert():
    """The shared BERT capture with a merged LoRA "m" and an inactive (IA)^3 "i", given back clean."""
    model, gm = captured("bert")
    with restored(gm, "m", "i", "new"):
        gm.add_adapter("m", fxadapt.LoRAConfig(init_weights="bert"), set_active=True)
        gm.add_adapter("i", "ia3")
        gm.merge_adapter("m")
        yield model, gm


def _fail_on_call(n: int, error: BaseException):
    """A wrapper factory: the wrapped function raises ``error`` from its n-th call with real (not meta) tensors on."""
    def wrap(fn):
        calls = [0]

        def wrapped(*args, **kwargs):
            meta = torch.get_default_device().type == "meta" or any(
                isinstance(a, torch.Tensor) and a.is_meta or isinstance(a, (str, torch.device)) and str(a) == "meta"
                for a in (*args, *kwargs.values()))
            if not meta:
                calls[0] += 1
                if calls[0] >= n:
                    raise error
            return fn(*args, **kwargs)
        return wrapped
    return wrap


# -- sizes are checked before allocating ------------------------------------------------------------


def _lora_bytes(r: int, sites: int = 2 * LAYERS) -> int:
    """q and v of each layer: A (r, H) and B (H, r) in float32."""
    return sites * 2 * r * H * 4


def test_rank_that_does_not_fit_raises_config_error_before_allocating(bert, monkeypatch):
    """LoRAConfig(r=3_000_000) needs 3.07 GB; on a machine with 2 GiB free (the issue's) that is a
    ConfigError naming r and the bytes, and no tensor of that size is ever allocated."""
    _, gm = bert
    before = snapshot(gm)
    monkeypatch.setattr(fxadapt.module, "_available_memory", lambda device: 2 * GiB)
    real_empty, big = torch.empty, []

    def empty(*size, **kwargs):
        t = real_empty(*size, **kwargs)
        if t.device.type != "meta" and t.numel() > 10**6:
            big.append(tuple(t.shape))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(fxadapt.ConfigError, match=rf"LoRAConfig\.r=3000000 .*\({_lora_bytes(3_000_000)} bytes\).*Lower r") as e:
        gm.add_adapter("new", fxadapt.LoRAConfig(r=3_000_000))
    assert e.value.field == "r" and e.value.value == 3_000_000
    assert big == []
    assert_unchanged(gm, before)


@pytest.mark.parametrize("config, field, numel", [
    (fxadapt.LoRAConfig(r=2**31), "r", 2 * LAYERS * 2 * 2**31 * H),
    (fxadapt.LoRAConfig(rank_pattern={"value": 2**31}), "rank_pattern", LAYERS * (2 * 8 * H + 2 * 2**31 * H)),
    # A bottleneck of hidden / factor = 2**31: down and up weights and the up bias in both layers.
    (fxadapt.SeqBnConfig(reduction_factor=H / 2**31), "reduction_factor", LAYERS * (2 * H * 2**31 + 2**31 + H)),
    (fxadapt.PrefixTuningConfig(flat=True, prefix_length=2**31), "prefix_length", 2**31 * LAYERS * 2 * H),
    (fxadapt.PrefixTuningConfig(bottleneck_size=2**31), "bottleneck_size", 30 * H + H * 2**31 + 2**31 + 2**31 * 2 * LAYERS * H + 2 * LAYERS * H),
], ids=["r", "rank_pattern", "reduction_factor", "prefix_length", "bottleneck_size"])
def test_weights_larger_than_free_memory_name_the_field_that_sizes_them(bert, config, field, numel):
    """With the machine's real free memory: terabytes do not fit anywhere this suite runs."""
    _, gm = bert
    before = snapshot(gm)
    with pytest.raises(fxadapt.ConfigError, match=rf"\.{field}=.*\({numel * 4} bytes\)") as e:
        gm.add_adapter("new", config)
    assert e.value.field == field
    assert_unchanged(gm, before)


def test_free_memory_is_read_from_the_system():
    free = fxadapt.module._available_memory(torch.device("cpu"))
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < free <= total, (free, total)
    assert fxadapt.module._available_memory(torch.device("meta")) is None


def test_size_check_draws_no_random_numbers(bert):
    """The weights are built once on the meta device first: the random stream the real weights draw
    from is the one the caller seeded (oracle: the same draw made by hand)."""
    _, gm = bert
    torch.manual_seed(0)
    gm.add_adapter("new", fxadapt.LoRAConfig(r=4))
    torch.manual_seed(0)
    expected = torch.nn.init.kaiming_uniform_(torch.empty(4, H), a=math.sqrt(5))
    assert torch.equal(gm.adapter_state_dict("new")["encoder.layer.0.attention.self.query.lora_A"], expected)


# -- failures part-way leave the module as it was ----------------------------------------------------


@pytest.mark.parametrize("error, raised", [
    (MemoryError(), fxadapt.ConfigError),  # an allocation failure says which field to lower
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), fxadapt.ConfigError),
    (RuntimeError("something else"), RuntimeError),
    (KeyboardInterrupt(), KeyboardInterrupt),
], ids=["MemoryError", "allocator", "RuntimeError", "KeyboardInterrupt"])
def test_add_adapter_failing_midway_changes_nothing(bert, monkeypatch, error, raised):
    _, gm = bert
    before = snapshot(gm)
    lora = METHODS["lora"]
    monkeypatch.setitem(METHODS, "lora", dataclasses.replace(lora, build=_fail_on_call(3, error)(lora.build)))
    with pytest.raises(raised):
        gm.add_adapter("new", fxadapt.LoRAConfig(), set_active=True)
    assert_unchanged(gm, before)


def test_add_adapter_failing_on_torch_empty_changes_nothing(bert, monkeypatch):
    _, gm = bert
    before = snapshot(gm)
    monkeypatch.setattr(torch, "empty", _fail_on_call(5, RuntimeError("DefaultCPUAllocator: can't allocate memory"))(torch.empty))
    with pytest.raises(fxadapt.ConfigError, match="allocating them failed.*Lower r"):
        gm.add_adapter("new", fxadapt.LoRAConfig(r=4), set_active=True)
    assert_unchanged(gm, before)


def _failing_insert(monkeypatch, method: str, error=RuntimeError("insert failed")):
    m = METHODS[method]

    def insert(*args):
        raise error
    monkeypatch.setitem(METHODS, method, dataclasses.replace(m, insert=insert))


def test_add_adapter_failing_in_the_graph_rewrite_changes_nothing(bert, monkeypatch):
    _, gm = bert
    before = snapshot(gm)
    _failing_insert(monkeypatch, "bottleneck")
    with pytest.raises(RuntimeError, match="insert failed"):
        gm.add_adapter("new", "pfeiffer", set_active=True)
    assert_unchanged(gm, before)


def test_activation_and_training_failing_change_nothing(bert, monkeypatch):
    _, gm = bert
    before = snapshot(gm)
    _failing_insert(monkeypatch, "ia3", MemoryError())
    with pytest.raises(MemoryError):
        gm.set_active_adapters(["m", "i"])
    assert_unchanged(gm, before)
    gm.eval()
    with pytest.raises(MemoryError):
        gm.train_adapter("i", also=["pooler"])
    assert_unchanged(gm, before)  # requires_grad flags, training mode, active adapters


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("fold failed")], ids=["MemoryError", "RuntimeError"])
def test_merge_failing_midway_changes_nothing(bert, monkeypatch, error):
    """"m" is merged; merging "i" too fails at its third fold: "m" stays merged, "i" unmerged, every weight as it was."""
    _, gm = bert
    perturb_(gm.adapter_state_dict("i").values())
    before = snapshot(gm)
    ia3 = METHODS["ia3"]
    monkeypatch.setitem(METHODS, "ia3", dataclasses.replace(ia3, fold=_fail_on_call(3, error)(ia3.fold)))
    with pytest.raises(type(error)):
        gm.merge_adapter("i")
    assert_unchanged(gm, before)


def test_reset_and_delete_failing_change_nothing(bert, monkeypatch):
    _, gm = bert
    gm.merge_adapter("i")
    before = snapshot(gm)
    lora = METHODS["lora"]
    # Resetting "i" folds "m" again from the originals: make that fail.
    monkeypatch.setitem(METHODS, "lora", dataclasses.replace(lora, fold=_fail_on_call(2, MemoryError())(lora.fold)))
    with pytest.raises(MemoryError):
        gm.reset_adapter("i")
    assert_unchanged(gm, before)
    with pytest.raises(MemoryError):
        gm.delete_adapter("i")
    assert_unchanged(gm, before)
    monkeypatch.setitem(METHODS, "lora", lora)
    monkeypatch.setattr(fxadapt.module, "insert_adapters", _fail_on_call(1, RuntimeError("rebuild failed"))(fxadapt.module.insert_adapters))
    with pytest.raises(RuntimeError, match="rebuild failed"):
        gm.delete_adapter("m")
    assert_unchanged(gm, before)


# -- safe_merge -------------------------------------------------------------------------------------


def test_safe_merge_refuses_non_finite_weights_as_peft_does(bert):
    """PEFT's safe_merge=True refuses to merge an adapter whose merged weights are not finite; so does
    fxadapt (MergeError naming the adapter and the weight), and nothing changes. Without it the merge
    goes through, as in PEFT, and reset brings the weights back."""
    _, gm = bert
    gm.add_adapter("new", fxadapt.LoRAConfig(init_weights="bert"))
    with torch.no_grad():
        gm.adapter_state_dict("new")["encoder.layer.1.attention.self.value.lora_B"][3, 0] = float("inf")
    before = snapshot(gm)
    with pytest.raises(fxadapt.MergeError, match=r"'new' makes encoder\.layer\.1\.attention\.self\.value\.weight .*non-finite"):
        gm.merge_adapter("new", safe_merge=True)
    assert_unchanged(gm, before)

    theirs = peft.get_peft_model(build("bert"), peft.LoraConfig(r=8, target_modules=["query", "value"], init_lora_weights=False))
    with torch.no_grad():
        theirs.base_model.model.encoder.layer[1].attention.self.value.lora_B["default"].weight[3, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected"):
        theirs.merge_and_unload(safe_merge=True)

    gm.merge_adapter("new")
    assert not gm.get_parameter("encoder.layer.1.attention.self.value.weight").isfinite().all()
    gm.reset_adapter("new")
    assert gm.get_parameter("encoder.layer.1.attention.self.value.weight").isfinite().all()
