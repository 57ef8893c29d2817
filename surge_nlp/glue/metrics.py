"""GLUE scores through `evaluate`, using the metric module shipped in this package (works offline).

All values are fractions as the metric computes them (accuracy/F1 in [0, 1], correlations in
[-1, 1]); multiply by 100 only for display. Tasks that report two numbers (MRPC and QQP:
accuracy and F1; STS-B: Pearson and Spearman) also get `combined_score`, the mean of the two, which
is their GLUE leaderboard score and their `GlueTask.main_metric`.

Example:
    >>> from surge_nlp.glue import compute_metrics
    >>> compute_metrics("mrpc", predictions=[1, 1, 0, 0], references=[1, 0, 0, 0])
    {'accuracy': 0.75, 'f1': 0.6666666666666666, 'combined_score': 0.7083333333333333}
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import evaluate
import numpy as np

from .tasks import COMBINED_SCORE, GlueTask, get_task

# `evaluate.load(<directory>)` runs `<directory>/<directory name>.py`.
GLUE_METRIC_PATH = Path(__file__).resolve().parent / "glue_metric"


@functools.lru_cache(maxsize=None)
def load_glue_metric(task_name: str) -> evaluate.EvaluationModule:
    """The shipped GLUE `evaluate` module configured for `task_name`, loaded once per process.

    Example:
        >>> load_glue_metric("rte").compute(predictions=[0, 1], references=[0, 0])
        {'accuracy': 0.5}
    """
    task = get_task(task_name)
    # keep_in_memory: no arrow cache files or file locks for a one-shot computation.
    return evaluate.load(str(GLUE_METRIC_PATH), task.name, keep_in_memory=True)


def compute_metrics(
    task: str | GlueTask,
    predictions: Sequence[float] | np.ndarray,
    references: Sequence[float] | np.ndarray,
) -> dict[str, float]:
    """GLUE metrics of `predictions` (label ids, or scores for STS-B) against `references`.

    Returns the task's `metrics` as fractions, plus `combined_score` (their mean) when the task
    reports two numbers.

    Raises:
        ValueError: unknown task, no examples, or references of an unlabelled split (label -1).

    Example:
        >>> compute_metrics("cola", [1, 0, 1, 1], [1, 0, 0, 1])["matthews_correlation"]
        0.5773502691896258
    """
    task = get_task(task)
    scores = load_glue_metric(task.name).compute(predictions=predictions, references=references)
    scores = {name: float(value) for name, value in scores.items()}
    if len(scores) > 1:
        scores[COMBINED_SCORE] = float(np.mean(list(scores.values())))
    return scores


def majority_class_metrics(
    task: str | GlueTask,
    train_labels: Sequence[float] | np.ndarray,
    references: Sequence[float] | np.ndarray,
) -> dict[str, float]:
    """The scores of a model that ignores its input: the most frequent training label for every example.

    The floor a binary student must clear before its number means anything (an all-"equivalent"
    MRPC model has F1 81.2 on dev). For STS-B a constant prediction has no correlation, so Pearson
    and Spearman are 0 (their formulas divide by zero).

    Example:
        >>> majority_class_metrics("mrpc", train_labels=[1, 1, 0], references=[1, 0, 1, 1])["f1"]
        0.8571428571428571
        >>> majority_class_metrics("stsb", train_labels=[0.5, 4.0], references=[1.0, 3.0])["pearson"]
        0.0
    """
    task = get_task(task)
    if len(train_labels) == 0 or len(references) == 0:
        raise ValueError("majority_class_metrics needs at least one training label and one reference")
    if task.is_regression:
        scores = {name: 0.0 for name in task.metrics}
        if len(scores) > 1:
            scores[COMBINED_SCORE] = 0.0
        return scores
    labels, counts = np.unique(np.asarray(train_labels, dtype=np.int64), return_counts=True)
    majority = int(labels[np.argmax(counts)])  # ties: the smallest label id, as np.unique sorts
    return compute_metrics(task, [majority] * len(references), references)
