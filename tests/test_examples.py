"""Every offline example runs (shortened), so none rots."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from fxadapt.testing import rounding_tolerance

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# all-MiniLM-L6-v2 in float32: merged W + s*BA is rounded once more than the unmerged sum; sums of up to
# 1536 products, 6 layers. The examples report max|difference| / max|values|.
MINILM_MERGE_RTOL = rounding_tolerance(torch.float32, 1536, depth=6)


def load(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # examples import their shared data module (bbc_news)
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(capsys):
    result = load("quickstart").main(steps=6)
    out = capsys.readouterr().out
    assert "captured BertModel: 36 sites in 6 layers" in out
    assert "lora_adapter             lora                 73,728" in out
    assert 0 < result["merge_difference"] < MINILM_MERGE_RTOL  # the adapter acted, and merged computes the same
    assert result["loss"] < 0.69  # below an untrained two-class head's log(2)
    assert result["accuracy"] == 1.0  # twelve training sentences, learnt


def test_causal_lm_learns_to_reverse_and_merged_generates_the_same_tokens(capsys):
    """examples/causal_lm.py, shortened: LoRA on a tiny random Llama learns to reverse five symbols
    (greedy gm.generate on 200 held-out prompts: from none to nearly all), and the merge_and_unload
    model's own generate gives the unmerged module's tokens."""
    result = load("causal_lm").main(steps=150)
    assert result["before"] <= 0.05  # chance: 1 in 10**5
    assert result["after"] >= 0.9, result
    assert result["merged_tokens_equal"] is True and result["merged"] == result["after"]
    assert "merge_and_unload -> LlamaForCausalLM" in capsys.readouterr().out


def test_seed_snippets(capsys):
    result = load("seed").main(smoke=True)
    out = capsys.readouterr().out
    for name in ("lora", "ia3"):
        assert result[name]["merge_difference"] < MINILM_MERGE_RTOL and result[name]["unload_difference"] < MINILM_MERGE_RTOL
        assert result[name]["reset_exact"] is True
        assert result[name]["merged_nodes"] == result[name]["base_nodes"] < result[name]["adapted_nodes"]
    assert "merge_and_unload -> BertModel" in out
    scores = result["gating_scores"]["unipelt"]
    assert sorted(scores) == list(range(6)) and set(scores[0]) == {"selfattn_lora", "self_prefix", "output_adapter"}
    assert "UniPELTConfig() is the seed's ConfigUnion: True" in out
    rows = {line.split()[0]: line.split() for line in result["summary"].splitlines() if line.strip()}
    import fxadapt

    assert set(fxadapt.CONFIGS) <= set(rows) and rows["lora"][2] == "73,728" and rows["Full"][2] == "22,713,216"


def test_finetune_learns_with_every_method_and_leaves_the_model_as_it_was():
    """The example's loop (finetune.train_one) for the probe, LoRA and the bottleneck adapter, on 16
    articles it is then scored on: each fits them (chance is 1 in 5), and leaves the captured model
    as it was (adapters deleted, base weights untouched)."""
    from transformers import AutoModel, AutoTokenizer

    import fxadapt
    from fxadapt.testing import assert_unchanged, snapshot

    finetune, bbc_news = load("finetune"), load("bbc_news")
    tokenizer, model = AutoTokenizer.from_pretrained(finetune.model_dir()), AutoModel.from_pretrained(finetune.model_dir())
    train, _ = bbc_news.load(16, 0)
    gm = fxadapt.capture(model)
    for method in finetune.METHODS:
        before = snapshot(gm)
        accuracy = finetune.train_one(gm, method, model.config.hidden_size, tokenizer, train, train, epochs=8, batch_size=8)
        assert accuracy >= 0.75, (method, accuracy)
        gm.requires_grad_(True)  # the probe and train_adapter froze the base; training mode is the loop's
        gm.eval()
        assert_unchanged(gm, before)


def test_trainer(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    trainer = load("trainer")
    metrics = trainer.main(n_train=48, n_test=32, epochs=1, output_dir=str(tmp_path))
    assert metrics["eval_loss"] > 0
    # the merged model is a plain transformers model with the same predictions
    model = AutoModelForSequenceClassification.from_pretrained(metrics["merged_path"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(metrics["merged_path"])
    _, test = load("bbc_news").load(48, 32)
    correct = 0
    with torch.no_grad():
        for text, label in test:
            correct += int(model(**tokenizer(text, truncation=True, max_length=64, return_tensors="pt")).logits.argmax(-1).item() == label)
    assert correct / len(test) == metrics["eval_accuracy"]


def test_ddp_single_process_trains(tmp_path):
    """examples/ddp.py in one process on a tiny BERT: the loss on its 8 articles goes down from the
    untrained classifier's (the two-process run is tests/test_training.py's)."""
    import transformers as T

    from conftest import _ENCODER

    ddp = load("ddp")
    tokenizer = T.AutoTokenizer.from_pretrained(load("quickstart").model_dir())
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(**{**_ENCODER, "vocab_size": tokenizer.vocab_size})).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, classifier = ddp.build(str(tmp_path))
    inputs, labels = ddp.encode(tokenizer, load("bbc_news").load(8, 0)[0])
    with torch.no_grad():
        untrained = torch.nn.functional.cross_entropy(classifier.eval()(**inputs), labels).item()
    result = ddp.main(["--model", str(tmp_path), "--train", "8", "--batch-size", "8", "--epochs", "60"])
    assert result["loss"] < 0.9 * untrained, (result["loss"], untrained)


def test_glue_help_runs_without_datasets(capsys):
    import pytest

    glue = load("glue")
    with pytest.raises(SystemExit) as done:
        glue.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--task" in out and "roberta-base" in out
    assert glue.METHODS == {"ia3": ("ia3", 1e-3), "lora": ("lora", 1e-4), "houlsby": ("houlsby", 1e-4)}
    import numpy as np

    assert glue.metric("accuracy", np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1])) == 50.0
