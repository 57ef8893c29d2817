"""Binarized self-attention (BiT): quantized Q, K, V and attention probabilities.

Registered with Transformers' attention interface as "surge", so BERT, RoBERTa, DistilBERT and
other encoders that dispatch through `ALL_ATTENTION_FUNCTIONS` run it without patching their
code. Each self-attention module owns an `AttentionQuantizers` submodule (`surge_attention`)
with learnable scales/shifts: Q, K, V signed (`alpha * sign(x - beta)` at 1 bit), the post-softmax
probabilities unsigned (`alpha * round(clip((p - beta)/alpha, 0, 1))`), so that both matmuls
Q.K^T and P.V take quantized operands on both sides. With `SurgeConfig(compensate_attention=True)`
the module also holds one `GradientCompensator` per operand, and in training both products run
through `compensated_matmul` (DPGC/AGS at the attention matmuls; the forward value is unchanged).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .binarizers import ActivationQuantizer
from .compensator import GradientCompensator, compensated_matmul
from .surrogates import make_surrogate

ATTENTION_IMPLEMENTATION = "surge"


OPERANDS = ("query", "key", "value", "probs")


class AttentionQuantizers(nn.Module):
    """The four activation quantizers of one self-attention module (shapes: batch, heads, tokens, dim),
    and with `compensator` ("dpgc"/"surge") a `GradientCompensator` per operand in `compensators`.
    `learn_probability_shift` and `probability_scale` set the probability quantizer's shift and
    initial scale (`SurgeConfig.attention_probability_shift` / `attention_probability_scale`)."""

    def __init__(self, num_heads: int, head_dim: int, bits: int, estimator: str,
                 compensator: str | None = None, eta: float = 0.5,
                 learn_probability_shift: bool = True, probability_scale: float | None = None) -> None:
        super().__init__()
        per_channel = (num_heads, 1, head_dim)
        self.query = ActivationQuantizer(bits, signed=True, surrogate=make_surrogate(estimator), shift_shape=per_channel)
        self.key = ActivationQuantizer(bits, signed=True, surrogate=make_surrogate(estimator), shift_shape=per_channel)
        self.value = ActivationQuantizer(bits, signed=True, surrogate=make_surrogate(estimator), shift_shape=per_channel)
        self.probs = ActivationQuantizer(bits, signed=False, surrogate=make_surrogate(estimator), shift_shape=(1,),
                                         learn_shift=learn_probability_shift, initial_scale=probability_scale)
        self.compensators = None if compensator is None else nn.ModuleDict(
            {operand: GradientCompensator(compensator, eta) for operand in OPERANDS})

    def reset_parameters(self) -> None:
        for quantizer in (self.query, self.key, self.value, self.probs):
            quantizer.reset_parameters()

    def compensating(self) -> bool:
        """Whether this forward runs the products through DPGC (training with gradients)."""
        return self.compensators is not None and self.training and torch.is_grad_enabled()


def surge_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention on quantized operands; same signature and outputs as Transformers' eager attention."""
    quantizers: AttentionQuantizers | None = getattr(module, "surge_attention", None)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if quantizers is None:
        if not getattr(module, FULL_PRECISION_ATTENTION, False):
            raise RuntimeError(
                f"{type(module).__name__} runs the 'surge' attention implementation but has no `surge_attention` "
                "quantizers; load the model through surge_nlp (SurgeConfig) or call surge_nlp.binarize(model, config)"
            )
        return full_precision_attention(module, query, key, value, attention_mask, scaling, dropout)

    quantized: list[torch.Tensor] = []  # the quantized map, returned as the attention weights

    def quantize_probs(probs: torch.Tensor) -> torch.Tensor:
        probs = quantizers.probs(probs)
        if attention_mask is not None:
            # A learned negative shift would lift masked (zero) probabilities to alpha: keep padding out.
            probs = probs.masked_fill(_is_masked(attention_mask), 0.0)
        quantized.append(probs)
        return probs

    if not module.training and not torch.is_grad_enabled():
        with torch.autocast(query.device.type, enabled=False):  # under bf16/fp16 autocast the integer sums would round
            return _exact_inference_attention(quantizers, query, key, value, attention_mask, scaling)
    compensators = quantizers.compensators if quantizers.compensating() else None
    if compensators is not None:
        scores = compensated_matmul(query, key, quantizers.query, quantizers.key, compensators["query"],
                                    compensators["key"], scaling, transpose_b=True)
    else:
        scores = torch.matmul(quantizers.query(query), quantizers.key(key).transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    if compensators is not None:
        output = compensated_matmul(probs, value, quantize_probs, quantizers.value, compensators["probs"],
                                    compensators["value"])
    else:
        output = torch.matmul(quantize_probs(probs), quantizers.value(value))
    return output.transpose(1, 2).contiguous(), quantized[0]


# Set by the conversion on the attention modules the selection leaves out (modules_to_not_convert, filter_fn):
# the model's attention implementation is one for all layers, and these layers keep full precision.
FULL_PRECISION_ATTENTION = "surge_full_precision_attention"


def full_precision_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformers' eager attention (the "surge" mask is eager's additive float mask), for the
    attention modules left in full precision."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _is_masked(attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask <= torch.finfo(attention_mask.dtype).min / 2


@torch.no_grad()
def _exact_inference_attention(quantizers: AttentionQuantizers, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference: both products on the integer levels, scaled afterwards, in the order the binary
    kernels use (`dot * (alpha_a * alpha_b * scaling)`), so the simulated and deployed models
    binarize the same values (the same predictions, not merely close logits)."""
    dtype = query.dtype
    # Each scale is read after its quantizer saw its operand: a first forward calibrates them (surge_nlp.calibrate).
    levels_q, levels_k = quantizers.query.unit_levels(query).float(), quantizers.key.unit_levels(key).float()
    alpha_q, alpha_k = float(quantizers.query.effective_scale()), float(quantizers.key.effective_scale())
    scores = torch.matmul(levels_q, levels_k.transpose(2, 3)) * (alpha_q * alpha_k * scaling)
    if attention_mask is not None:
        scores = scores + attention_mask.float()
    probs = torch.softmax(scores, dim=-1)
    levels = quantizers.probs.unit_levels(probs)
    if attention_mask is not None:  # a learned negative shift must not lift masked keys
        levels = levels.masked_fill(_is_masked(attention_mask), 0.0)
    levels_v = quantizers.value.unit_levels(value).float()
    alpha_p, alpha_v = float(quantizers.probs.effective_scale()), float(quantizers.value.effective_scale())
    output = torch.matmul(levels, levels_v) * (alpha_p * alpha_v)
    return output.to(dtype).transpose(1, 2).contiguous(), (alpha_p * levels).to(dtype)


def register_attention() -> None:
    """Make "surge" a valid `attn_implementation` (idempotent: re-registering overwrites the same entry)."""
    AttentionInterface.register(ATTENTION_IMPLEMENTATION, surge_attention_forward)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, eager_mask)
