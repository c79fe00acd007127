"""The seed's GLUE setup with fxadapt: roberta-base, 20 epochs, learning rates 1e-3 for (IA)^3 and 1e-4
for LoRA and the bottleneck adapter (Houlsby), the classification head trained with the adapter.

For a machine that reaches the model hub (roberta-base, the GLUE data): ``pip install datasets
scikit-learn scipy``. Each run trains one method on one task with transformers' ``Trainer`` and
prints the task's metric on its validation set, to compare with the seed's table (adapter-transformers
v3.1 on roberta-base; one run each, no hyperparameter tuning):

    Task   Metric                (IA)^3   LoRA    Adapter (Houlsby)
    COLA   Matthews correlation  59.53    58.35   59.81
    MNLI   Accuracy              85.98    87.15   86.68
    MRPC   F1                    89.5     90.63   90.53
    QNLI   Accuracy              91.75    92.82   92.7
    QQP    F1                    85.96    86.57   88.41
    RTE    Accuracy              73.41    72.08   77.9
    SST2   Accuracy              93.92    94.11   94.5
    STSB   Spearmanr             89.78    89.82   90.58

    python examples/glue.py --task rte --method lora [--epochs 20] [--batch-size 32] [--limit N]

The model is captured with a batch that has labels, so the loss (cross-entropy, or MSE for STS-B's
regression) is the model's own, computed in the graph; see examples/trainer.py. The batch size and
sequence length (32, 128) are transformers' run_glue defaults: the seed does not state them.
"""

from __future__ import annotations

import argparse

import numpy as np

#: task -> (text fields, number of labels, metric, validation split)
TASKS = {
    "cola": (("sentence", None), 2, "matthews", "validation"),
    "mnli": (("premise", "hypothesis"), 3, "accuracy", "validation_matched"),
    "mrpc": (("sentence1", "sentence2"), 2, "f1", "validation"),
    "qnli": (("question", "sentence"), 2, "accuracy", "validation"),
    "qqp": (("question1", "question2"), 2, "f1", "validation"),
    "rte": (("sentence1", "sentence2"), 2, "accuracy", "validation"),
    "sst2": (("sentence", None), 2, "accuracy", "validation"),
    "stsb": (("sentence1", "sentence2"), 1, "spearmanr", "validation"),
}
#: method -> (config id, the seed's learning rate)
METHODS = {"ia3": ("ia3", 1e-3), "lora": ("lora", 1e-4), "houlsby": ("houlsby", 1e-4)}


def metric(name: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """The task's metric, in percent as in the seed's table."""
    from scipy.stats import spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    if name == "spearmanr":
        return 100 * spearmanr(predictions.squeeze(-1), labels).correlation
    predicted = predictions.argmax(-1)
    if name == "matthews":
        return 100 * matthews_corrcoef(labels, predicted)
    if name == "f1":
        return 100 * f1_score(labels, predicted)
    return 100 * float((predicted == labels).mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), required=True)
    parser.add_argument("--method", choices=list(METHODS), required=True)
    parser.add_argument("--model", default="roberta-base")
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--lr", type=float, default=None, help="default: the seed's rate for the method")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="use only this many training examples (a quick check)")
    parser.add_argument("--output-dir", default="glue-out")
    args = parser.parse_args(argv)

    import datasets  # only here: --help works without it
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    import fxadapt

    (first, second), num_labels, metric_name, split = TASKS[args.task]
    config_id, seed_lr = METHODS[args.method]
    data = datasets.load_dataset("nyu-mll/glue", args.task)
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def tokenize(batch):
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        return tokenizer(*texts, truncation=True, max_length=args.max_length)

    data = data.map(tokenize, batched=True).rename_column("label", "labels")
    if num_labels == 1:
        data = data.cast_column("labels", datasets.Value("float32"))
    keep = ["input_ids", "attention_mask", "token_type_ids", "labels"]
    data = data.remove_columns([c for c in data["train"].column_names if c not in keep])
    train = data["train"].shuffle(seed=0).select(range(args.limit)) if args.limit else data["train"]
    collator = DataCollatorWithPadding(tokenizer)

    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=num_labels)
    gm = fxadapt.capture(model, example_kwargs=dict(collator([train[0], train[1]])))  # with labels: the loss is in the graph
    gm.add_adapter(args.method, config_id)
    gm.train_adapter(args.method, also=["classifier"])
    print(gm.adapter_summary())

    training = TrainingArguments(output_dir=args.output_dir, num_train_epochs=args.epochs, learning_rate=args.lr or seed_lr,
                                 per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
                                 eval_strategy="epoch", save_strategy="no", report_to=[], seed=0)
    trainer = Trainer(model=gm, args=training, train_dataset=train, eval_dataset=data[split], data_collator=collator,
                      compute_metrics=lambda p: {metric_name: metric(metric_name, p.predictions, p.label_ids)})
    trainer.train()
    result = trainer.evaluate()
    print(f"{args.task} {args.method}: {metric_name} {result[f'eval_{metric_name}']:.2f}")
    return result


if __name__ == "__main__":
    main()
