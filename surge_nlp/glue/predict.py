"""Model predictions on GLUE splits: validation scores and GLUE-server submission files.

The GLUE server takes one TSV per test set (`CoLA.tsv`, `SST-2.tsv`, `MRPC.tsv`, `STS-B.tsv`,
`QQP.tsv`, `MNLI-m.tsv`, `MNLI-mm.tsv`, `QNLI.tsv`, `RTE.tsv`, `WNLI.tsv`, `AX.tsv`), each with the
header `index<TAB>prediction` and one row per example: the example's `idx` and the predicted label
in the original GLUE spelling (`GlueTask.submission_labels`), or the score for STS-B.

Example:
    >>> from surge_nlp.glue import load_glue, predict_to_submission
    >>> data = load_glue("rte", tokenizer, splits=("test",))  # doctest: +SKIP
    >>> predict_to_submission("rte", model, data, tokenizer, "submission", batch_size=64)  # doctest: +SKIP
    [PosixPath('submission/RTE.tsv')]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ..atomic import write_text_atomically
from .data import INDEX_COLUMN, MODEL_LABEL_COLUMN, GlueData, make_dataloader
from .metrics import compute_metrics
from .tasks import GlueTask, get_task


def predict(
    task: str | GlueTask,
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
) -> np.ndarray:
    """Predicted label ids (int64), or scores (float32) for STS-B, in dataset order.

    The model runs in eval mode without gradients on the device of its parameters; its training
    mode is restored afterwards. It must return an object with `.logits` of width `task.num_labels`.

    Raises:
        ValueError: the model's output width does not match the task.

    Example:
        >>> predict("rte", model, data.validation["validation"], tokenizer, batch_size=32)  # doctest: +SKIP
        array([0, 1, 1, ...])
    """
    task = get_task(task)
    if len(dataset) == 0:
        raise ValueError(f"GLUE {task.name}: the split to predict has no rows")
    # Labels stay out of the forward pass: test splits have none, and no loss is needed here.
    if MODEL_LABEL_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(MODEL_LABEL_COLUMN)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with torch.inference_mode():
            for batch in make_dataloader(dataset, tokenizer, batch_size):
                logits = model(**{name: tensor.to(device) for name, tensor in batch.items()}).logits
                if logits.shape[-1] != task.num_labels:
                    raise ValueError(
                        f"model outputs {logits.shape[-1]} logits per example; GLUE {task.name} needs "
                        f"{task.num_labels} (num_labels)"
                    )
                outputs.append(logits[:, 0].float() if task.is_regression else logits.argmax(dim=-1))
    finally:
        model.train(was_training)
    return torch.cat(outputs).cpu().numpy()


def evaluate_model(
    task: str | GlueTask,
    model: torch.nn.Module,
    data: GlueData,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """GLUE metrics of `model` on every validation split of `data`, by split name.

    Example:
        >>> evaluate_model("mnli", model, data, tokenizer, batch_size=64)  # doctest: +SKIP
        {'validation_matched': {'accuracy': 0.84}, 'validation_mismatched': {'accuracy': 0.85}}
    """
    task = _same_task(task, data)
    return metrics_of(task, predictions_by_split(task, model, data, tokenizer, batch_size), data)


def predictions_by_split(task: str | GlueTask, model: torch.nn.Module, data: GlueData, tokenizer: PreTrainedTokenizerBase,
                         batch_size: int) -> dict[str, np.ndarray]:
    """`predict` on every validation split of `data`, by split name."""
    task = _same_task(task, data)
    return {name: np.asarray(predict(task, model, split, tokenizer, batch_size)) for name, split in data.validation.items()}


def metrics_of(task: str | GlueTask, predictions: dict[str, np.ndarray], data: GlueData) -> dict[str, dict[str, float]]:
    """GLUE metrics of predictions by split (from `predictions_by_split`)."""
    task = _same_task(task, data)
    return {name: compute_metrics(task, predictions[name], list(data.validation[name][MODEL_LABEL_COLUMN])) for name in predictions}


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Per split, the fraction of examples where two models predict exactly the same (the same
    class; for STS-B the same float score), e.g. a packed student and its deployed form.

    Example:
        >>> import numpy as np
        >>> agreement({"validation": np.array([0, 1, 1, 0])}, {"validation": np.array([0, 1, 0, 0])})
        {'validation': 0.75}
    """
    return {name: float(np.mean(a[name] == b[name])) for name in a}


def format_predictions(task: str | GlueTask, predictions: Sequence[float] | np.ndarray) -> list[str]:
    """The GLUE server spelling of each prediction: label strings, or scores with 6 decimals (STS-B).

    Example:
        >>> format_predictions("cola", [0, 1]), format_predictions("rte", [0, 1])
        (['0', '1'], ['entailment', 'not_entailment'])
    """
    task = get_task(task)
    if task.is_regression:
        scores = np.asarray(predictions, dtype=np.float64)
        if not np.isfinite(scores).all():  # the server refuses "nan": say so here, not after an upload
            raise ValueError(f"GLUE {task.name}: {int((~np.isfinite(scores)).sum())} of {len(scores)} predicted scores "
                             "are not finite (NaN or infinite); the model is broken, no submission written")
        return [f"{score:.6f}" for score in scores]
    return [task.submission_labels[int(label)] for label in predictions]


def write_submission(path: str | Path, indices: Sequence[int], predictions: Sequence[str]) -> Path:
    """Write one GLUE server TSV (`index<TAB>prediction` header, then one row per example) atomically.

    The file is written under a temporary name in the same directory and renamed, so a reader
    never sees a partial file and an interrupted run leaves the previous file intact.

    Example:
        >>> import tempfile, pathlib
        >>> out = write_submission(pathlib.Path(tempfile.mkdtemp()) / "RTE.tsv", [0, 1], ["entailment", "entailment"])
        >>> out.read_text()
        'index\\tprediction\\n0\\tentailment\\n1\\tentailment\\n'
    """
    path = Path(path)
    if len(indices) != len(predictions):
        raise ValueError(f"write_submission got {len(indices)} indices but {len(predictions)} predictions")
    lines = ["index\tprediction", *(f"{int(index)}\t{prediction}" for index, prediction in zip(indices, predictions))]
    return write_text_atomically(path, "\n".join(lines) + "\n")


def predict_to_submission(
    task: str | GlueTask,
    model: torch.nn.Module,
    data: GlueData,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    batch_size: int,
) -> list[Path]:
    """Predict every test split of `data` and write the GLUE server files into `output_dir`.

    Returns the written paths, in the order of `data.test` (for MNLI: `MNLI-m.tsv`, `MNLI-mm.tsv`,
    `AX.tsv`).

    Raises:
        ValueError: `task` differs from `data.task`, `data` has no test split, or the model's
            output width does not match the task.

    Example:
        >>> predict_to_submission("stsb", model, data, tokenizer, "out", batch_size=64)  # doctest: +SKIP
        [PosixPath('out/STS-B.tsv')]
    """
    task = _same_task(task, data)
    if not data.test:
        raise ValueError(f"GLUE {task.name} data has no test split; load it with splits including 'test'")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = task.submission_files
    # Every split predicted before any file is written: an interrupted MNLI run never leaves new
    # MNLI-m/-mm files beside an older model's AX.tsv.
    rows = {name: (list(split[INDEX_COLUMN]), format_predictions(task, predict(task, model, split, tokenizer, batch_size)))
            for name, split in data.test.items()}
    return [write_submission(output_dir / files[name], indices, predictions) for name, (indices, predictions) in rows.items()]


def _same_task(task: str | GlueTask, data: GlueData) -> GlueTask:
    task = get_task(task)
    if task.name != data.task.name:
        raise ValueError(f"task {task.name!r} does not match the data, which was loaded for {data.task.name!r}")
    return task
