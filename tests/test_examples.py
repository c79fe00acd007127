"""Every offline example runs (shortened), so none rots."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


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
    assert result["merge_difference"] < 1e-4
    assert result["loss"] < 0.69


def test_seed_snippets(capsys):
    result = load("seed").main(smoke=True)
    out = capsys.readouterr().out
    for name in ("lora", "ia3"):
        assert result[name]["merge_difference"] < 1e-4 and result[name]["unload_difference"] < 1e-4
        assert result[name]["reset_exact"] is True
        assert result[name]["merged_nodes"] == result[name]["base_nodes"] < result[name]["adapted_nodes"]
    assert "merge_and_unload -> BertModel" in out
    scores = result["gating_scores"]["unipelt"]
    assert sorted(scores) == list(range(6)) and set(scores[0]) == {"selfattn_lora", "self_prefix", "output_adapter"}
    assert "UniPELTConfig() is the seed's ConfigUnion: True" in out
    rows = {line.split()[0]: line.split() for line in result["summary"].splitlines() if line.strip()}
    import fxadapt

    assert set(fxadapt.CONFIGS) <= set(rows) and rows["lora"][2] == "73,728" and rows["Full"][2] == "22,713,216"


def test_finetune(capsys):
    results = load("finetune").main(n_train=32, n_test=32, epochs=1, batch_size=16)
    out = capsys.readouterr().out
    assert set(results) == {"probe", "lora", "bottleneck"} and all(0 <= acc <= 1 for acc in results.values())
    assert "lora       accuracy" in out and "BBC News: 32 training and 32 test articles" in out


def test_trainer(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    trainer = load("trainer")
    metrics = trainer.main(n_train=48, n_test=32, epochs=1, output_dir=str(tmp_path))
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["eval_loss"] > 0
    # the merged model is a plain transformers model with the same predictions
    model = AutoModelForSequenceClassification.from_pretrained(metrics["merged_path"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(metrics["merged_path"])
    _, test = load("bbc_news").load(48, 32)
    correct = 0
    with torch.no_grad():
        for text, label in test:
            correct += int(model(**tokenizer(text, truncation=True, max_length=64, return_tensors="pt")).logits.argmax(-1).item() == label)
    assert correct / len(test) == metrics["eval_accuracy"]


def test_ddp_single_process(tmp_path):
    import torch
    import transformers as T

    from conftest import _ENCODER

    ddp = load("ddp")
    tokenizer = T.AutoTokenizer.from_pretrained(load("quickstart").model_dir())
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(**{**_ENCODER, "vocab_size": tokenizer.vocab_size})).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    result = ddp.main(["--model", str(tmp_path), "--train", "32", "--batch-size", "8"])
    assert result["loss"] == result["loss"] and result["loss"] < 2.0  # finite, below log(5) + a margin


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
