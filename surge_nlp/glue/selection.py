"""Where the checkpoint kept by evaluation while training is chosen: dev, or held-out training data.

Evaluating on dev while training and keeping the best evaluation (BiT's scripts, HF Trainer's
`load_best_model_at_end`) reports the maximum of a noisy curve measured on the same data that the
number is then read from. On the cpu-full ladder that maximum reads up to 6 points above the run's
last evaluation (recipes/README.md, "avg at last eval"). `Selection(held_out=f)` keeps a seeded
fraction f of the training set out of training and evaluates on it instead: the checkpoint is chosen
without looking at dev, so the dev number of the kept checkpoint is an unselected estimate. The
price is a training set smaller by f (the teacher's fine-tuning and every distillation stage train
on the rest, augmentation included).

Recipe: `selection: {held_out: 0.1, seed: 0}`; the default `held_out: 0` selects on dev.

Example:
    >>> import datasets
    >>> from surge_nlp.glue.selection import Selection
    >>> train = datasets.Dataset.from_dict({"idx": list(range(10))})
    >>> kept, held_out = Selection(held_out=0.2, seed=0).split(train)
    >>> len(kept), len(held_out), sorted([*kept["idx"], *held_out["idx"]]) == list(range(10))
    (8, 2, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import numpy as np

from .sections import check_int, from_section, invalid

MAX_HELD_OUT = 0.5


@dataclass(frozen=True)
class Selection:
    """The data that evaluation while training (and so the kept best checkpoint) is measured on.

    Args:
        held_out: fraction of the training set kept out of training and used for selection;
            0: select on the task's first dev split.
        seed: which rows are held out is a function of it (the same on resume and on repeats).
    """

    held_out: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        f = self.held_out
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0 <= f <= MAX_HELD_OUT:
            raise invalid("selection", "held_out", f, f"a number in [0, {MAX_HELD_OUT}] (0: select on dev)")
        check_int("selection", "seed", self.seed)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Selection":
        """From a recipe's `selection` mapping (None: select on dev); unknown keys raise."""
        return from_section(cls, "selection", data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def enabled(self) -> bool:
        return self.held_out > 0

    def split(self, train: datasets.Dataset) -> tuple[datasets.Dataset, datasets.Dataset]:
        """(rows to train on, rows held out for selection), each in the training set's order; at
        least one row on each side."""
        if not self.enabled:
            raise ValueError("Selection.split: held_out is 0 (selection on dev); nothing to hold out")
        count = max(1, round(len(train) * self.held_out))
        if count >= len(train):
            raise ValueError(f"selection.held_out={self.held_out} leaves no training rows out of {len(train)}; "
                             "use a larger training set or a smaller fraction")
        held = np.zeros(len(train), dtype=bool)
        held[np.random.default_rng(self.seed).permutation(len(train))[:count]] = True
        return train.select(np.flatnonzero(~held)), train.select(np.flatnonzero(held))


__all__ = ["Selection"]
