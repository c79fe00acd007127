"""Per-sample routing (``adapter_names``): PEFT's ``adapter_names`` forward in the same process is the
oracle for LoRA; for (IA)^3 and bottleneck adapters, the oracle is each row of the module with that
one adapter active; ``"__base__"`` rows are the base model's. Compiled with one graph, no break and no
recompilation when the routing changes; bad routing is an InputError that leaves the module as it was."""

from __future__ import annotations

import copy
import random

import peft
import pytest
import torch

import fxadapt
from conftest import captured, copy_peft_lora, inputs_for, perturb_, reference, restored
from fxadapt.errors import InputError
from fxadapt.testing import assert_outputs_close, assert_unchanged, relative_error, rounding_tolerance, snapshot

# The same function as PEFT's / the single adapter's, with the rows' factors gathered and batched:
# two layers of float32 sums of up to 64 products; gradients sum once more over batch and sequence.
RTOL = rounding_tolerance(torch.float32, 64, depth=2)
GRAD_RTOL = rounding_tolerance(torch.float32, 64 * 44, depth=2)

PEFT_TARGETS = {"bert": (["query", "value"], ["query", "key", "value"]), "llama": (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj"])}


def _first(output) -> torch.Tensor:
    return output[0] if not isinstance(output, torch.Tensor) else output


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_lora_routing_matches_peft_adapter_names(arch):
    model, gm = captured(arch)
    a_targets, b_targets = PEFT_TARGETS[arch]
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, lora_alpha=16, target_modules=a_targets, init_lora_weights=False),
                                 adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(r=4, lora_alpha=12, target_modules=b_targets, init_lora_weights=False))
    theirs.eval()
    with restored(gm, "one", "two"):
        gm.add_adapter("one", fxadapt.LoRAConfig(r=8, alpha=16))
        gm.add_adapter("two", fxadapt.LoRAConfig(r=4, alpha=12, attn_matrices=["q", "k", "v"]))
        copied = copy_peft_lora(theirs, gm)
        assert copied == 2 * (len(a_targets) + len(b_targets)) * 2  # A and B, two layers
        inputs = inputs_for(model, batch=5)
        names = ["one", "two", "__base__", "one", "two"]
        extra = {"use_cache": False} if arch == "llama" else {}
        with torch.no_grad():
            expected = theirs(**inputs, **extra, adapter_names=names)[0]
            got = gm(**inputs, adapter_names=names)[0]
            base = _first(reference(model, inputs))
        for row in (0, 1, 3, 4):
            assert relative_error(base[row], expected[row]) > 100 * RTOL, "LoRA hardly changes the row"
        assert_outputs_close(got, expected, rtol=RTOL, mask=inputs["attention_mask"])
        assert_outputs_close(got[2], base[2], rtol=RTOL)
        # the index form routes the same
        assert torch.equal(gm(**inputs, adapter_names=gm.adapter_indices(names))[0], got)


def _add_mixed(gm):
    """LoRA of two ranks, (IA)^3, Pfeiffer and Houlsby (wired differently), moved off their initial values."""
    gm.add_adapter("lora8", fxadapt.LoRAConfig(r=8, intermediate_lora=True))
    gm.add_adapter("lora2", fxadapt.LoRAConfig(r=2, attn_matrices=["q", "k", "v"]))
    gm.add_adapter("ia3", "ia3")
    gm.add_adapter("pfeiffer", "pfeiffer")
    gm.add_adapter("houlsby", "houlsby")
    for i, name in enumerate(("lora8", "lora2", "ia3", "pfeiffer", "houlsby")):
        perturb_(gm._adapter_parameters(name), std=0.2, seed=i)


MIXED = ["lora8", "lora2", "ia3", "pfeiffer", "houlsby", "__base__"]


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_each_row_is_the_module_with_its_one_adapter(arch):
    model, gm = captured(arch)
    with restored(gm, *MIXED[:-1]):
        _add_mixed(gm)
        inputs = inputs_for(model, batch=6)
        names = MIXED[::-1]
        with torch.no_grad():
            got = gm(**inputs, adapter_names=names)[0]
            base = _first(reference(model, inputs))
            for row, name in enumerate(names):
                gm.set_active_adapters(None if name == "__base__" else name)
                expected = gm(**inputs)[0]
                if name != "__base__":
                    assert relative_error(expected[row], base[row]) > 100 * RTOL, f"{name} hardly changes its row"
                assert_outputs_close(got[row], expected[row], rtol=RTOL)


def test_routed_gradients_are_each_adapters_own_rows():
    model, gm = captured("bert")
    with restored(gm, *MIXED[:-1]):
        _add_mixed(gm)
        inputs = inputs_for(model, batch=4, pad=False)
        names = ["pfeiffer", "lora8", "__base__", "lora8"]
        weights = torch.randn(4, 11, 32, generator=torch.Generator().manual_seed(0))
        params = {n: gm._adapter_parameters(n) for n in MIXED[:-1]}
        out = gm(**inputs, adapter_names=names)[0]
        grads = torch.autograd.grad((out * weights).sum(), [p for ps in params.values() for p in ps], allow_unused=True)
        routed, i = {}, 0
        for name, ps in params.items():
            routed[name], i = grads[i:i + len(ps)], i + len(ps)
        for name in ("ia3", "lora2", "houlsby"):  # no row of theirs: no gradient
            assert all(g is None or not g.any() for g in routed[name]), name
        for name in ("pfeiffer", "lora8"):
            gm.set_active_adapters(name)
            rows = [i for i, n in enumerate(names) if n == name]
            alone = gm(**inputs)[0]
            expected = torch.autograd.grad((alone[rows] * weights[rows]).sum(), params[name])
            for g, e in zip(routed[name], expected):
                assert e.abs().max() > 0
                assert_outputs_close(g, e, rtol=GRAD_RTOL)


def test_compiled_routing_one_graph_no_recompile(fresh_dynamo):
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    model, gm = captured("bert")
    with restored(gm, *MIXED[:-1]):
        _add_mixed(gm)
        inputs = inputs_for(model, batch=6)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(gm, fullgraph=True, backend=counter)
        shuffle = random.Random(0)
        names = list(MIXED)
        with torch.no_grad():
            for _ in range(3):
                shuffle.shuffle(names)
                index = gm.adapter_indices(names)
                assert_outputs_close(compiled(**inputs, adapter_names=index)[0], gm(**inputs, adapter_names=names)[0], rtol=RTOL)
        assert counter.frame_count == 1, f"{counter.frame_count} compilations for three routings"
        assert not counters["graph_break"], dict(counters["graph_break"])


def test_bad_routing_is_an_input_error_and_changes_nothing():
    model, gm = captured("bert")
    with restored(gm, "lora", "prefix", "ia3"):
        gm.add_adapter("lora", "lora", set_active=True)
        gm.add_adapter("prefix", "prefix_tuning")
        gm.add_adapter("ia3", "ia3")
        inputs = inputs_for(model, batch=3)
        before = snapshot(gm)
        cases = [
            (["lora", "lora"], "2 names for a batch of 3 rows"),
            (["lora", "nope", "__base__"], "'nope', which is no adapter"),
            (["lora", "prefix", "__base__"], "'prefix', which cannot be routed per row"),
            ("lora", "list of adapter names"),
            (torch.tensor([0, 1]), "2 indices for a batch of 3 rows"),
            (torch.tensor([0, 1, 3]), "index 3"),
            (torch.tensor([0.0, 1.0, 0.0]), "1-D int64"),
        ]
        for names, message in cases:
            with pytest.raises(InputError, match=message):
                gm(**inputs, adapter_names=names)
        assert_unchanged(gm, before)
        gm.merge_adapter("ia3")
        before = snapshot(gm)
        with pytest.raises(InputError, match=r"merged.*reset_adapter"):
            gm(**inputs, adapter_names=["lora"] * 3)
        assert_unchanged(gm, before)
        gm.reset_adapter("ia3")
