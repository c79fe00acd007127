"""adapter_summary on the seed's roberta-base shape: the seed's numbers, in the seed's format; and every
adapter's parameter names and shapes there against AdapterHub's (tests/fixtures/adapterhub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import save_file

import fxadapt

HUB = Path(__file__).parent / "fixtures" / "adapterhub"
SHAPES = json.loads((HUB / "roberta_base_param_shapes.json").read_text())


@pytest.fixture(scope="module")
def roberta_base():
    torch.manual_seed(0)
    model = T.RobertaModel(T.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)).eval()
    return fxadapt.capture(model)


# The seed's table, verbatim, in the seed's order (rows of methods fxadapt has).
SEED_ROWS = {
    "pfeiffer": "pfeiffer                 bottleneck          894,528       0.718       0       1",
    "houlsby": "houlsby                  bottleneck        1,789,056       1.435       0       1",
    "pfeiffer+inv": "pfeiffer+inv             bottleneck        1,190,592       0.955       0       1",
    "houlsby+inv": "houlsby+inv              bottleneck        2,085,120       1.673       0       1",
    "compacter++": "compacter++              bottleneck           28,576       0.023       0       1",
    "compacter": "compacter                bottleneck           57,088       0.046       0       1",
    "prefix_tuning": "prefix_tuning            prefix_tuning     9,872,384       7.920       0       1",
    "prefix_tuning_flat": "prefix_tuning_flat       prefix_tuning       552,960       0.444       0       1",
    "parallel": "parallel                 bottleneck        7,091,712       5.689       0       1",
    "scaled_parallel": "scaled_parallel          bottleneck        7,091,724       5.690       0       1",
    "lora": "lora                     lora                294,912       0.237       0       1",
    "ia3": "ia3                      lora                 55,296       0.044       0       1",
    "mam": "mam                      union            22,493,984      18.046       0       1",
    "unipelt": "unipelt                  union            11,083,376       8.892       0       1",
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
        n = len(SEED_ROWS)
        assert lines[3:3 + n] == list(SEED_ROWS.values())
        assert lines[3 + n] == "-" * 80
        assert lines[4 + n] == SEED_FULL
        assert lines[5 + n] == "=" * 80
        rows = gm.adapter_summary(as_dict=True)
        assert rows[-1]["params"] == 124_645_632
    finally:
        for name in SEED_ROWS:
            gm.delete_adapter(name)


def test_aliases_are_the_same_configs():
    """AdapterHub 1.3.0's newer names are the seed's configs (so their rows are the seed's counts)."""
    pairs = [("seq_bn", "pfeiffer"), ("double_seq_bn", "houlsby"), ("par_bn", "parallel"), ("scaled_par_bn", "scaled_parallel"),
             ("seq_bn_inv", "pfeiffer+inv"), ("double_seq_bn_inv", "houlsby+inv")]
    for alias, seed in pairs:
        assert fxadapt.CONFIGS[alias] == fxadapt.CONFIGS[seed], alias
    assert fxadapt.CONFIGS["parallel"] != fxadapt.CONFIGS["scaled_parallel"]  # the comparison can tell configs apart


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


def _adapterhub_state_dict(config_id: str) -> dict[str, torch.Tensor]:
    """What AdapterHub saves for this adapter on roberta-base, from the parameter names and shapes it
    created there (zeros: only names and shapes matter). Its named_parameters list the shared prefix
    pool once, under the first attention's ``prefix_tuning.pool``; its state_dict (what it saves, see
    fixtures/adapterhub/roberta/prefix_tuning) holds the pool as ``prefix_tuning.prefix_tunings...``
    too, which is the name its checkpoints are read by."""
    out = {}
    for key, shape in SHAPES["adapters"][config_id]["params"]:
        if ".prefix_tuning.pool." in key:
            key = "prefix_tuning." + key.split(".prefix_tuning.pool.", 1)[1]
        out[key] = torch.zeros(shape)
    return out


# AdapterHub's VeRA trains full (r, r) and (out, out) matrices where VeRA (and PEFT, and fxadapt) train
# vectors: its count differs by design (tests/test_adapterhub_lora_variants.py checks the difference).
@pytest.mark.parametrize("config_id", sorted(set(SHAPES["adapters"]) - {"vera"}))
def test_parameter_names_and_shapes_are_adapterhubs(roberta_base, config_id, tmp_path):
    """AdapterHub's parameters of each adapter on roberta-base, written as AdapterHub writes them, load
    into fxadapt's adapter of the same config: load_adapter requires every tensor fxadapt creates to be
    in the file under AdapterHub's name (converted), with its shape, and no other; the counts agree."""
    gm = roberta_base
    entry = SHAPES["adapters"][config_id]
    meta = json.loads((HUB / "roberta" / config_id.replace("+", "_plus_") / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**meta, "hidden_size": 768}))
    save_file(_adapterhub_state_dict(config_id), tmp_path / "adapter.safetensors")
    name = gm.load_adapter(tmp_path)
    try:
        assert name == config_id
        assert sum(p.numel() for p in gm.adapter_state_dict(name).values()) == entry["count_named_parameters"]
        row = next(r for r in gm.adapter_summary(as_dict=True) if r["name"] == name)
        assert (row["architecture"], row["params"]) == (entry["adapter_summary"]["architecture"], entry["adapter_summary"]["#param"])
    finally:
        gm.delete_adapter(name)
