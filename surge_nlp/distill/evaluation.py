"""Predictions and metrics of a model over a loader, gathered across processes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from .losses import ground_truth_loss
from .setup import model_inputs

MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]


@torch.no_grad()
def predict(model: nn.Module, loader, accelerator: Accelerator | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of every example (float32, shape (n, num_labels)) and the labels (None if absent).

    With an accelerator (and a loader it prepared) the results are gathered from all processes,
    without the duplicates the distributed sampler adds to even out the last batch.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    all_logits, all_labels = [], []
    try:
        for batch in loader:
            batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
            if accelerator is not None:
                with accelerator.autocast():
                    logits = model(**model_inputs(batch)).logits.float()
                logits = accelerator.gather_for_metrics(logits)
                labels = accelerator.gather_for_metrics(batch["labels"]) if "labels" in batch else None
            else:
                logits = model(**model_inputs(batch)).logits.float()
                labels = batch.get("labels")
            all_logits.append(logits.cpu())
            if labels is not None:
                all_labels.append(labels.cpu())
    finally:
        model.train(was_training)
    logits = torch.cat(all_logits).numpy()
    labels = torch.cat(all_labels).numpy() if all_labels else None
    return logits, labels


def evaluate(
    model: nn.Module, loader, metric_fn: MetricFn | None = None, accelerator: Accelerator | None = None
) -> dict[str, float]:
    """"loss" (ground-truth loss over the whole set) plus `metric_fn(predictions, references)`.

    Predictions are class indices (argmax), or the scores of a regression head (one output).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
        >>> batch = {"input_ids": torch.randint(0, 100, (4, 6)), "labels": torch.tensor([0, 1, 0, 1])}
        >>> accuracy = lambda p, r: {"accuracy": float((p == r).mean())}
        >>> sorted(evaluate(model, [batch], accuracy))
        ['accuracy', 'loss']
    """
    logits, labels = predict(model, loader, accelerator)
    if labels is None:
        raise ValueError("evaluate() needs a 'labels' entry in every batch")
    predictions = logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(axis=-1)
    metrics = {"loss": float(ground_truth_loss(torch.from_numpy(logits), torch.from_numpy(labels)))}
    if metric_fn is not None:
        metrics.update({key: float(value) for key, value in metric_fn(predictions, labels).items()})
    return metrics
