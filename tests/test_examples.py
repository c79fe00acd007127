"""Every offline example runs (shortened), so none rots."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
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
