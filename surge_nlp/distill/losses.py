"""Distillation losses, each a small pure function of tensors.

- `logits_loss`: soft cross-entropy to the teacher's tempered softmax (MSE for regression heads);
- `hidden_states_loss`: MSE on every hidden state, embedding output included (BiT), over real tokens;
- `gram_direction_loss`: BiBERT's direction matching of one projection (Q, K or V): per example and
  head, the token Gram matrix `X X^T` divided by its Frobenius norm, student vs teacher;
- `attention_loss`: `gram_direction_loss` summed over layers and over Q, K, V;
- `ground_truth_loss`: cross-entropy to the labels (MSE for regression).

Example:
    >>> import torch
    >>> from surge_nlp.distill.losses import logits_loss
    >>> logits = torch.tensor([[2.0, 0.0]])
    >>> round(float(logits_loss(logits, logits, temperature=1.0)), 4)  # entropy of softmax([2, 0])
    0.3653
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .setup import model_inputs, text_config

if TYPE_CHECKING:
    from .config import TrainingConfig
    from .projections import ProjectionRecorder

GRAM_EPS = 1e-12


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`T^2 * mean_n sum_c -softmax(t_n / T)_c * log_softmax(s_n / T)_c`.

    The T^2 factor keeps the gradient magnitude independent of T (Hinton et al.); at T = 1 it is
    the plain cross-entropy to the teacher's probabilities.
    """
    teacher_probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(teacher_probs * student_log_probs).sum(dim=-1).mean() * temperature**2


def logits_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft cross-entropy for classification heads; MSE for a regression head (one output)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits.float(), teacher_logits.float())
    return soft_cross_entropy(student_logits, teacher_logits, temperature)


def _token_mask(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return hidden.new_ones(hidden.shape[:2], dtype=torch.float32)
    return attention_mask.to(torch.float32)


def hidden_states_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over layers of the MSE between student and teacher hidden states (batch, tokens, hidden).

    Padding tokens (attention_mask 0) are left out: each layer's term is the mean squared error over
    real tokens and hidden units.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"student has {len(student_hidden)} hidden states and teacher {len(teacher_hidden)}; "
                         "hidden-state distillation needs the same number of layers")
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for student, teacher in zip(student_hidden, teacher_hidden):
        if student.shape != teacher.shape:
            raise ValueError(f"student hidden state {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape; "
                             "hidden-state distillation needs the same hidden size")
        mask = _token_mask(student, attention_mask)
        squared = (student.float() - teacher.float()).pow(2).sum(dim=-1)
        total = total + (squared * mask).sum() / (mask.sum() * student.shape[-1])
    return total


def normalized_gram(projection: torch.Tensor, num_heads: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head token Gram matrices `X X^T / ||X X^T||_F` of a projection (batch, tokens, heads * dim).

    Returns (batch, heads, tokens, tokens); rows and columns of padding tokens are zero.
    """
    batch, tokens, width = projection.shape
    if width % num_heads:
        raise ValueError(f"projection width {width} is not divisible by num_heads={num_heads}")
    x = projection.float() * _token_mask(projection, attention_mask).unsqueeze(-1)
    x = x.view(batch, tokens, num_heads, width // num_heads).transpose(1, 2)
    gram = x @ x.transpose(-1, -2)
    norm = torch.linalg.matrix_norm(gram, ord="fro", keepdim=True)
    return gram / norm.clamp_min(GRAM_EPS)


def gram_direction_loss(
    student_projection: torch.Tensor,
    teacher_projection: torch.Tensor,
    num_heads: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over examples and heads of `||G_s - G_t||_F^2` for the unit-norm Gram matrices G.

    Only the direction of each Gram matrix is matched (BiBERT): the value is 2 - 2 cos(G_s, G_t),
    in [0, 4], so a binarized student whose activations are scaled differently is not penalised.
    """
    student = normalized_gram(student_projection, num_heads, attention_mask)
    teacher = normalized_gram(teacher_projection, num_heads, attention_mask)
    return (student - teacher).pow(2).sum(dim=(-1, -2)).mean()


def attention_loss(
    student_projections: Sequence[Sequence[torch.Tensor]],
    teacher_projections: Sequence[Sequence[torch.Tensor]],
    num_heads: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over layers and over (query, key, value) of `gram_direction_loss`.

    Each argument is one `(query, key, value)` triple of projections per layer.
    """
    if len(student_projections) != len(teacher_projections):
        raise ValueError(f"student has {len(student_projections)} attention layers and teacher {len(teacher_projections)}; "
                         "attention distillation needs the same number of layers")
    terms = [
        gram_direction_loss(student, teacher, num_heads, attention_mask)
        for student_layer, teacher_layer in zip(student_projections, teacher_projections)
        for student, teacher in zip(student_layer, teacher_layer, strict=True)
    ]
    return torch.stack(terms).sum()


def ground_truth_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to integer labels; MSE to float targets for a regression head (one output)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


def compute_losses(
    student: nn.Module,
    teacher: nn.Module | None,
    batch: dict[str, Any],
    config: TrainingConfig,
    student_projections: ProjectionRecorder | None = None,
    teacher_projections: ProjectionRecorder | None = None,
) -> dict[str, torch.Tensor]:
    """One micro-batch: the weighted total under "loss" and each enabled term under "loss/<term>".

    The projection recorders (active context managers on student and teacher) are needed only
    with `attention_weight > 0`.
    """
    inputs = model_inputs(batch)
    mask = inputs.get("attention_mask")
    want_hidden = teacher is not None and config.hidden_weight > 0
    student_out = student(**inputs, output_hidden_states=want_hidden)
    terms: dict[str, torch.Tensor] = {}
    if teacher is not None:
        with torch.no_grad():
            teacher_out = teacher(**inputs, output_hidden_states=want_hidden)
        if config.logits_weight > 0:
            terms["logits"] = logits_loss(student_out.logits, teacher_out.logits, config.temperature)
        if config.hidden_weight > 0:
            terms["hidden"] = hidden_states_loss(student_out.hidden_states, teacher_out.hidden_states, mask)
        if config.attention_weight > 0:
            terms["attention"] = attention_loss(student_projections.layers(), teacher_projections.layers(),
                                                text_config(teacher).num_attention_heads, mask)
    if config.ground_truth_weight > 0:
        if "labels" not in batch:
            raise ValueError("ground_truth_weight > 0 needs a 'labels' entry in every training batch")
        terms["ground_truth"] = ground_truth_loss(student_out.logits, batch["labels"])
    weights = {"logits": config.logits_weight, "hidden": config.hidden_weight,
               "attention": config.attention_weight, "ground_truth": config.ground_truth_weight}
    total = sum(weights[name] * value for name, value in terms.items())
    return {"loss": total, **{f"loss/{name}": value for name, value in terms.items()}}


# --------------------------------------------------------------------------------------------
# Evaluation


# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# The loop
