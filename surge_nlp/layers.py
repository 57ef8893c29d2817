"""Binarized layers: `SurgeLinear` (encoder linears) and `SurgeEmbedding` (1-bit word embeddings).

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

import torch
import torch.nn.functional as F
from torch import nn

from .binarizers import ActivationQuantizer, binarize_weight
from .compensator import GradientCompensator
from .config import SurgeConfig
from .surrogates import make_surrogate


class SurgeLinear(nn.Linear):
    """A linear layer with 1-bit weights, quantized inputs and an optional SURGE compensator.

    `weight` holds the latent full-precision weights (trained; binarized on the fly as
    `alpha * sign(W - mean_row(W))`). `input_quantizer` quantizes the input (None for 32-bit
    activations). With estimator "dpgc"/"surge", `aux_weight` is the auxiliary full-precision
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        has_aux = estimator in ("dpgc", "surge")
        surrogate = make_surrogate(base_estimator if has_aux else estimator)
        if activation_bits == 32:
            self.input_quantizer = None
        else:
            self.input_quantizer = ActivationQuantizer(activation_bits, signed=True, surrogate=surrogate, shift_shape=(in_features,))
            self.input_quantizer.to(device=device, dtype=dtype)
        if has_aux:
            self.compensator = GradientCompensator(mode=estimator, eta=eta)
            self.aux_weight = nn.Parameter(torch.empty_like(self.weight))
        else:
            self.compensator = None
            self.register_parameter("aux_weight", None)

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
            **kwargs,
        )

    @property
    def activation_bits(self) -> int:
        return 32 if self.input_quantizer is None else self.input_quantizer.bits

    @property
    def last_lambda(self) -> float | None:
        """The compensator's lambda at the latest backward (None without one, or before any)."""
        return None if self.compensator is None else self.compensator.last_lambda

    @torch.no_grad()
    def reset_surge_state(self) -> None:
        """After loading pretrained weights: aux weight := latent weight, quantizer un-calibrated."""
        if self.aux_weight is not None:
            self.aux_weight.copy_(self.weight)
        if self.input_quantizer is not None:
            self.input_quantizer.reset_parameters()

    def binary_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The binary branch f_b: quantized input times binarized weight, plus bias."""
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, binarize_weight(self.weight), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compensator is None or not self.training or not torch.is_grad_enabled():
            return self.binary_forward(x)
        x_binary, x_auxiliary = self.compensator.fork(x)
        return self.compensator.attach_auxiliary_branch(self.binary_forward(x_binary), x_auxiliary, self.aux_weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_bits=1, activation_bits={self.activation_bits}"


class SurgeEmbedding(nn.Embedding):
    """Word embedding with 1-bit rows: `alpha_row * sign(E - mean_row(E))`, STE backward."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Rows are binarized independently, so gather first and binarize only the rows used.
        rows = F.embedding(input_ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)
        return binarize_weight(rows)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_bits=1"
