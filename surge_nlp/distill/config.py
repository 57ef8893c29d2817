"""`TrainingConfig`: every setting of the distillation / fine-tuning loop, validated at construction.

Defaults follow BiT's GLUE recipes (weight decay 0.01, warmup 0.1, lr 1e-4 for the activation
scales, logits + hidden-state distillation); the per-task learning rate, epochs and batch size
belong to the recipe (BiT: lr 1e-4..5e-4, 6..50 epochs, batch 8..32).

Example:
    >>> from surge_nlp.distill import TrainingConfig
    >>> cfg = TrainingConfig(learning_rate=5e-4, num_epochs=20, batch_size=8)
    >>> TrainingConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> TrainingConfig(mixed_precision="fp8")
    Traceback (most recent call last):
    ...
    ValueError: TrainingConfig.mixed_precision='fp8' is invalid; allowed values: 'no', 'fp16', 'bf16'
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

MIXED_PRECISION = ("no", "fp16", "bf16")


def _invalid(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"TrainingConfig.{name}={value!r} is invalid; allowed values: {allowed}")


def _is_number(value: Any) -> bool:
    # bool is an int subclass: `learning_rate=True` must not pass as 1.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class TrainingConfig:
    """Settings of `surge_nlp.distill.train`.

    Args:
        learning_rate: peak AdamW learning rate of the weights (latent, auxiliary, embeddings, head).
        scale_learning_rate: peak learning rate of the activation quantizers' scales alpha; no weight
            decay on them.
        shift_learning_rate: peak learning rate of the activation quantizers' per-channel shifts beta;
            None (default) trains them at `learning_rate`, as BiT does. No weight decay on them.
        num_epochs: passes over the training data.
        max_steps: optional cap on optimizer steps (the schedule then spans `max_steps`).
        batch_size: examples per process and micro-batch; `train` checks the DataLoader agrees.
        gradient_accumulation_steps: micro-batches per optimizer step.
        weight_decay: AdamW decoupled weight decay of matrices (not biases, LayerNorm, scales).
        warmup_ratio: fraction of the optimizer steps with a linear warmup; linear decay to 0 after.
        max_grad_norm: gradient clipping norm; None disables clipping.
        seed: seeds Python, NumPy and torch, and the data order (epoch e shuffles with seed + e).
        temperature: softmax temperature of the logits distillation (soft cross-entropy).
        logits_weight: weight of the logits loss (soft cross-entropy; MSE for regression).
        hidden_weight: weight of the hidden-state MSE (every layer, embedding output included).
        attention_weight: weight of BiBERT's direction-matching loss on Q/K/V Gram matrices.
        ground_truth_weight: weight of the loss to the labels (cross-entropy; MSE for regression).
            Without a teacher it is the only loss, which is how a full-precision teacher is fine-tuned.
        checkpoint_every: save a resumable checkpoint every this many optimizer steps (and at the end).
        keep_checkpoints: how many of the latest checkpoints to keep.
        log_every: record the loss terms and lambda statistics every this many optimizer steps.
        eval_every: evaluate on the eval loader every this many optimizer steps, or "epoch"; the last
            step is always evaluated. None (default): one evaluation at the end.
        keep_best: with `eval_every`, end with the weights of the best evaluation (by the metric
            `train`'s `best_metric` names; the eval loss when none), as BiT's scripts and HF Trainer's
            `load_best_model_at_end` do; False keeps the last weights.
        mixed_precision: "no", "fp16" or "bf16" (accelerate autocast; fp16 needs a GPU).
    """

    learning_rate: float = 2e-4
    scale_learning_rate: float = 1e-4
    shift_learning_rate: float | None = None
    num_epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    seed: int = 42
    temperature: float = 1.0
    logits_weight: float = 1.0
    hidden_weight: float = 1.0
    attention_weight: float = 0.0
    ground_truth_weight: float = 0.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int | str | None = None
    keep_best: bool = True
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        for name in ("learning_rate", "scale_learning_rate", "temperature"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise _invalid(name, value, "a number > 0")
        for name in ("weight_decay", "logits_weight", "hidden_weight", "attention_weight", "ground_truth_weight"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise _invalid(name, value, "a number >= 0")
        if self.shift_learning_rate is not None and (not _is_number(self.shift_learning_rate) or not self.shift_learning_rate > 0):
            raise _invalid("shift_learning_rate", self.shift_learning_rate, "None (the main learning_rate) or a number > 0")
        if self.eval_every is not None and self.eval_every != "epoch" and (not _is_int(self.eval_every) or self.eval_every < 1):
            raise _invalid("eval_every", self.eval_every, "None (evaluate at the end), 'epoch', or an integer >= 1")
        if not isinstance(self.keep_best, bool):
            raise _invalid("keep_best", self.keep_best, "True, False")
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            raise _invalid("warmup_ratio", self.warmup_ratio, "a number in [0, 1)")
        if self.max_grad_norm is not None and (not _is_number(self.max_grad_norm) or not self.max_grad_norm > 0):
            raise _invalid("max_grad_norm", self.max_grad_norm, "None (no clipping) or a number > 0")
        for name in ("num_epochs", "batch_size", "gradient_accumulation_steps", "checkpoint_every",
                     "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise _invalid(name, value, "an integer >= 1")
        if self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 1):
            raise _invalid("max_steps", self.max_steps, "None (no cap) or an integer >= 1")
        if not _is_int(self.seed) or self.seed < 0:
            raise _invalid("seed", self.seed, "an integer >= 0")
        if self.mixed_precision not in MIXED_PRECISION:
            raise _invalid("mixed_precision", self.mixed_precision, ", ".join(map(repr, MIXED_PRECISION)))
        if self.logits_weight + self.hidden_weight + self.attention_weight + self.ground_truth_weight == 0:
            raise ValueError(
                "TrainingConfig loss weights are all 0; allowed values: at least one of logits_weight, "
                "hidden_weight, attention_weight, ground_truth_weight > 0"
            )

    @property
    def shift_lr(self) -> float:
        """The shifts' learning rate: `shift_learning_rate`, or `learning_rate` when None."""
        return self.learning_rate if self.shift_learning_rate is None else self.shift_learning_rate

    @property
    def distills(self) -> bool:
        """True when some loss needs a teacher (logits, hidden or attention weight > 0)."""
        return self.logits_weight > 0 or self.hidden_weight > 0 or self.attention_weight > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainingConfig":
        """Build from a dict (e.g. a YAML recipe section); unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainingConfig has no field(s) {unknown}; allowed fields: {sorted(known)}")
        return cls(**values)
