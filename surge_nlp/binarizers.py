"""Forward binarizers: what the network computes with.

- `binarize_weight`: `alpha * sign(W - mean_row(W))`, alpha = per-output-channel mean |W - mean_row(W)|
  (BiBERT/BiT). The sign's backward is the plain STE: the estimator choice shapes activation
  gradients, where the surrogate's clipping matters; the weights are small and centred, so every
  estimator would pass their gradient through unchanged anyway. The scale's backward is a choice
  (`WEIGHT_SCALE_GRADIENTS`): "through" differentiates alpha too, which adds `P(s * <s, g> / n)` to
  the straight-through term `P(alpha * g)` (s = the signs, P = row centring, n = the row length);
  "detached" treats alpha as a constant, as BiT and BiBERT do.
- `ActivationQuantizer`: BiT's elastic quantizer with a learnable scale alpha (LSQ gradient) and a
  learnable shift beta. 1-bit signed: `alpha * sign((x - beta) / alpha)` with the estimator's
  surrogate; otherwise `alpha * round(clip((x - beta) / alpha, -Qn, Qp))` with a straight-through
  round (unsigned 1-bit: levels {0, alpha}).

Example:
    >>> import torch
    >>> from surge_nlp.binarizers import ActivationQuantizer, binarize_weight
    >>> from surge_nlp.surrogates import ClippedSTE
    >>> binarize_weight(torch.tensor([[1.0, 3.0]])).tolist()
    [[-1.0, 1.0]]
    >>> q = ActivationQuantizer(bits=1, signed=True, surrogate=ClippedSTE(), shift_shape=(2,))
    >>> q(torch.tensor([[0.5, -2.0]])).abs().unique().numel()  # one magnitude: alpha
    1
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .config import WEIGHT_SCALE_GRADIENTS
from .surrogates import STE, Surrogate

_WEIGHT_STE = STE()
MIN_SCALE = 1e-5


def binarize_weight(weight: torch.Tensor, scale_gradient: str = "through") -> torch.Tensor:
    """`alpha * sign(W - mean_row(W))` with one alpha per row (last dim reduced); STE backward of
    the sign, and of alpha as `scale_gradient` says (see the module docstring)."""
    centered = weight - weight.mean(dim=-1, keepdim=True)
    alpha = centered.abs().mean(dim=-1, keepdim=True)
    if scale_gradient == "detached":
        alpha = alpha.detach()
    elif scale_gradient != "through":
        raise ValueError(f"scale_gradient={scale_gradient!r} is invalid; allowed values: "
                         f"{', '.join(map(repr, WEIGHT_SCALE_GRADIENTS))}")
    return alpha * _WEIGHT_STE.sign(centered)


def weight_signs_and_scales(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The deployable parts of `binarize_weight`: bool signs (True = +1) and per-row scales."""
    centered = weight - weight.mean(dim=-1, keepdim=True)
    return centered >= 0, centered.abs().mean(dim=-1)


def _scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    # Same value as x; gradient multiplied by `scale` (LSQ's step-size gradient scaling).
    return (x - x * scale).detach() + x * scale


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class ActivationQuantizer(nn.Module):
    """Elastic activation quantizer with learnable scale `alpha` and shift `beta` (BiT).

    Args:
        bits: 1, 2, 4 or 8.
        signed: signed levels (`-Qn..Qp`) or unsigned (`0..Qp`, for post-softmax probabilities).
        surrogate: backward of the 1-bit signed sign(); other settings use a straight-through round.
        shift_shape: shape of `beta`, broadcast against the input's trailing dims (per channel).
        learn_shift: False keeps `beta` at 0 (a buffer under the same state-dict key).
        initial_scale: a fixed initial `alpha` instead of the first batch's.

    `alpha` is initialised from the first batch it sees (`2 * mean|x| / sqrt(Qp)` signed,
    `4 * mean|x| / sqrt(Qp)` unsigned), or to `initial_scale`; the `initialized` buffer records it. Under several
    processes, `surge_nlp.calibrate(model, batch)` (run on every process, as the trainer does)
    averages it over the processes so that every replica starts from the same value. A forward
    that calibrates outside `calibrate` never calls a collective (a forward on one rank alone
    must not hang the run): it calibrates on this process alone and warns when there are several.
    """

    def __init__(self, bits: int, signed: bool, surrogate: Surrogate, shift_shape: tuple[int, ...] = (1,),
                 learn_shift: bool = True, initial_scale: float | None = None) -> None:
        super().__init__()
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"ActivationQuantizer bits={bits!r} is invalid; allowed values: 1, 2, 4, 8")
        if initial_scale is not None and not initial_scale > 0:
            raise ValueError(f"ActivationQuantizer initial_scale={initial_scale!r} is invalid; allowed values: None or a number > 0")
        self.bits = bits
        self.initial_scale = initial_scale
        self.signed = signed
        self.surrogate = surrogate
        if signed:
            self.q_neg, self.q_pos = (1, 1) if bits == 1 else (2 ** (bits - 1), 2 ** (bits - 1) - 1)
        else:
            self.q_neg, self.q_pos = 0, 2**bits - 1
        self.alpha = nn.Parameter(torch.ones(1))
        if learn_shift:
            self.beta = nn.Parameter(torch.zeros(shift_shape))
        else:  # a buffer, not a frozen parameter: loading a checkpoint would make a parameter trainable again
            self.register_buffer("beta", torch.zeros(shift_shape))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # Set by surge_nlp.calibrate for its one forward on every process: average alpha over them.
        self.collective_calibration = False

    def reset_parameters(self) -> None:
        """Back to the un-calibrated state: alpha re-initialised from the next batch, beta = 0."""
        with torch.no_grad():
            self.alpha.fill_(1.0)
            self.beta.zero_()
            self.initialized.fill_(False)

    @torch.no_grad()
    def _calibrate(self, x: torch.Tensor) -> None:
        if self.initial_scale is not None:
            self.alpha.fill_(self.initial_scale)
            self.initialized.fill_(True)
            return
        factor = 2.0 if self.signed else 4.0
        alpha = (factor * (x - self.beta).abs().mean() / math.sqrt(self.q_pos)).clamp_min(MIN_SCALE).reshape(1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if self.collective_calibration:
                dist.all_reduce(alpha)
                alpha /= dist.get_world_size()
            else:
                warnings.warn("an activation quantizer calibrated on this process alone, outside surge_nlp.calibrate: "
                              "processes may start from different scales; call surge_nlp.calibrate(model, batch) on "
                              "every process before training", RuntimeWarning, stacklevel=3)
        self.alpha.copy_(alpha.to(self.alpha.dtype))
        self.initialized.fill_(True)

    def effective_scale(self) -> torch.Tensor:
        """|alpha|, at least MIN_SCALE: what the levels are multiplied by (a scale an update pushed
        through zero keeps its levels' signs)."""
        return self.alpha.detach().abs().clamp_min(MIN_SCALE)

    @torch.no_grad()
    def unit_levels(self, x: torch.Tensor) -> torch.Tensor:
        """The integer levels of `x` before the scale, for inference: +-1 (signed 1 bit), {0, 1}
        (unsigned 1 bit), the LSQ integers otherwise. `effective_scale() * unit_levels(x)` is the
        quantized value; the binary kernels binarize exactly these (the same float operations)."""
        if not bool(self.initialized):
            self._calibrate(x)
        u = (x - self.beta.to(x.dtype)) / self.effective_scale().to(x.dtype)
        if self.signed and self.bits == 1:
            return torch.where(u >= 0, 1.0, -1.0).to(x.dtype)
        return u.clamp(-self.q_neg, self.q_pos).round()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self._calibrate(x)
        # |alpha|: a scale that an update pushed through zero must not flip the levels' signs.
        alpha = _scale_gradient(self.alpha, 1.0 / math.sqrt(x.numel() * self.q_pos)).abs().clamp_min(MIN_SCALE).to(x.dtype)
        u = (x - self.beta.to(x.dtype)) / alpha
        if self.signed and self.bits == 1:
            return alpha * self.surrogate.sign(u)
        return alpha * _round_ste(u.clamp(-self.q_neg, self.q_pos))

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        extra = ("" if isinstance(self.beta, nn.Parameter) else ", shift fixed at 0") + ("" if self.initial_scale is None else f", initial_scale={self.initial_scale}")
        return f"bits={self.bits}, {kind}, surrogate={self.surrogate!r}, shift_shape={tuple(self.beta.shape)}{extra}"


def require_calibrated(quantizer: ActivationQuantizer, name: str) -> None:
    """ValueError naming `name` unless the quantizer's scale was calibrated (what deployment needs)."""
    if not bool(quantizer.initialized):
        raise ValueError(
            f"{name}: its activation quantizer is not calibrated yet; run at least one forward pass "
            "(or train / load a trained checkpoint) before surge_nlp.deploy"
        )


@torch.no_grad()
def calibrate(model: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """Initialise every uncalibrated activation quantizer of `model` from one forward of `inputs`
    (model keyword arguments, e.g. a batch's `input_ids` and `attention_mask`), in eval mode (no
    dropout); returns how many it calibrated. Under torch.distributed, call it on every process
    with that process's batch: the scales are averaged over the processes (the only collective a
    quantizer makes). Already calibrated quantizers (a loaded checkpoint) are left as they are.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> import surge_nlp
        >>> model = surge_nlp.binarize(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=100)))
        >>> surge_nlp.calibrate(model, {"input_ids": torch.randint(0, 100, (2, 8))})
        10
        >>> surge_nlp.calibrate(model, {"input_ids": torch.randint(0, 100, (2, 8))})
        0
    """
    pending = [m for m in model.modules() if isinstance(m, ActivationQuantizer) and not bool(m.initialized)]
    if not pending:
        return 0
    was_training = model.training
    model.eval()
    for quantizer in pending:
        quantizer.collective_calibration = True
    try:
        model(**inputs)
    finally:
        for quantizer in pending:
            quantizer.collective_calibration = False
        model.train(was_training)
    return sum(bool(q.initialized) for q in pending)
