"""What is evaluated is what is shipped: the packed student reloaded from disk, its deployed form on
the binary kernels, how often the two predict the same, and how fast the deployed form runs.

- `evaluate_shipped`: dev metrics of the packed checkpoint and of `surge_nlp.deploy` of it, the
  fraction of identical predictions per split and, given the FP reference (the teacher), the
  measured speed of both on the same dev batches (`measure_speed`);
- `measure_speed`: median wall time per batch of two models over the same batches, and the ratio.
  This is what the model card reports as the deployed speed.

Example:
    >>> from surge_nlp.shipped import evaluate_shipped
    >>> shipped = evaluate_shipped(recipe, "runs/rte/student", reference=teacher)  # doctest: +SKIP
    >>> shipped["speed"]["speedup"]  # doctest: +SKIP
    3.1
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from .recipe import Recipe

EVAL_BATCH_SIZE = 64
# Speed is timed on the first dev batches (padded per batch, as evaluation runs), a few repeats each.
SPEED_BATCHES = 4
SPEED_REPEATS = 3


@torch.no_grad()
def measure_speed(reference: nn.Module, deployed: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
                  repeats: int = SPEED_REPEATS) -> dict[str, float]:
    """Median seconds per batch of `reference` and `deployed` over the same `batches` (model keyword
    inputs), after one warm-up pass each, alternating the two so that machine noise hits both; and
    `speedup` = reference / deployed. Both run in eval mode with torch's current thread count.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> speed = measure_speed(model, model, [{"input": torch.ones(1, 4)}], repeats=1)
        >>> sorted(speed)
        ['batch_size', 'batches', 'deployed_s_per_batch', 'reference_s_per_batch', 'speedup', 'threads']
    """
    if not batches:
        raise ValueError("measure_speed needs at least one batch")
    devices = {name: {t.device for t in [*model.parameters(), *model.buffers()]} | {t.device for t in batches[0].values()}
               for name, model in (("reference", reference), ("deployed", deployed))}
    if any(len(found) > 1 for found in devices.values()) or devices["reference"] != devices["deployed"]:
        raise ValueError(f"measure_speed times both models on the same device as the batches; found {devices}")
    models = {"reference": reference.eval(), "deployed": deployed.eval()}
    for model in models.values():
        model(**batches[0])  # warm-up: kernels built, caches filled
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            started = time.perf_counter()
            for batch in batches:
                model(**batch)
            times[name].append((time.perf_counter() - started) / len(batches))
    reference_s, deployed_s = statistics.median(times["reference"]), statistics.median(times["deployed"])
    first = next(iter(batches[0].values()))
    return {"reference_s_per_batch": reference_s, "deployed_s_per_batch": deployed_s,
            "speedup": reference_s / deployed_s, "threads": torch.get_num_threads(),
            "batch_size": int(first.shape[0]), "batches": len(batches)}


def evaluate_shipped(recipe: Recipe, student_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
                     reference: nn.Module | None = None) -> dict[str, Any]:
    """The dev metrics of the packed student reloaded from `student_dir` ("packed") and of
    `surge_nlp.deploy` of it on the binary kernels ("deployed"; None, with "deployed_unavailable"
    saying why, when the kernels cannot be built here); "agreement": per dev split, the fraction of
    examples whose predictions are identical; with `reference` (the FP teacher), "speed": the
    deployed form against it on the first dev batches (`measure_speed`)."""
    from .deploy import deploy
    from .glue import agreement, make_dataloader, metrics_of, predictions_by_split
    from .kernels import ops
    from .pipeline import load_data

    model = AutoModelForSequenceClassification.from_pretrained(student_dir).eval()
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(student_dir)
    data = load_data(recipe, tokenizer, splits=("validation",))
    packed = predictions_by_split(recipe.task, model, data, tokenizer, EVAL_BATCH_SIZE)
    shipped: dict[str, Any] = {"packed": metrics_of(recipe.task, packed, data), "deployed": None}
    if not ops.available():
        shipped["deployed_unavailable"] = ops.unavailable_reason()
        return shipped
    fast = deploy(model)
    deployed = predictions_by_split(recipe.task, fast, data, tokenizer, EVAL_BATCH_SIZE)
    shipped["deployed"] = metrics_of(recipe.task, deployed, data)
    shipped["agreement"] = agreement(packed, deployed)
    if reference is not None:
        loader = make_dataloader(next(iter(data.validation.values())), tokenizer, batch_size=EVAL_BATCH_SIZE)
        batches = []
        for batch in loader:
            batch.pop("labels", None)
            batches.append(batch)
            if len(batches) == SPEED_BATCHES:
                break
        shipped["speed"] = _speed_on_cpu(reference, fast, batches)
    return shipped


def _speed_on_cpu(reference: nn.Module, deployed: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """`measure_speed` with the reference on the CPU, where the deployed kernels run: the trainer
    leaves the teacher on its accelerator, and a GPU teacher against CPU kernels is no comparison.
    The reference goes back to its device afterwards."""
    parameter = next(reference.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        return measure_speed(reference.to("cpu"), deployed, batches)
    finally:
        reference.to(device)


__all__ = ["EVAL_BATCH_SIZE", "evaluate_shipped", "measure_speed"]
