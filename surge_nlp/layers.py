"""Binarized training layers: `SurgeLinear` (encoder linears) and `SurgeEmbedding` (1-bit word
embeddings), and the `BinarizedLayer` protocol that they and their packed forms
(`surge_nlp.packed_layers`) follow: `weight_bits`, `input_bits`, `engine` and `binary_shape`, which
`surge_nlp.summary` reads (larq's `precision`).

Example:
    >>> import torch
    >>> from surge_nlp import SurgeConfig, SurgeLinear
    >>> layer = SurgeLinear.from_config(SurgeConfig(estimator="surge"), in_features=8, out_features=4)
    >>> layer.aux_weight.shape
    torch.Size([4, 8])
    >>> layer(torch.randn(2, 8)).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .binarizers import ActivationQuantizer, binarize_weight, weight_signs_and_scales
from .compensator import GradientCompensator
from .config import COMPENSATED_ESTIMATORS, SurgeConfig

SIMULATED = "simulated"
KERNEL_ENGINES = {True: "xor-popcount", False: "and-popcount"}  # by input signedness


@runtime_checkable
class BinarizedLayer(Protocol):
    """What every binarized layer tells `summary`: its bits, where it runs, and its 1-bit matrix."""

    weight_bits: int
    engine: str  # "simulated", or the kernel it runs on: "xor-popcount", "and-popcount", "bit-serial-popcount"

    @property
    def input_bits(self) -> int: ...

    @property
    def binary_shape(self) -> tuple[int, int]: ...  # (rows, columns) of the 1-bit matrix
from .surrogates import make_surrogate


def _input_quantizer(activation_bits: int, estimator: str, base_estimator: str, in_features: int,
                     device: torch.device | str | None, dtype: torch.dtype | None,
                     signed: bool = True) -> ActivationQuantizer | None:
    """The per-channel input quantizer of a binarized linear (None for 32-bit activations); unsigned
    for a post-ReLU input (BiT's FFN output linear)."""
    if activation_bits == 32:
        return None
    surrogate = make_surrogate(base_estimator if estimator in COMPENSATED_ESTIMATORS else estimator)
    quantizer = ActivationQuantizer(activation_bits, signed=signed, surrogate=surrogate, shift_shape=(in_features,))
    return quantizer.to(device=device, dtype=dtype)


def exact_inference(module: nn.Module) -> bool:
    """Whether a linear's forward runs the exact inference path: in eval mode with no gradient recorded
    (evaluation, `pipeline`, calibration); the value is the autograd path's up to float rounding. A
    training-mode forward without gradients (reentrant gradient checkpointing's first pass) takes the
    autograd path, as its recomputation will."""
    return not module.training and not torch.is_grad_enabled()


def exact_binary_linear(levels: torch.Tensor, signs: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """`(input_scale * levels) @ (weight_scale * signs)^T + bias`, computed as the popcount kernels do:
    the integer dot product first (exact in float32 while the reduction is below 2^24), then
    `dot * input_scale * weight_scale + bias` in that order, so both paths give the same floats."""
    with torch.autocast(levels.device.type, enabled=False):  # under bf16/fp16 autocast the integer sums would round
        dot = F.linear(levels.float(), signs.float())
        out = dot * input_scale.float() * weight_scale.float()
        return out + bias.float() if bias is not None else out


class OneBitLinearBits:
    """The `BinarizedLayer` side of a linear with 1-bit weights and an `input_quantizer` (a mixin)."""

    weight_bits = 1
    engine = SIMULATED

    @property
    def activation_bits(self) -> int:
        return 32 if self.input_quantizer is None else self.input_quantizer.bits

    input_bits = activation_bits

    @property
    def binary_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features


class SurgeLinear(OneBitLinearBits, nn.Linear):
    """A linear layer with 1-bit weights, quantized inputs and an optional SURGE compensator.

    `weight` holds the latent full-precision weights (trained; binarized on the fly as
    `alpha * sign(W - mean_row(W))`; `weight_scale_gradient` says whether alpha is differentiated).
    `input_quantizer` quantizes the input (None for 32-bit activations): signed, or unsigned with
    `input_signed=False` (a post-ReLU input). With estimator "dpgc"/"surge", `aux_weight` is the auxiliary full-precision
    weight of DPGC and `compensator` combines the two input gradients; in eval mode (or without
    grad) the auxiliary branch is skipped entirely.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        activation_bits: int = 1,
        estimator: str = "surge",
        base_estimator: str = "clipped_ste",
        eta: float = 0.5,
        aux_rank: int | None = None,
        input_signed: bool = True,
        weight_scale_gradient: str = "detached",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_scale_gradient = weight_scale_gradient
        self.input_quantizer = _input_quantizer(activation_bits, estimator, base_estimator, in_features, device, dtype,
                                                signed=input_signed)
        self.compensator = GradientCompensator(mode=estimator, eta=eta) if estimator in COMPENSATED_ESTIMATORS else None
        full_rank = self.compensator is not None and aux_rank is None
        low_rank = self.compensator is not None and aux_rank is not None
        # Full-rank DPGC: W_a (out x in). Low rank: W_a = aux_u @ aux_v, (out x r)(r x in).
        self.aux_weight = nn.Parameter(torch.empty_like(self.weight)) if full_rank else None
        self.aux_u = nn.Parameter(torch.empty(out_features, aux_rank, device=device, dtype=dtype)) if low_rank else None
        self.aux_v = nn.Parameter(torch.empty(aux_rank, in_features, device=device, dtype=dtype)) if low_rank else None

    @classmethod
    def from_config(cls, config: SurgeConfig, in_features: int, out_features: int, bias: bool = True, **kwargs) -> "SurgeLinear":
        return cls(
            in_features,
            out_features,
            bias,
            activation_bits=config.activation_bits,
            estimator=config.estimator,
            base_estimator=config.base_estimator,
            eta=config.eta,
            aux_rank=config.aux_rank,
            weight_scale_gradient=config.weight_scale_gradient,
            **kwargs,
        )

    @property
    def last_lambda(self) -> float | None:
        """The compensator's lambda at the latest backward (None without one, or before any)."""
        return None if self.compensator is None else self.compensator.last_lambda

    @property
    def last_alignment(self) -> float | None:
        """cos(g_b, g_a) between the binary and auxiliary input gradients at the latest backward."""
        return None if self.compensator is None else self.compensator.last_alignment

    @property
    def aux_rank(self) -> int | None:
        """Rank of the low-rank auxiliary branch (None: full rank or no auxiliary branch)."""
        return None if self.aux_u is None else self.aux_u.shape[1]

    @torch.no_grad()
    def init_auxiliary_from_weight(self) -> None:
        """W_a := the latent weight; low rank: its best rank-r approximation (truncated SVD),
        split evenly as `aux_u = U_r sqrt(S_r)`, `aux_v = sqrt(S_r) V_r^T`."""
        if self.aux_weight is not None:
            self.aux_weight.copy_(self.weight)
        elif self.aux_u is not None:
            u, s, vh = torch.linalg.svd(self.weight.float(), full_matrices=False)
            root = s[: self.aux_rank].sqrt()
            self.aux_u.copy_(u[:, : self.aux_rank] * root)
            self.aux_v.copy_(root[:, None] * vh[: self.aux_rank])

    @torch.no_grad()
    def reset_surge_state(self) -> None:
        """After loading pretrained weights: auxiliary branch from the latent weight, quantizer un-calibrated."""
        self.init_auxiliary_from_weight()
        if self.input_quantizer is not None:
            self.input_quantizer.reset_parameters()

    def binary_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The binary branch f_b: quantized input times binarized weight, plus bias (at inference,
        the exact integer products, as `deploy`'s kernels compute them)."""
        if self.input_quantizer is not None and exact_inference(self):
            signs, scales = weight_signs_and_scales(self.weight)
            out = exact_binary_linear(self.input_quantizer.unit_levels(x), torch.where(signs, 1.0, -1.0),
                                      self.input_quantizer.effective_scale(), scales, self.bias)
            return out.to(x.dtype)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, binarize_weight(self.weight, self.weight_scale_gradient), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compensator is None or not self.training or not torch.is_grad_enabled():
            return self.binary_forward(x)
        x_binary, x_auxiliary = self.compensator.fork(x)
        factors = (self.aux_weight,) if self.aux_weight is not None else (self.aux_u, self.aux_v)
        return self.compensator.attach_auxiliary_branch(self.binary_forward(x_binary), x_auxiliary, *factors)

    def extra_repr(self) -> str:
        rank = f", aux_rank={self.aux_rank}" if self.aux_rank is not None else ""
        return f"{super().extra_repr()}, weight_bits=1, activation_bits={self.activation_bits}{rank}"


class SurgeEmbedding(nn.Embedding):
    """Word embedding with 1-bit rows: `alpha_row * sign(E - mean_row(E))`, STE backward (alpha's
    backward as `weight_scale_gradient` says)."""

    weight_bits = 1
    input_bits = 32  # token ids: a lookup, no activation quantizer
    engine = SIMULATED

    def __init__(self, *args, weight_scale_gradient: str = "detached", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_scale_gradient = weight_scale_gradient

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Rows are binarized independently, so gather first and binarize only the rows used.
        rows = F.embedding(input_ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)
        return binarize_weight(rows, self.weight_scale_gradient)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_bits=1"

    @property
    def binary_shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim
