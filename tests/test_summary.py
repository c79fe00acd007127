"""adapter_summary on the seed's roberta-base shape: the seed's numbers, in the seed's format."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import fxadapt


@pytest.fixture(scope="module")
def roberta_base():
    torch.manual_seed(0)
    model = T.RobertaModel(T.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)).eval()
    return fxadapt.capture(model)


# The rows of the seed's table this issue covers, verbatim.
SEED_ROWS = {
    "lora": "lora                     lora                294,912       0.237       0       1",
    "ia3": "ia3                      lora                 55,296       0.044       0       1",
}
SEED_FULL = "Full model                               124,645,632     100.000               1"


def test_seed_table_rows(roberta_base):
    gm = roberta_base
    for name in SEED_ROWS:
        gm.add_adapter(name, name)
    try:
        lines = gm.adapter_summary().splitlines()
        assert lines[0] == "=" * 80
        assert lines[1] == "Name                     Architecture         #Param      %Param  Active   Train"
        assert lines[2] == "-" * 80
        assert lines[3:5] == [SEED_ROWS["lora"], SEED_ROWS["ia3"]]
        assert lines[5] == "-" * 80
        assert lines[6] == SEED_FULL
        assert lines[7] == "=" * 80
        rows = gm.adapter_summary(as_dict=True)
        assert [r["params"] for r in rows] == [294_912, 55_296, 124_645_632]
    finally:
        for name in SEED_ROWS:
            gm.delete_adapter(name)


def test_active_and_train_columns(roberta_base):
    gm = roberta_base
    gm.add_adapter("lora", "lora")
    try:
        gm.train_adapter("lora")
        row, full = gm.adapter_summary().splitlines()[3], gm.adapter_summary().splitlines()[5]
        assert row.endswith("       1       1")
        assert full.endswith("       0")  # base frozen
    finally:
        gm.delete_adapter("lora")
        for p in gm.parameters():
            p.requires_grad_(True)
        gm.eval()
