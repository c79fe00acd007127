"""Composition blocks (fxadapt.composition: Stack, Parallel, BatchSplit, Split, Average) against AdapterHub
1.3.0's own outputs (tests/fixtures/adapterhub/<model>/compose_*/, made by make_adapterhub_fixtures.py
--compositions), AdapterHub's rules as typed errors that change nothing, gradients by hand, one compiled
graph per composition, and Stack / Average of LoRAs folded into one LoRA and merged."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import fxadapt
from conftest import HUB, HUB_RTOL as RTOL, captured, hub_base, hub_io, inputs_for, restored
from fxadapt.composition import Average, BatchSplit, Block, Parallel, Split, Stack, to_lora
from fxadapt.errors import AdapterError, InputError
from fxadapt.testing import assert_unchanged, relative_error, snapshot

FIXTURES = sorted(f"{d.parent.name}/{d.name}" for d in HUB.glob("*/compose_*") if d.is_dir())


def run(gm, inputs):
    with torch.no_grad():
        return gm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state


def load(gm, fixture: str) -> dict:
    """Load the fixture's adapters into ``gm`` (with what AdapterHub's save_adapter left out); its meta."""
    meta = json.loads((HUB / fixture / "meta.json").read_text())
    for name in meta["adapters"]:
        directory = HUB / fixture / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Compacter's rule missing from AdapterHub's file: put back below
            gm.load_adapter(str(directory), name)
        if (directory / "not_saved_by_adapterhub.safetensors").exists():
            state = gm.adapter_state_dict(name)
            with torch.no_grad():
                for key, value in load_file(directory / "not_saved_by_adapterhub.safetensors").items():
                    state[key.replace(f".{name}.", ".")].copy_(value)
    return meta


@pytest.mark.parametrize("fixture", FIXTURES)
def test_matches_adapterhub(fixture, hub_clean):
    gm = hub_base(fixture.split("/")[0])
    meta = load(gm, fixture)
    setup = Block.from_dict(meta["composition"])
    gm.set_active_adapters(setup)
    assert gm.active_adapters == setup and gm.active_adapters.to_dict() == meta["composition"]  # AdapterHub's normalised weights too
    out, expected = run(gm, hub_io(fixture)), hub_io(fixture)["last_hidden_state"]
    assert out.shape == expected.shape  # Parallel: one batch per branch
    error = relative_error(out, expected)
    assert error < RTOL, f"{fixture}: {error:.2e}"
    base_out = hub_io(fixture)["base_last_hidden_state"]
    assert relative_error(out[: base_out.shape[0]], base_out) > 1e3 * RTOL  # the adapters act


def test_fixtures_cover_every_block():
    kinds = {(f.split("/")[1].split("_")[1], f.split("/")[1].split("_")[2]) for f in FIXTURES}
    for block in ("stack", "parallel", "batchsplit", "split", "average"):
        assert (block, "pfeiffer") in kinds
    assert {("stack", "lora"), ("stack", "prefix"), ("parallel", "prefix"), ("average", "lora"), ("batchsplit", "lora")} <= kinds
    assert any(f.startswith("llama/compose_stack") for f in FIXTURES) and any(f.startswith("llama/compose_parallel") for f in FIXTURES)


def test_list_is_unchanged_and_blocks_round_trip(hub_clean):
    gm = hub_base("roberta")
    load(gm, "roberta/compose_stack_lora_lora")
    gm.set_active_adapters(["a", "b"])  # a list composes as before: the LoRA updates add up
    assert gm.active_adapters == ["a", "b"]
    listed = run(gm, hub_io("roberta/compose_stack_lora_lora"))
    gm.set_active_adapters(Stack("a", "b"))  # AdapterHub's Stack chains them: another function
    assert relative_error(run(gm, hub_io("roberta/compose_stack_lora_lora")), listed) > 1e3 * RTOL
    setup = Stack("a", Average("a", "b", weights=[1, 3]))
    assert Block.from_dict(setup.to_dict()) == setup and setup.children[1].weights == [0.25, 0.75]
    assert fxadapt.Stack is Stack and fxadapt.Average is Average


# -- AdapterHub's rules -------------------------------------------------------------------------------

@pytest.mark.parametrize("setup, match", [
    (Stack("a", "nope"), "no adapter 'nope'"),
    (Split("a", "b", splits=[4, 3]), "Split cannot compose adapter 'a': its lora adapters compose only in Stack"),
    (Average("p", "q"), "Average cannot compose adapter 'p': its prefix adapters"),
    (Parallel("a", Parallel("b", "c")), "cannot nest Parallel"),
    (Parallel("a", Stack("b", Average("c", "a"))), "too deep"),
    (Stack("a", Stack("b", "c")), "cannot nest Stack"),
    (Stack("a", "i"), "invertible adapters"),
    (Average("a", "dora"), "'dora' has dora adapters, which do not compose"),
    # AdapterHub fails on these (its BottleneckLayer finishes all rows with the last slice's adapter)
    (Parallel("bn", "a"), r"output block of layer 0 some rows of a Parallel / BatchSplit pass a bottleneck adapter \(bn\) and some none.*adapter_names"),
    (BatchSplit("a", "bn", batch_sizes=[1, 1]), r"some rows of a Parallel / BatchSplit pass a bottleneck adapter \(bn\) and some none"),
    # AdapterHub finishes all rows with the last slice's method: (IA)^3's scales added as LoRA updates
    (Parallel("ia", "a"), r"at encoder.layer.0.attention.self.value \(v\) some slices of a Parallel / BatchSplit end with a LoRA and some with an \(IA\)\^3"),
])
def test_refused_setups_change_nothing(setup, match, hub_clean):
    gm = hub_base("roberta")
    load(gm, "roberta/compose_batchsplit_lora_stack")
    gm.add_adapter("p", fxadapt.PrefixTuningConfig(prefix_length=2))
    gm.add_adapter("q", fxadapt.PrefixTuningConfig(prefix_length=2))
    gm.add_adapter("i", "pfeiffer+inv")
    gm.add_adapter("dora", fxadapt.DoRAConfig(r=2))
    gm.add_adapter("bn", "pfeiffer")
    gm.add_adapter("ia", "ia3")
    gm.set_active_adapters(Stack("a", "b"))
    before = snapshot(gm)
    with pytest.raises(AdapterError, match=match):
        gm.set_active_adapters(setup)
    assert_unchanged(gm, before)
    assert gm.active_adapters == Stack("a", "b")


# Each role of a fused projection composes its own adapters; a LoRA on q and one on v are two places.
# Oracles: the adapters alone, and a plain list (a Stack of adapters at different places adds them up).
@pytest.mark.parametrize("arch", ["gpt2", "deberta", "phi3"])  # flattened inputs and columns by range; interleaved columns; by range
def test_blocks_on_fused_projections_compose_each_role(arch):
    model, gm = captured(arch)
    gm.add_adapter("q", fxadapt.LoRAConfig(r=2, attn_matrices=["q"], init_weights="bert"))
    gm.add_adapter("v", fxadapt.LoRAConfig(r=3, attn_matrices=["v"], init_weights="bert"))
    gm.add_adapter("qv", fxadapt.LoRAConfig(r=2, attn_matrices=["q", "v"], init_weights="bert"))
    gm.add_adapter("i", "ia3")
    gm.add_adapter("j", "ia3")
    with restored(gm, "q", "v", "qv", "i", "j"):
        with torch.no_grad():
            for name in ("i", "j"):
                for p in gm._adapter_parameters(name):
                    p.normal_(1.0, 0.2)
        inputs = inputs_for(model)

        def out(setup):
            gm.set_active_adapters(setup)
            with torch.no_grad():
                return gm(**inputs)[0]

        alone = {name: out(name) for name in ("q", "v", "qv", "i", "j")}
        assert relative_error(alone["q"], alone["v"]) > 100 * RTOL and relative_error(alone["i"], alone["j"]) > 100 * RTOL
        for setup, expected in [
            (Stack("qv"), alone["qv"]),
            (Stack("q", "v"), out(["q", "v"])),
            (Parallel("q", "v"), torch.cat([alone["q"], alone["v"]])),
            (Parallel("qv", Stack("q", "v")), torch.cat([alone["qv"], out(["q", "v"])])),
            (BatchSplit("i", "j", "i", batch_sizes=[1, 1, 1]), torch.cat([alone["i"][:1], alone["j"][1:2], alone["i"][2:]])),
        ]:
            error = relative_error(out(setup), expected)
            assert error < RTOL, f"{setup}: {error:.2e}"


def test_stacked_loras_need_square_projections(hub_clean):
    # AdapterHub itself fails on this one (compose_failed.json): v_proj maps 64 -> 32 under grouped-query attention.
    assert "stack_lora_lora" in json.loads((HUB / "llama" / "compose_failed.json").read_text())
    gm = hub_base("llama")
    gm.add_adapter("a", fxadapt.LoRAConfig(r=4))
    gm.add_adapter("b", fxadapt.LoRAConfig(r=4))
    before = snapshot(gm)
    with pytest.raises(AdapterError, match=r"Stack\('a', 'b'\).*v_proj.*in_features == out_features.*64 -> 32"):
        gm.set_active_adapters(Stack("a", "b"))
    assert_unchanged(gm, before)


@pytest.mark.parametrize("bad", [
    lambda: BatchSplit("a", "b", batch_sizes=[1]),
    lambda: Split("a", "b", splits=[1, -1]),
    lambda: Average("a", "b", weights=[1, -1]),
    lambda: Average("a", "b", weights=[1, float("nan")]),
    lambda: Stack(),
])
def test_bad_blocks(bad):
    with pytest.raises(AdapterError):
        bad()


def test_sizes_checked_at_call_time(hub_clean):
    gm = hub_base("roberta")
    load(gm, "roberta/compose_batchsplit_pfeiffer_pfeiffer")
    inputs = hub_io("roberta/compose_batchsplit_pfeiffer_pfeiffer")
    gm.set_active_adapters(BatchSplit("a", "b", batch_sizes=[1, 2]))
    with pytest.raises(InputError, match=r"batch_sizes=\[1, 2\] sum to 3, but the batch size there is 2"):
        run(gm, inputs)
    gm.set_active_adapters(Parallel(Stack("a"), BatchSplit("a", "b", batch_sizes=[1, 1])))  # inside Parallel: one branch's rows
    assert run(gm, inputs).shape[0] == 4
    gm.set_active_adapters(Split("a", "b", splits=[4, 4]))
    with pytest.raises(InputError, match=r"splits=\[4, 4\] sum to 8, but the sequence length is 7"):
        run(gm, inputs)


# -- training, compile, merge -------------------------------------------------------------------------

def test_gradients_reach_exactly_the_composition(hub_clean):
    gm = hub_base("roberta")
    load(gm, "roberta/compose_batchsplit_lora_stack")
    gm.add_adapter("d", fxadapt.LoRAConfig(r=4, init_weights="bert"))
    setup = BatchSplit("a", Stack("b", "c"), batch_sizes=[1, 1])
    gm.train_adapter(setup)
    assert gm.active_adapters == setup
    gm.eval()  # no dropout: the hand check below is exact
    inputs = hub_io("roberta/compose_batchsplit_lora_stack")
    out = gm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    out[1].square().sum().backward()  # the second row only: Stack("b", "c") acts on it, "a" on the first
    grads = {n: (p.grad is not None and bool(p.grad.abs().sum() > 0)) for n, p in gm.named_parameters()}
    for name, moved in grads.items():
        owner = next((a for a in "abcd" if f".{a}." in f".{name}."), None)
        assert moved == (owner in ("b", "c")), name
    assert all(p.grad is None for n, p in gm.named_parameters() if ".d." in f".{n}." or not p.requires_grad)
    gm.zero_grad(set_to_none=True)
    for p in gm.parameters():
        p.requires_grad_(False)


def test_compiles_as_one_graph(hub_clean):
    from torch._dynamo.utils import counters

    gm = hub_base("roberta")
    load(gm, "roberta/compose_stack_pfeiffer_lora")  # a: Pfeiffer, b: LoRA
    gm.set_active_adapters(Parallel(Stack("a", "b"), BatchSplit(Stack("a", "b"), "a", batch_sizes=[1, 1])))
    inputs = hub_io("roberta/compose_stack_pfeiffer_lora")
    eager = run(gm, inputs)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    out = run(compiled, inputs)
    assert sum(counters["graph_break"].values()) == 0
    assert relative_error(out, eager) < RTOL
    torch._dynamo.reset()


@pytest.mark.parametrize("setup", [Stack("a", "b"), Average("a", "b", weights=[0.2, 0.9]), Stack("a", Average(Stack("a", "b"), "b"))])
def test_stack_and_average_of_loras_merge(setup, hub_clean):
    gm = hub_base("roberta")
    load(gm, "roberta/compose_stack_lora_lora")
    inputs = hub_io("roberta/compose_stack_lora_lora")
    gm.set_active_adapters(setup)
    composed = run(gm, inputs)
    to_lora(gm, "m", setup)
    gm.set_active_adapters("m")
    assert relative_error(run(gm, inputs), composed) < RTOL
    gm.merge_adapter("m")
    assert relative_error(run(gm, inputs), composed) < RTOL
    gm.reset_adapter("m")


def test_only_stack_and_average_of_loras_merge(hub_clean):
    gm = hub_base("roberta")
    load(gm, "roberta/compose_stack_pfeiffer_lora")
    before = snapshot(gm)
    with pytest.raises(AdapterError, match="'a' is not an ungated LoRA"):
        to_lora(gm, "m", Stack("a", "b"))
    with pytest.raises(AdapterError, match="BatchSplit does not fold"):
        to_lora(gm, "m", BatchSplit("b", "b", batch_sizes=1))
    assert_unchanged(gm, before)


def test_merging_a_composed_adapter_alone_is_refused(hub_clean):
    gm = hub_base("roberta")
    load(gm, "roberta/compose_stack_lora_lora")
    gm.set_active_adapters(Stack("a", "b"))
    before = snapshot(gm)
    with pytest.raises(fxadapt.MergeError, match=r"compose as Stack\('a', 'b'\).*to_lora"):
        gm.merge_adapter("a")
    with pytest.raises(fxadapt.MergeError, match="to_lora"):
        gm.merge_and_unload()
    with pytest.raises(AdapterError, match="not a composition block"):
        gm.merge_adapter(Stack("a", "b"))
    assert_unchanged(gm, before)


@pytest.mark.parametrize("fixture", ["roberta/compose_stack_lora_lora", "roberta/compose_stack_ia3_ia3"])
def test_parallel_is_each_branch_alone(fixture, hub_clean):
    # AdapterHub 1.3.0 fails on a Parallel of LoRAs on RoBERTa (compose_failed.json); the block's definition is
    # the oracle: each branch's output is the model with that adapter alone, concatenated along the batch.
    gm = hub_base("roberta")
    load(gm, fixture)
    inputs = hub_io(fixture)
    alone = []
    for name in ("a", "b"):
        gm.set_active_adapters(name)
        alone.append(run(gm, inputs))
    gm.set_active_adapters(Parallel("a", "b"))
    out = run(gm, inputs)
    assert relative_error(out, torch.cat(alone)) < RTOL
    assert relative_error(alone[0], alone[1]) > 1e3 * RTOL
    gm.set_active_adapters(BatchSplit("b", "a", batch_sizes=[1, 1]))
    assert relative_error(run(gm, inputs), torch.cat([alone[1][:1], alone[0][1:]])) < RTOL


# AdapterHub 1.3.0 pads the shorter prefixes of a Parallel / BatchSplit with pad_token_id keys and values
# and pads the mask with a value that does not hide them (+1.0 on an additive mask), so its branches
# differ from the adapters alone (on Llama by as much as the outputs themselves; measured in its
# environment). fxadapt masks the padding, and the block's definition is the oracle: each slice as
# with its own setup alone.
# SDPA with a boolean mask (bert; llama with grouped keys), matmul attention (deberta; deberta-v2 with batch and
# heads flattened in its keys), an additive mask (t5)
@pytest.mark.parametrize("arch", ["bert", "deberta", "deberta-v2", "llama", "t5-encoder"])
def test_prefixes_of_different_lengths_are_each_slice_alone(arch):
    model, gm = captured(arch)
    gm.add_adapter("a", fxadapt.PrefixTuningConfig(prefix_length=3, init_weights_seed=1))
    gm.add_adapter("b", fxadapt.PrefixTuningConfig(prefix_length=5, init_weights_seed=2))
    gm.add_adapter("l", fxadapt.LoRAConfig(r=2, selfattn_lora=False, intermediate_lora=True, init_weights="bert"))  # no prefix
    with restored(gm, "a", "b", "l"):
        inputs = inputs_for(model)

        def out(setup):
            gm.set_active_adapters(setup)
            with torch.no_grad():
                return gm(**inputs)[0]

        alone = {name: out(setup) for name, setup in [("a", "a"), ("b", "b"), ("l", "l"), ("ab", Stack("a", "b"))]}
        assert relative_error(alone["a"], alone["b"]) > 100 * RTOL
        for setup, expected in [
            (Parallel("a", "b"), [alone["a"], alone["b"]]),
            (Parallel(Stack("a", "b"), "a", "l"), [alone["ab"], alone["a"], alone["l"]]),
            (BatchSplit("b", "l", "a", batch_sizes=[1, 1, 1]), [alone["b"][:1], alone["l"][1:2], alone["a"][2:]]),
        ]:
            error = relative_error(out(setup), torch.cat(expected))
            assert error < RTOL, f"{setup}: {error:.2e}"


@pytest.mark.parametrize("causal", [False, True])  # SDPA without a mask, and causal SDPA
def test_prefixes_of_different_lengths_without_a_mask_compile_whole(causal):
    from torch._dynamo.utils import counters
    from test_prefix import OneLayer

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    gm = fxadapt.capture(OneLayer(causal=causal).eval(), example_inputs=(x,))
    gm.add_adapter("a", fxadapt.PrefixTuningConfig(prefix_length=2, flat=True, init_weights_seed=1))
    gm.add_adapter("b", fxadapt.PrefixTuningConfig(prefix_length=4, flat=True, init_weights_seed=2))
    with torch.no_grad():
        alone = []
        for name in ("a", "b"):
            gm.set_active_adapters(name)
            alone.append(gm(x))
        gm.set_active_adapters(Parallel("a", "b"))
        assert relative_error(gm(x), torch.cat(alone)) < RTOL
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(gm, fullgraph=True, backend="eager")
        assert relative_error(compiled(x), torch.cat(alone)) < RTOL
        assert sum(counters["graph_break"].values()) == 0
        torch._dynamo.reset()


def test_leaving_a_composition(hub_clean):
    gm = hub_base("roberta")
    load(gm, "roberta/compose_stack_pfeiffer_pfeiffer")
    gm.set_active_adapters(Stack("a", "b"))
    gm.set_active_adapters(["a"])  # a list: no block any more
    assert gm.active_adapters == ["a"]
    gm.set_active_adapters(Stack("a", "b"))
    gm.delete_adapter("b")  # the block without b is no block: nothing acts
    assert gm.active_adapters == []
    assert relative_error(run(gm, hub_io("roberta/compose_stack_pfeiffer_pfeiffer")),
                          hub_io("roberta/compose_stack_pfeiffer_pfeiffer")["base_last_hidden_state"]) < RTOL
