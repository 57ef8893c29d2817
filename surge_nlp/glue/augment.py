"""Data augmentation for distillation: noisy copies of the training examples, scored by the teacher.

A distilled student never needs gold labels (its targets are the teacher's outputs for whatever
input it sees), so every perturbed copy of a training example is a new, correctly labelled
example. Small GLUE tasks (RTE 2.5k, MRPC 3.7k, STS-B 5.7k examples) are seen many times over a
binary student's long schedule and a 1-bit student learns them by heart (recipes/README.md, "What
limits W1A1 on STS-B"); copies make the same number of steps see new inputs. TinyBERT and BiT
augment with word substitutions for the same reason.

`Augmentation(copies=K, replace_prob=p)` keeps the original training set and appends K copies of
it in which each ordinary token (not [CLS], [SEP], padding or other special tokens) is replaced,
with probability p, by a token drawn from the training set's own token frequencies. Lengths,
`token_type_ids` and the attention masks are unchanged. The copies are a function of `seed`, so a
resumed or repeated run sees the same data.

Example:
    >>> import datasets
    >>> from surge_nlp.glue.augment import Augmentation
    >>> train = datasets.Dataset.from_dict({"input_ids": [[101, 7, 8, 9, 102]], "labels": [1]})
    >>> augmented = Augmentation(copies=2, replace_prob=0.5).apply(train, special_ids=[101, 102])
    >>> len(augmented), augmented[1]["input_ids"][0], augmented[2]["input_ids"][-1]
    (3, 101, 102)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import numpy as np

INPUT_IDS = "input_ids"


def _invalid(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"augmentation.{name}={value!r} is invalid; allowed values: {allowed}")


@dataclass(frozen=True)
class Augmentation:
    """Noisy copies of the distillation set (see the module docstring).

    Args:
        copies: perturbed copies appended per training example; 0 turns augmentation off.
        replace_prob: probability that an ordinary token of a copy is replaced (0 < p <= 1).
        seed: the copies are a function of it.
    """

    copies: int = 0
    replace_prob: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or self.copies < 0:
            raise _invalid("copies", self.copies, "an integer >= 0")
        p = self.replace_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            raise _invalid("replace_prob", p, "a number in (0, 1]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _invalid("seed", self.seed, "an integer")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Augmentation":
        """From a recipe's `augmentation` mapping (None: no augmentation); unknown keys raise."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"augmentation must be a mapping with keys copies, replace_prob, seed; got {data!r}")
        unknown = sorted(set(data) - {"copies", "replace_prob", "seed"})
        if unknown:
            raise ValueError(f"augmentation has no setting(s) {unknown}; allowed: ['copies', 'replace_prob', 'seed']")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def enabled(self) -> bool:
        return self.copies > 0

    def apply(self, train: datasets.Dataset, special_ids: Iterable[int]) -> datasets.Dataset:
        """`train` followed by `copies` perturbed copies of it (`train` itself when disabled)."""
        if not self.enabled:
            return train
        special = np.array(sorted(set(special_ids)), dtype=np.int64)
        sequences = [np.asarray(ids, dtype=np.int64) for ids in train[INPUT_IDS]]
        vocabulary, counts = np.unique(np.concatenate(sequences), return_counts=True)
        ordinary = ~np.isin(vocabulary, special)
        if not ordinary.any():
            raise ValueError("augmentation: the training set has no ordinary tokens to replace")
        vocabulary, frequencies = vocabulary[ordinary], counts[ordinary] / counts[ordinary].sum()
        rng = np.random.default_rng(self.seed)
        parts = [train]
        for _ in range(self.copies):
            noisy = []
            for ids in sequences:
                replace = (rng.random(len(ids)) < self.replace_prob) & ~np.isin(ids, special)
                ids = ids.copy()
                ids[replace] = rng.choice(vocabulary, size=int(replace.sum()), p=frequencies)
                noisy.append(ids.tolist())
            columns = {name: (noisy if name == INPUT_IDS else train[name]) for name in train.column_names}
            parts.append(datasets.Dataset.from_dict(columns, features=train.features))
        return datasets.concatenate_datasets(parts)


__all__ = ["Augmentation"]
