"""The GLUE task table: text columns, labels, metrics, splits and sequence lengths of the nine tasks.

Column and label names follow the Hugging Face dataset `nyu-mll/glue` (and so any byte-identical
mirror of it). Maximum sequence lengths follow BiT: 64 for CoLA and SST-2, 128 otherwise.

Example:
    >>> from surge_nlp.glue import get_task
    >>> task = get_task("mnli")
    >>> task.text_columns, task.num_labels, task.validation_splits
    (('premise', 'hypothesis'), 3, ('validation_matched', 'validation_mismatched'))
    >>> get_task("stsb").is_regression, get_task("cola").max_seq_length
    (True, 64)
"""

from __future__ import annotations

from dataclasses import dataclass

# Output key of `compute_metrics` for tasks that report two numbers: their mean, which is the
# task's score on the GLUE leaderboard.
COMBINED_SCORE = "combined_score"


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task as found in `nyu-mll/glue`.

    Args:
        name: the dataset config name (`"rte"`, `"stsb"`, ...).
        text_columns: one column (single sentence) or two (sentence pair), in tokenizer order.
        label_names: class names in label-id order; empty for the regression task STS-B.
        metrics: what the GLUE metric module reports for the task, as fractions in [0, 1]
            (correlations in [-1, 1]).
        main_metric: the key used to compare checkpoints: the single metric, or `"combined_score"`
            (the mean of the two) for MRPC, QQP and STS-B.
        max_seq_length: tokens per example after truncation (BiT: 64 for CoLA/SST-2, else 128).
        validation_splits: labelled evaluation splits (MNLI has matched and mismatched).
        test_splits: unlabelled splits predicted for the GLUE server.
        diagnostic_config: config whose `test` split the server also expects predicted by this
            task's model (`"ax"` for MNLI); loaded into `GlueData.test` under that name.
        submission_names: `(split, file stem)` pairs: the GLUE server file for each test split.
        submission_labels: what the server expects for each label id: the original GLUE label
            strings, "0"/"1" for CoLA, SST-2, MRPC, QQP and WNLI, names for the NLI tasks.
    """

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    max_seq_length: int
    submission_names: tuple[tuple[str, str], ...]
    submission_labels: tuple[str, ...]
    validation_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)
    diagnostic_config: str | None = None

    @property
    def is_regression(self) -> bool:
        """True for STS-B: one real-valued output instead of class logits."""
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Model outputs: number of classes, or 1 for regression."""
        return len(self.label_names) or 1

    def label_config(self) -> dict:
        """What a model config should carry for this task, so that `pipeline(...)` prints what the
        task means: `num_labels`, `id2label`/`label2id` from the class names, and for the regression
        task STS-B `problem_type="regression"` with its one output named "similarity".

        Example:
            >>> get_task("sst2").label_config()["id2label"]
            {0: 'negative', 1: 'positive'}
            >>> get_task("stsb").label_config()["problem_type"]
            'regression'
        """
        names = self.label_names or ("similarity",)
        return {"num_labels": self.num_labels, "id2label": dict(enumerate(names)),
                "label2id": {name: index for index, name in enumerate(names)},
                "problem_type": "regression" if self.is_regression else "single_label_classification"}

    @property
    def submission_files(self) -> dict[str, str]:
        """Test split (or diagnostic config) name -> GLUE server file name, e.g. {"test": "RTE.tsv"}."""
        return {split: f"{stem}.tsv" for split, stem in self.submission_names}


_ZERO_ONE = ("0", "1")  # the original GLUE files label CoLA, SST-2, MRPC, QQP and WNLI with 0/1
_ENTAILMENT = ("entailment", "not_entailment")
_NLI3 = ("entailment", "neutral", "contradiction")

GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(name="cola", text_columns=("sentence",), label_names=("unacceptable", "acceptable"),
                 metrics=("matthews_correlation",), main_metric="matthews_correlation", max_seq_length=64,
                 submission_names=(("test", "CoLA"),), submission_labels=_ZERO_ONE),
        GlueTask(name="sst2", text_columns=("sentence",), label_names=("negative", "positive"),
                 metrics=("accuracy",), main_metric="accuracy", max_seq_length=64,
                 submission_names=(("test", "SST-2"),), submission_labels=_ZERO_ONE),
        GlueTask(name="mrpc", text_columns=("sentence1", "sentence2"), label_names=("not_equivalent", "equivalent"),
                 metrics=("accuracy", "f1"), main_metric=COMBINED_SCORE, max_seq_length=128,
                 submission_names=(("test", "MRPC"),), submission_labels=_ZERO_ONE),
        GlueTask(name="stsb", text_columns=("sentence1", "sentence2"), label_names=(),
                 metrics=("pearson", "spearmanr"), main_metric=COMBINED_SCORE, max_seq_length=128,
                 submission_names=(("test", "STS-B"),), submission_labels=()),
        GlueTask(name="qqp", text_columns=("question1", "question2"), label_names=("not_duplicate", "duplicate"),
                 metrics=("accuracy", "f1"), main_metric=COMBINED_SCORE, max_seq_length=128,
                 submission_names=(("test", "QQP"),), submission_labels=_ZERO_ONE),
        GlueTask(name="mnli", text_columns=("premise", "hypothesis"), label_names=_NLI3,
                 metrics=("accuracy",), main_metric="accuracy", max_seq_length=128,
                 submission_names=(("test_matched", "MNLI-m"), ("test_mismatched", "MNLI-mm"), ("ax", "AX")),
                 submission_labels=_NLI3,
                 validation_splits=("validation_matched", "validation_mismatched"),
                 test_splits=("test_matched", "test_mismatched"), diagnostic_config="ax"),
        GlueTask(name="qnli", text_columns=("question", "sentence"), label_names=_ENTAILMENT,
                 metrics=("accuracy",), main_metric="accuracy", max_seq_length=128,
                 submission_names=(("test", "QNLI"),), submission_labels=_ENTAILMENT),
        GlueTask(name="rte", text_columns=("sentence1", "sentence2"), label_names=_ENTAILMENT,
                 metrics=("accuracy",), main_metric="accuracy", max_seq_length=128,
                 submission_names=(("test", "RTE"),), submission_labels=_ENTAILMENT),
        GlueTask(name="wnli", text_columns=("sentence1", "sentence2"), label_names=("not_entailment", "entailment"),
                 metrics=("accuracy",), main_metric="accuracy", max_seq_length=128,
                 submission_names=(("test", "WNLI"),), submission_labels=_ZERO_ONE),
    )
}


def get_task(name: str | GlueTask) -> GlueTask:
    """The `GlueTask` called `name` (a `GlueTask` is returned as is).

    Raises:
        ValueError: `name` is not one of the nine GLUE tasks; the message lists them.

    Example:
        >>> get_task("rte").label_names
        ('entailment', 'not_entailment')
    """
    if isinstance(name, GlueTask):
        return name
    try:
        return GLUE_TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown GLUE task {name!r}; allowed values: {', '.join(GLUE_TASKS)}") from None
