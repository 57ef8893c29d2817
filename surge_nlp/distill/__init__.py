"""Distillation and fine-tuning of (binarized) BERT-family classifiers on accelerate.

Example:
    >>> from surge_nlp.distill import TrainingConfig
    >>> TrainingConfig(attention_weight=1.0, ground_truth_weight=0.5).distills
    True
"""

from .config import TrainingConfig
from .losses import (
    attention_loss,
    gram_direction_loss,
    ground_truth_loss,
    hidden_states_loss,
    logits_loss,
    soft_cross_entropy,
)
from .projections import ProjectionRecorder
from .checkpoints import list_checkpoints
from .evaluation import evaluate, predict
from .trainer import TrainResult, train

__all__ = [
    "ProjectionRecorder",
    "TrainResult",
    "TrainingConfig",
    "attention_loss",
    "evaluate",
    "gram_direction_loss",
    "ground_truth_loss",
    "hidden_states_loss",
    "list_checkpoints",
    "logits_loss",
    "predict",
    "soft_cross_entropy",
    "train",
]
