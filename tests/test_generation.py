"""generate() with a KV cache on adapted decoder LMs.

Oracles: a greedy loop without a cache over the module's own full forward (every method: the same
tokens, and logits within rounding), the merged model's transformers ``generate`` (LoRA, (IA)^3),
and the base model's ``generate`` for sampling and beam search with no adapter active.
"""

import dataclasses
import functools

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaModel

import fxadapt
from fxadapt.composition import Average, BatchSplit, Fuse, Parallel, Split, Stack
from fxadapt.errors import ExportError, InputError
from fxadapt.testing import assert_outputs_close

NEW = 6


def _llama(layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=None, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0, eos_token_id=None, bos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


@functools.cache
def _captured(name):
    model = {"llama": _llama, "gpt2": _gpt2}[name]()
    ids, mask = _prompt()
    # Captured with position ids, so that the oracle passes those generate makes for left-padded rows.
    return model, fxadapt.capture(model, example_kwargs={"input_ids": ids, "attention_mask": mask, "position_ids": _positions(mask)}).eval()


@pytest.fixture(params=["llama", "gpt2"])
def lm(request):
    return _captured(request.param)


def _prompt():
    """Two prompts, the second left-padded by 2."""
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def _positions(mask):
    """Position ids as transformers' generate makes them: counted over the unpadded positions."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _logits(gm, ids, mask):
    return gm(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, -1]


def _greedy_without_cache(gm, ids, mask, steps=NEW):
    """The oracle: each token from the module's full forward over the whole sequence so far."""
    with torch.no_grad():
        for _ in range(steps):
            logits = _logits(gm, ids, mask)
            token = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


def _randomize(gm, name, seed=0):
    """Adapter weights away from their identity initialisation, so every adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gm._adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


METHODS = ["lora", "ia3", "pfeiffer", "houlsby", "pfeiffer+inv", "parallel", fxadapt.CompacterConfig(reduction_factor=4), "prefix_tuning",
           "mam", "dora", "loha"]


# Every method on Llama (rotary positions, GQA); the main families on GPT-2 (learned positions, Conv1D).
CASES = [("llama", c) for c in METHODS] + [("gpt2", c) for c in ("lora", "ia3", "houlsby", "prefix_tuning")]


@pytest.mark.parametrize(("arch", "config"), CASES)
def test_greedy_with_cache_equals_full_forward(arch, config):
    model, gm = _captured(arch)
    ids, mask = _prompt()
    base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    gm.add_adapter("a", config, set_active=True)
    try:
        _randomize(gm, "a")
        out = gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        assert torch.equal(out, _greedy_without_cache(gm, ids, mask))
        # The scores of every step equal the full forward's last-position logits.
        scores = gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, output_logits=True,
                             return_dict_in_generate=True).logits
        with torch.no_grad():
            first = _logits(gm, ids, mask)
            second = _logits(gm, out[:, :8], torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1))
        assert_outputs_close(scores[0], first)
        assert_outputs_close(scores[1], second)
        assert not torch.allclose(first, _logits(model, ids, mask))  # the adapter acts
        assert out.shape == base.shape
    finally:
        gm.delete_adapter("a")


def test_unipelt_gates_per_step(lm):
    """UniPELT's gates average over the positions of a call: the prompt step equals the full forward;
    later steps gate over their new position (as AdapterHub generates), so its tokens may part from
    a loop that re-gates the whole sequence each step."""
    model, gm = lm
    ids, mask = _prompt()
    gm.add_adapter("a", "unipelt", set_active=True)
    try:
        _randomize(gm, "a")
        out = gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
        with torch.no_grad():
            assert_outputs_close(out.logits[0], _logits(gm, ids, mask))
        assert out.sequences.shape == (2, 10)
    finally:
        gm.delete_adapter("a")


@pytest.mark.parametrize("config", ["lora", "ia3"])
def test_unmerged_and_merged_equal_merged_model(lm, config):
    model, gm = lm
    ids, mask = _prompt()
    gm.add_adapter("a", config, set_active=True)
    try:
        _randomize(gm, "a", seed=3)
        with torch.no_grad():  # small LoRA weights: merged and unmerged round alike
            for p in gm._adapter_parameters("a"):
                p.mul_(0.2)
        unmerged = gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
        reference = gm.merge_and_unload().generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        assert torch.equal(unmerged, reference)
        gm.merge_adapter("a")
        assert torch.equal(gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW), reference)
        gm.reset_adapter("a")
    finally:
        gm.delete_adapter("a")


def test_sampling_beams_and_streamer_as_transformers(lm):
    """No adapter active: the same tokens as the model's own generate, for sampling (same seed), beam
    search, a GenerationConfig and a streamer."""
    from transformers import GenerationConfig

    model, gm = lm
    ids, mask = _prompt()
    for kwargs in ({"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9},
                   {"num_beams": 3, "do_sample": False},
                   {"generation_config": GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0)}):
        kwargs = {"max_new_tokens": NEW, **kwargs} if "generation_config" not in kwargs else kwargs
        torch.manual_seed(5)
        ours = gm.generate(input_ids=ids, attention_mask=mask, **kwargs)
        torch.manual_seed(5)
        theirs = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        assert torch.equal(ours, theirs), kwargs

    class Collect:
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.append(value.reshape(-1).tolist())

        def end(self):
            self.tokens.append("end")

    streamer = Collect()
    out = gm.generate(input_ids=ids[:1], max_new_tokens=3, streamer=streamer)
    assert streamer.tokens[-1] == "end" and [t[0] for t in streamer.tokens[1:-1]] == out[0, -3:].tolist()


def test_step_graphs_follow_adapter_changes(lm):
    """Activating, deactivating and training an adapter changes what generate computes."""
    model, gm = lm
    ids, mask = _prompt()
    base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    gm.add_adapter("a", "pfeiffer")
    try:
        _randomize(gm, "a")
        assert torch.equal(gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW), base)
        gm.set_active_adapters("a")
        adapted = gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
        assert torch.equal(adapted, _greedy_without_cache(gm, ids, mask))
        with torch.no_grad():  # weights changed in place: the step graphs read the same parameters
            gm._adapter_parameters("a")[0].mul_(-1)
        assert torch.equal(gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW), _greedy_without_cache(gm, ids, mask))
        gm.set_active_adapters(None)
        assert torch.equal(gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW), base)
    finally:
        gm.delete_adapter("a")


def test_bad_input():
    gm = fxadapt.capture(LlamaModel(_llama(layers=1).config))
    with pytest.raises(InputError, match="ForCausalLM"):
        gm.generate(input_ids=torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)
    _, gm = _captured("llama")  # the other tests' capture: its decode steps are captured once per file
    with pytest.raises(InputError, match="max_position_embeddings"):
        gm.generate(input_ids=torch.ones(1, 65, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="not_an_argument"):  # transformers refuses unknown arguments
        gm.generate(input_ids=torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, not_an_argument=1)
    gm.add_adapter("p", "prompt_tuning", set_active=True)
    try:
        with pytest.raises(InputError, match="'p'"):
            gm.generate(input_ids=torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)
    finally:
        gm.delete_adapter("p")


def test_compiled_steps_compile_once():
    """gm.compile(): generate runs its step graphs compiled, each once (the past grows without
    recompiling), with the eager module's tokens; the model's mode is left as it was."""
    from torch._dynamo.utils import counters

    model = _llama(layers=1).train()  # one layer: compiled in half the time of two
    gm = fxadapt.capture(model).eval()
    gm.add_adapter("a", "lora", set_active=True)
    _randomize(gm, "a")
    ids, mask = _prompt()
    eager = gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
    assert model.training and all(m.training for m in model.modules())  # the step capture restored the model's mode
    gm.compile(backend="eager", fullgraph=True)
    torch._dynamo.reset()
    counters.clear()
    assert torch.equal(gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW), eager)
    assert counters["stats"]["unique_graphs"] == 2  # the prompt step and the token step
    gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2 * NEW)
    assert counters["stats"]["unique_graphs"] == 2


def test_export_for_serving(tmp_path):
    """fxadapt.export(gm, directory) on a causal LM: prompt and token programs whose greedy loop
    (fxadapt.load_exported) gives gm.generate's tokens, with one adapter merged into the weights and
    one unmerged (graph nodes); bad input refused."""
    from fxadapt.errors import ExportError

    model = _llama(layers=1)  # one layer: exported in half the time of two
    gm = fxadapt.capture(model).eval()
    gm.add_adapter("a", "lora", set_active=True)
    gm.add_adapter("b", "pfeiffer", set_active=True)
    for name in ("a", "b"):
        _randomize(gm, name, seed=len(name))
    with torch.no_grad():
        for p in gm._adapter_parameters("a"):
            p.mul_(0.2)
    ids, mask = _prompt()
    gm.merge_adapter("a")  # one export covers both: "a" lives in the weights, "b" is graph nodes
    expected = gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
    fxadapt.export(gm, tmp_path / "serve", max_length=32)
    runner = fxadapt.load_exported(tmp_path / "serve")
    assert torch.equal(runner.generate(ids, attention_mask=mask, max_new_tokens=NEW), expected)
    assert torch.equal(runner.generate(ids[:1, 2:], max_new_tokens=NEW), gm.generate(input_ids=ids[:1, 2:], max_new_tokens=NEW))
    gm.set_active_adapters("a")  # the runner reads the exported programs, not the module
    assert not torch.equal(gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW), expected)  # "b" acts
    assert torch.equal(runner.generate(ids, attention_mask=mask, max_new_tokens=NEW), expected)
    gm.set_active_adapters(["a", "b"])
    # eos: rows that end go on with the pad token, as transformers' generate
    eos = int(expected[0, 8])
    assert torch.equal(runner.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos),
                       gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos))
    with pytest.raises(InputError, match="max_length"):
        runner.generate(ids, max_new_tokens=30)
    with pytest.raises(ExportError, match="max_length"):
        fxadapt.export(gm, tmp_path / "other", max_length=1000)
    (tmp_path / "serve" / "token.pt2").unlink()
    with pytest.raises(ExportError, match="token.pt2"):
        fxadapt.load_exported(tmp_path / "serve")


def _seq2seq(name):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if name == "t5":
        model = T5ForConditionalGeneration(T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    else:
        model = BartForConditionalGeneration(BartConfig(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                        max_position_embeddings=64, pad_token_id=1, eos_token_id=2, decoder_start_token_id=1))
    model.generation_config.eos_token_id = model.generation_config.forced_eos_token_id = None  # run every step: the oracle has no stop
    return model.eval()


@functools.cache
def _seq2seq_captured(name):
    """The model and its capture, with the steps captured and checked once: with no adapter,
    ``gm.generate`` gives the model's own generate's tokens."""
    model = _seq2seq(name)
    gm = fxadapt.capture(model).eval()
    ids, mask = _seq2seq_prompt()
    assert torch.equal(gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW),
                       model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW))
    return model, gm


def _seq2seq_prompt():
    ids, _ = _prompt()
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # encoder inputs padded on the right
    return ids, mask


@pytest.fixture
def seq2seq(request):
    model, gm = _seq2seq_captured(request.param)
    yield model, gm
    for name in list(gm._fx_adapters):
        gm.delete_adapter(name)


@pytest.mark.parametrize(("seq2seq", "config"), [("t5", "lora"), ("t5", "pfeiffer"), ("t5", "prefix_tuning"), ("bart", "lora"),
                                                 ("bart", "houlsby"), ("bart", "ia3")], indirect=["seq2seq"])
def test_encoder_decoder_generate(seq2seq, config):
    """T5 and Bart (Marian's architecture too): generate with adapters (LoRA on q, v of self- and cross-attention) gives the tokens of a
    no-cache greedy loop over the module's full forward; with no adapter, the model's own generate's."""
    model, gm = seq2seq
    ids, mask = _seq2seq_prompt()
    gm.add_adapter("a", config, set_active=True)
    _randomize(gm, "a")
    result = gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True)
    out = result.sequences
    start = torch.full((2, 1), model.generation_config.decoder_start_token_id)
    expected = start
    with torch.no_grad():
        for _ in range(NEW):
            logits = gm(input_ids=ids, attention_mask=mask, decoder_input_ids=expected).logits[:, -1]
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, expected)
    base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    assert not torch.allclose(result.logits[0], base.logits[0])  # the adapter acts


BLOCKS = {"stack": Stack("a", "b"), "batchsplit": BatchSplit("b", "a", batch_sizes=[1, 1]), "average": Average("a", "b", weights=[0.3, 0.7]),
          "parallel": Parallel("a", "b")}


@pytest.mark.parametrize("block", list(BLOCKS))
def test_composition_blocks_generate(lm, block, tmp_path):
    """A Stack, BatchSplit or Average gives the tokens of the no-cache loop over the module's forward with the
    block active; a Parallel (AdapterHub's generate: the prompts once per branch) each branch's tokens
    alone, branch after branch. LoRAs on q and o, square also under grouped-query attention (Stack)."""
    model, gm = lm
    ids, mask = _prompt()
    for seed, name in enumerate("ab"):
        gm.add_adapter(name, fxadapt.LoRAConfig(r=4, attn_matrices=["q", "o"]))
        _randomize(gm, name, seed)
    try:
        if block == "parallel":
            expected = []
            for name in "ab":
                gm.set_active_adapters(name)
                expected.append(_greedy_without_cache(gm, ids, mask))
            expected = torch.cat(expected)
            assert not torch.equal(expected[:2], expected[2:])  # the branches differ
            gm.set_active_adapters(BLOCKS[block])
            with pytest.raises(ExportError, match="cannot export for serving under Parallel"):
                fxadapt.export(gm, tmp_path / "served")  # its loop would not repeat the prompts
            assert not (tmp_path / "served").exists()
        gm.set_active_adapters(BLOCKS[block])
        if block != "parallel":
            expected = _greedy_without_cache(gm, ids, mask)
        assert torch.equal(gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW), expected)
        if block == "batchsplit":  # beams repeat each prompt's rows: the sizes no longer match
            with pytest.raises(InputError, match=r"BatchSplit batch_sizes=\[1, 1\] sum to 2, but the batch size there is 4 \(num_beams"):
                gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2)
    finally:
        gm.delete_adapter("a")
        gm.delete_adapter("b")


def test_fusion_generates_and_split_is_refused():
    """AdapterFusion in the steps gives the no-cache loop's tokens; Split, which divides the positions of
    each call (a step sees only the new ones), is an InputError naming it."""
    _, gm = _captured("llama")
    ids, mask = _prompt()
    for seed, name in enumerate("ab"):
        gm.add_adapter(name, "pfeiffer")
        _randomize(gm, name, seed)
    try:
        gm.add_adapter_fusion(Fuse("a", "b"))
        gm.set_active_adapters(Fuse("a", "b"))
        assert torch.equal(gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW), _greedy_without_cache(gm, ids, mask))
        gm.set_active_adapters(Split("a", "b", splits=[4, 3]))
        with pytest.raises(InputError, match=r"cannot run Split\('a', 'b', splits=\[4, 3\]\): Split divides the positions"):
            gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
    finally:
        gm.set_active_adapters(None)
        gm.delete_adapter_fusion(Fuse("a", "b"))
        gm.delete_adapter("a")
        gm.delete_adapter("b")


@pytest.mark.parametrize("seq2seq", ["bart"], indirect=True)
def test_parallel_generate_on_an_encoder_decoder(seq2seq):
    """Parallel of bottleneck adapters on Bart: each branch's tokens alone, with beam search (the
    beams of a row stay in its branch's block of rows)."""
    _, gm = seq2seq
    ids, mask = _seq2seq_prompt()
    for seed, name in enumerate("ab"):
        gm.add_adapter(name, "pfeiffer")
        _randomize(gm, name, seed)
    alone = []
    for name in "ab":
        gm.set_active_adapters(name)
        alone.append(gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2))
    assert not torch.equal(alone[0], alone[1])
    gm.set_active_adapters(Parallel("a", "b"))
    assert torch.equal(gm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2), torch.cat(alone))


def test_whisper_generate():
    """Whisper (audio features in, its own generate mixin): with LoRA on the q, v of self- and
    cross-attention, the tokens of a no-cache greedy loop over the module's forward; with no adapter,
    the model's own generate's tokens and the same returned cache, cross-attention keys included."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=97, num_mel_bins=8, encoder_layers=2, decoder_layers=2, d_model=32, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
                           max_target_positions=32, decoder_start_token_id=1, pad_token_id=0, eos_token_id=None, bos_token_id=1,
                           suppress_tokens=None, begin_suppress_tokens=None)
    model = WhisperForConditionalGeneration(config).eval()
    features = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))  # Whisper's fixed length: 2 x max_source_positions
    start = torch.ones(2, 3, dtype=torch.long)  # three decoder positions: the oracle's loop calls the forward on longer ones
    gm = fxadapt.capture(model, example_kwargs={"input_features": features, "decoder_input_ids": start}).eval()
    ours = gm.generate(input_features=features, max_new_tokens=NEW, return_dict_in_generate=True)
    theirs = model.generate(input_features=features, max_new_tokens=NEW, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, theirs.sequences)
    for kind in ("self_attention_cache", "cross_attention_cache"):
        for a, b in zip(getattr(ours.past_key_values, kind).layers, getattr(theirs.past_key_values, kind).layers, strict=True):
            assert_outputs_close(a.keys, b.keys)
            assert_outputs_close(a.values, b.values)
    gm.add_adapter("a", fxadapt.LoRAConfig(r=4), set_active=True)
    _randomize(gm, "a")
    out = gm.generate(input_features=features, max_new_tokens=NEW, return_dict_in_generate=True).sequences
    expected = torch.full((2, 1), config.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(NEW):
            logits = gm(input_features=features, decoder_input_ids=expected).logits[:, -1]
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, expected)
    assert not torch.equal(out, theirs.sequences)  # the adapter acts
    assert torch.equal(gm.generate(input_features=features, max_new_tokens=NEW), out[:, 1:])  # as Whisper's: without the start token
    # A model whose decoder step takes encoder states of one length only is refused any other.
    gm.__dict__["_fx_step"] = dataclasses.replace(gm.__dict__["_fx_step"], encoder_length=5)
    with pytest.raises(InputError, match="captured for 5"):
        gm.generate(input_features=features, max_new_tokens=NEW)
