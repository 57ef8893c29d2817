"""Data augmentation for distillation: more inputs for the teacher to score, beside the training set.

A distilled student never needs gold labels (its targets are the teacher's outputs for whatever
input it sees), so every perturbed copy of a training example is a new, correctly labelled
example. Small GLUE tasks (RTE 2.5k, MRPC 3.7k, STS-B 5.7k examples) are seen many times over a
binary student's long schedule and a 1-bit student learns them by heart (recipes/README.md, "What
limits W1A1 on STS-B"); copies make the same number of steps see new inputs. TinyBERT and BiT
augment with word substitutions for the same reason.

Two sources, which combine:
- `Augmentation(copies=K, replace_prob=p)` appends K copies of the training set in which each
  ordinary token (not [CLS], [SEP], padding or other special tokens) is replaced, with probability
  p, by a token drawn from the training set's own token frequencies. Lengths, `token_type_ids` and
  the attention masks are unchanged. The copies are a function of `seed`, so a resumed or repeated
  run sees the same data.
- `Augmentation(other_tasks=("mrpc", "rte"))` appends the training inputs of other GLUE tasks with
  the same input (a sentence pair for a pair task, one sentence otherwise): real text of the same
  kind, which the teacher scores as it would the task's own (a transfer set). Their labels belong
  to another task and are not kept: the `labels` column holds a placeholder that is never read.
  The pipeline loads and tokenizes them (`surge_nlp.glue.load_glue`; each capped at the recipe's
  `max_train_samples`, as the task's own set is) and passes them to `apply`, with the task's own
  validation and test inputs as `held_out`: GLUE tasks share source sentences (110 of STS-B's 1,500
  dev pairs are MRPC training pairs), and an added input that is one the student is scored on (the
  same sentences, in either order) is dropped, so no dev or test input is distilled on.

Example:
    >>> import datasets
    >>> from surge_nlp.glue.augment import Augmentation
    >>> train = datasets.Dataset.from_dict({"input_ids": [[101, 7, 8, 9, 102]], "labels": [1]})
    >>> augmented = Augmentation(copies=2, replace_prob=0.5).apply(train, special_ids=[101, 102])
    >>> len(augmented), augmented[1]["input_ids"][0], augmented[2]["input_ids"][-1]
    (3, 101, 102)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import numpy as np

from .tasks import GLUE_TASKS
from .sections import check_int, from_section, invalid

INPUT_IDS = "input_ids"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Augmentation:
    """More distillation inputs: noisy copies and other tasks' inputs (see the module docstring).

    Args:
        copies: perturbed copies appended per training example; 0: none.
        replace_prob: probability that an ordinary token of a copy is replaced (0 < p <= 1).
        seed: the copies are a function of it.
        other_tasks: GLUE tasks whose training inputs are appended (the recipe checks that they have
            the task's input shape); empty: none. Augmentation is off when both are empty.
    """

    copies: int = 0
    replace_prob: float = 0.1
    seed: int = 0
    other_tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or self.copies < 0:
            raise invalid("augmentation", "copies", self.copies, "an integer >= 0")
        tasks = self.other_tasks
        if (not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) and t in GLUE_TASKS for t in tasks)
                or len(set(tasks)) != len(tasks)):
            raise invalid("augmentation", "other_tasks", tasks, f"a list of distinct GLUE tasks among {', '.join(GLUE_TASKS)}")
        object.__setattr__(self, "other_tasks", tuple(tasks))
        p = self.replace_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            raise invalid("augmentation", "replace_prob", p, "a number in (0, 1]")
        check_int("augmentation", "seed", self.seed)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Augmentation":
        """From a recipe's `augmentation` mapping (None: no augmentation); unknown keys raise."""
        return from_section(cls, "augmentation", data)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "other_tasks": list(self.other_tasks)}

    @property
    def enabled(self) -> bool:
        return self.copies > 0 or bool(self.other_tasks)

    def apply(self, train: datasets.Dataset, special_ids: Iterable[int],
              others: Iterable[datasets.Dataset] = (), held_out: Iterable[Iterable[int]] = ()) -> datasets.Dataset:
        """`train`, then `copies` perturbed copies of it, then `others` (the tokenized training sets of
        `other_tasks`, in that order) with a placeholder label, less their rows whose input is one of
        `held_out` (input_ids of the rows the student is scored on; the same sentences in either order
        match); `train` itself when disabled."""
        others = list(others)
        if len(others) != len(self.other_tasks):
            raise ValueError(f"augmentation.apply: {len(others)} other training sets for other_tasks={list(self.other_tasks)}")
        if not self.enabled:
            return train
        special = frozenset(special_ids)
        scored = {_sentences(ids, special) for ids in held_out}
        kept = []
        for task, other in zip(self.other_tasks, others):
            clean = [row for row, ids in enumerate(other[INPUT_IDS]) if _sentences(ids, special) not in scored]
            if len(clean) < len(other):
                logger.warning("augmentation.other_tasks: %d of %d %s inputs dropped: the student is scored on them "
                               "(the task's validation or test inputs)", len(other) - len(clean), len(other), task)
            kept.append(other.select(clean))
        return datasets.concatenate_datasets([train, *self._copies(train, special_ids),
                                              *(_unlabelled_like(train, other) for other in kept)])

    def _copies(self, train: datasets.Dataset, special_ids: Iterable[int]) -> list[datasets.Dataset]:
        if not self.copies:
            return []
        special = np.array(sorted(set(special_ids)), dtype=np.int64)
        sequences = [np.asarray(ids, dtype=np.int64) for ids in train[INPUT_IDS]]
        vocabulary, counts = np.unique(np.concatenate(sequences), return_counts=True)
        ordinary = ~np.isin(vocabulary, special)
        if not ordinary.any():
            raise ValueError("augmentation: the training set has no ordinary tokens to replace")
        vocabulary, frequencies = vocabulary[ordinary], counts[ordinary] / counts[ordinary].sum()
        rng = np.random.default_rng(self.seed)
        parts = []
        for _ in range(self.copies):
            noisy = []
            for ids in sequences:
                replace = (rng.random(len(ids)) < self.replace_prob) & ~np.isin(ids, special)
                ids = ids.copy()
                ids[replace] = rng.choice(vocabulary, size=int(replace.sum()), p=frequencies)
                noisy.append(ids.tolist())
            columns = {name: (noisy if name == INPUT_IDS else train[name]) for name in train.column_names}
            parts.append(datasets.Dataset.from_dict(columns, features=train.features))
        return parts


LABELS = "labels"


def _sentences(input_ids: Iterable[int], special: frozenset[int]) -> tuple[tuple[int, ...], ...]:
    """An input as its sentences (the runs between special tokens), in a fixed order: a pair matches the
    same pair in the other order, whatever the model's [CLS]/[SEP] layout."""
    sentences, current = [], []
    for token in input_ids:
        if token in special:
            if current:
                sentences.append(tuple(current))
            current = []
        else:
            current.append(token)
    if current:
        sentences.append(tuple(current))
    return tuple(sorted(sentences))


def _unlabelled_like(train: datasets.Dataset, other: datasets.Dataset) -> datasets.Dataset:
    """`other`'s inputs in `train`'s columns and features; its labels (another task's) become a placeholder 0."""
    missing = sorted(set(train.column_names) - set(other.column_names) - {LABELS})
    if missing:
        raise ValueError(f"augmentation: an other task's training set lacks the column(s) {missing}")
    columns = {name: ([0] * len(other) if name == LABELS else other[name]) for name in train.column_names}
    return datasets.Dataset.from_dict(columns, features=train.features)


__all__ = ["Augmentation"]
