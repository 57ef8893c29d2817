"""GLUE for surge_nlp: the task table, data loading, metrics and submission files.

Metrics are fractions (accuracy/F1 in [0, 1], correlations in [-1, 1]); multiply by 100 only to
print. The dataset defaults to the Hub's `nyu-mll/glue`; `$SURGE_NLP_GLUE_DATASET` or `dataset=`
points at a local mirror with the same layout.

Example:
    >>> from surge_nlp.glue import GLUE_TASKS, get_task
    >>> len(GLUE_TASKS), get_task("sst2").max_seq_length
    (9, 64)
"""

from .data import (
    DATASET_ENV_VAR,
    DEFAULT_DATASET,
    HELD_OUT,
    SPLIT_GROUPS,
    GlueData,
    GlueDataError,
    load_glue,
    make_dataloader,
    resolve_dataset,
)
from .metrics import GLUE_METRIC_PATH, compute_metrics, load_glue_metric, majority_class_metrics
from .predict import (agreement, evaluate_model, format_predictions, metrics_of, predict, predict_to_submission,
                      predictions_by_split, write_submission)
from .selection import Selection
from .tasks import COMBINED_SCORE, GLUE_TASKS, GlueTask, get_task

__all__ = [
    "COMBINED_SCORE",
    "DATASET_ENV_VAR",
    "DEFAULT_DATASET",
    "GLUE_METRIC_PATH",
    "GLUE_TASKS",
    "HELD_OUT",
    "SPLIT_GROUPS",
    "GlueData",
    "GlueDataError",
    "GlueTask",
    "Selection",
    "compute_metrics",
    "evaluate_model",
    "format_predictions",
    "get_task",
    "load_glue",
    "load_glue_metric",
    "majority_class_metrics",
    "make_dataloader",
    "predict",
    "predict_to_submission",
    "resolve_dataset",
    "write_submission",
]
