"""`SurgeConfig`: the quantization config users pass to `from_pretrained`.

Configuration is data: a dataclass validated at construction, JSON-safe through `to_dict()`, and
stored by Transformers in `config.json` under `quantization_config` (`quant_method: "surge"`).

Example:
    >>> from surge_nlp import SurgeConfig
    >>> cfg = SurgeConfig(activation_bits=1, estimator="surge", eta=0.5)
    >>> SurgeConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .surrogates import SURROGATES

QUANT_METHOD = "surge"

WEIGHT_BITS = (1,)
ACTIVATION_BITS = (1, 2, 4, 8, 32)
EMBEDDING_BITS = (1, 32)
# Estimators with a DPGC auxiliary full-precision branch; see surge_nlp.compensator.
COMPENSATED_ESTIMATORS = ("dpgc", "surge")


def base_estimators() -> tuple[str, ...]:
    """Surrogates of sign() for the binary branch: every registered one (surge_nlp.surrogates)."""
    return tuple(SURROGATES)


def estimators() -> tuple[str, ...]:
    """Every allowed `SurgeConfig.estimator`: the surrogates, then the DPGC/SURGE compensators."""
    return base_estimators() + COMPENSATED_ESTIMATORS
DEFAULT_MODULES_TO_NOT_CONVERT = ("pooler", "classifier", "pre_classifier")
# What save_pretrained writes; see surge_nlp.serialization.
CHECKPOINT_FORMATS = ("packed", "training")
# The student's FFN activation: the checkpoint's own, or BiT's ReLU with an unsigned FFN-output input.
FFN_ACTIVATIONS = ("gelu", "relu")
# Backward of the per-row weight scale; see surge_nlp.binarizers.
WEIGHT_SCALE_GRADIENTS = ("through", "detached")
ATTENTION_PROBABILITY_SHIFTS = ("learned", "zero")


def _is_positive_number(value: Any) -> bool:
    # bool is an int subclass: `eta=True` must not pass as 1; inf would make every gradient inf.
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0 and math.isfinite(value)


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    # bool is an int subclass: `weight_bits=True` must not pass as 1; nor may 2.0 pass as 2 (the
    # bit width feeds integer arithmetic: 2 ** (bits - 1) levels, the kernels' bit planes).
    if isinstance(value, bool) or value not in allowed or type(value) not in {type(choice) for choice in allowed}:
        raise ValueError(f"SurgeConfig.{name}={value!r} is invalid; allowed values: {', '.join(map(repr, allowed))}")


@dataclass
class SurgeConfig(QuantizationConfigMixin):
    """Binarization settings for SURGE quantization-aware training of BERT-family encoders.

    Args:
        weight_bits: bits of the encoder linear weights; 1 (`alpha * sign(W - mean_row(W))`).
        activation_bits: bits of the encoder linear inputs (and of the attention operands when
            `binarize_attention`): 1 (elastic binarization), 2, 4, 8 (uniform LSQ), or 32 (full precision).
        embedding_bits: bits of the word embeddings: 1 or 32.
        estimator: backward surrogate of sign(): "ste", "clipped_ste", "approx_sign", "ede", or
            "dpgc" (auxiliary FP branch, fixed lambda = eta) and "surge" (DPGC + Adaptive Gradient Scaler).
        base_estimator: surrogate of the binary branch under "dpgc"/"surge" (one of the first four).
        eta: AGS base coefficient under "surge"; the fixed lambda under "dpgc". Must be > 0.
        aux_rank: None (default) for SURGE's full-rank auxiliary branch, or a rank r >= 1 for a
            low-rank one, `W_a = U V` initialised from the truncated SVD of the pretrained weight:
            r * (in + out) auxiliary parameters instead of in * out, and a cheaper backward.
            Only with estimator "dpgc" or "surge".
        binarize_attention: also quantize Q, K, V and the attention probabilities, so that every matmul
            of the encoder runs on quantized operands (BiT); requires activation_bits < 32.
        compensate_attention: also put DPGC/AGS at the binarized attention products Q.K^T and P.V:
            each operand's gradient becomes `g_b + lambda * g_a`, with g_a the gradient of the
            full-precision product of the unquantized operands (`surge_nlp.compensator.compensated_matmul`).
            Requires binarize_attention and estimator "dpgc" or "surge"; no extra weights, nothing saved.
        attention_probability_shift: the shift beta of the attention-probability quantizer (threshold
            `alpha / 2 + beta` at 1 bit): "learned" (default) trains it with the other shifts; "zero" keeps it
            at 0, as BiT's code does (only the scale learns). Only with binarize_attention.
        attention_probability_scale: the initial scale alpha of the attention-probability quantizer.
            None (default): from the first batch, `4 * mean(p) / sqrt(Qp)`, which for softmax rows is
            4 / the batch's padded length; a number fixes it, e.g. BiT's 4 / 128 = 0.03125 (BiT pads every
            batch to 128 tokens). Only with binarize_attention.
        modules_to_not_convert: module names (or dotted suffixes/prefixes) kept in full precision.
            The pooler is binarized (BiBERT/BiT's size count) only when "pooler" is removed from it.
        ffn_activation: "gelu" (default) keeps the checkpoint's FFN activation and binarizes the
            FFN output linear's input signed around its shift; "relu" is BiT's FFN: the activation
            becomes ReLU and that input (`output.dense`, DistilBERT's `ffn.lin2`) is quantized
            unsigned, `alpha * round(clip((x - beta) / alpha, 0, Qp))`, alpha initialised at
            `4 * mean|x|`. The student still starts from the (GELU) teacher's weights.
        weight_scale_gradient: backward of the per-row weight scale alpha = mean|W - mean_row(W)|
            (weights and 1-bit word embeddings): "through" differentiates it, "detached" treats it as a
            constant (BiT, BiBERT; the default: it measured better in the STS-B ablation,
            recipes/README.md "Ablations"). See `surge_nlp.binarizers`.
        checkpoint_format: what `save_pretrained`/`push_to_hub` write. "packed" (default): the
            deployable checkpoint, binarized weights 8 signs per byte plus their scales, no latent
            or auxiliary weights; it reloads for inference. "training": the latent weights, DPGC
            auxiliary weights and quantizer state, so training resumes exactly (Trainer checkpoints,
            multi-step distillation). Switch a model with `surge_nlp.set_checkpoint_format`.
    """

    weight_bits: int = 1
    activation_bits: int = 1
    embedding_bits: int = 32
    estimator: str = "surge"
    base_estimator: str = "clipped_ste"
    eta: float = 0.5
    binarize_attention: bool = True
    compensate_attention: bool = False
    aux_rank: int | None = None
    attention_probability_shift: str = "learned"
    attention_probability_scale: float | None = None
    ffn_activation: str = "gelu"
    weight_scale_gradient: str = "detached"
    modules_to_not_convert: list[str] = field(default_factory=lambda: list(DEFAULT_MODULES_TO_NOT_CONVERT))
    checkpoint_format: str = "packed"
    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"SurgeConfig.quant_method={self.quant_method!r} is invalid; allowed values: {QUANT_METHOD!r}")
        _check_choice("weight_bits", self.weight_bits, WEIGHT_BITS)
        _check_choice("activation_bits", self.activation_bits, ACTIVATION_BITS)
        _check_choice("embedding_bits", self.embedding_bits, EMBEDDING_BITS)
        _check_choice("estimator", self.estimator, estimators())
        _check_choice("base_estimator", self.base_estimator, base_estimators())
        _check_choice("checkpoint_format", self.checkpoint_format, CHECKPOINT_FORMATS)
        _check_choice("ffn_activation", self.ffn_activation, FFN_ACTIVATIONS)
        _check_choice("weight_scale_gradient", self.weight_scale_gradient, WEIGHT_SCALE_GRADIENTS)
        if not self.has_auxiliary_branch and self.base_estimator != "clipped_ste":
            raise ValueError(
                f"SurgeConfig.base_estimator={self.base_estimator!r} only applies with estimator in "
                f"{COMPENSATED_ESTIMATORS}; with estimator={self.estimator!r} set `estimator` instead"
            )
        if not _is_positive_number(self.eta):
            raise ValueError(f"SurgeConfig.eta={self.eta!r} is invalid; allowed values: a number > 0")
        self.eta = float(self.eta)
        if self.aux_rank is not None:
            if isinstance(self.aux_rank, bool) or not isinstance(self.aux_rank, int) or self.aux_rank < 1:
                raise ValueError(f"SurgeConfig.aux_rank={self.aux_rank!r} is invalid; allowed values: None (full rank) or an integer >= 1")
            if not self.has_auxiliary_branch:
                raise ValueError(f"SurgeConfig.aux_rank={self.aux_rank!r} only applies with estimator in {COMPENSATED_ESTIMATORS}; "
                                 f"with estimator={self.estimator!r} leave it None")
        if not isinstance(self.binarize_attention, bool):
            raise ValueError(f"SurgeConfig.binarize_attention={self.binarize_attention!r} is invalid; allowed values: True, False")
        if self.binarize_attention and self.activation_bits == 32:
            raise ValueError(
                "SurgeConfig.binarize_attention=True is invalid with activation_bits=32; allowed values: "
                "binarize_attention=False, or activation_bits in (1, 2, 4, 8)"
            )
        if not isinstance(self.compensate_attention, bool):
            raise ValueError(f"SurgeConfig.compensate_attention={self.compensate_attention!r} is invalid; allowed values: True, False")
        if self.compensate_attention and not (self.binarize_attention and self.has_auxiliary_branch):
            raise ValueError(
                "SurgeConfig.compensate_attention=True is invalid with "
                f"binarize_attention={self.binarize_attention!r}, estimator={self.estimator!r}; allowed values: "
                f"compensate_attention=False, or binarize_attention=True with estimator in {COMPENSATED_ESTIMATORS}"
            )
        _check_choice("attention_probability_shift", self.attention_probability_shift, ATTENTION_PROBABILITY_SHIFTS)
        scale = self.attention_probability_scale
        if scale is not None and not _is_positive_number(scale):
            raise ValueError(f"SurgeConfig.attention_probability_scale={scale!r} is invalid; allowed values: None or a number > 0")
        self.attention_probability_scale = None if scale is None else float(scale)
        if not self.binarize_attention and (self.attention_probability_shift != "learned" or scale is not None):
            raise ValueError(
                "SurgeConfig.attention_probability_shift/attention_probability_scale only apply with binarize_attention=True; "
                "allowed values with binarize_attention=False: attention_probability_shift='learned', attention_probability_scale=None"
            )
        if self.modules_to_not_convert is None:
            self.modules_to_not_convert = []
        if isinstance(self.modules_to_not_convert, str) or not all(
            isinstance(name, str) and name for name in self.modules_to_not_convert
        ):
            raise ValueError(
                f"SurgeConfig.modules_to_not_convert={self.modules_to_not_convert!r} is invalid; "
                "allowed values: a list of non-empty module names"
            )
        self.modules_to_not_convert = list(self.modules_to_not_convert)
        for pattern in self.modules_to_not_convert:  # each is a name or a regex (surge_nlp.integration)
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"SurgeConfig.modules_to_not_convert={self.modules_to_not_convert!r} is invalid: entry "
                                 f"{pattern!r} is not a regular expression ({error}); allowed values: module names "
                                 "or regular expressions") from None

    @property
    def has_auxiliary_branch(self) -> bool:
        """True for estimators with a DPGC auxiliary full-precision branch ("dpgc", "surge")."""
        return self.estimator in COMPENSATED_ESTIMATORS

    @property
    def binary_estimator(self) -> str:
        """The surrogate of the binary branch: `base_estimator` under DPGC/SURGE, else `estimator`."""
        return self.base_estimator if self.has_auxiliary_branch else self.estimator

    @property
    def bits_label(self) -> str:
        """W-E-A bits as the binarized-BERT papers write them, e.g. "1-32-1"."""
        return f"{self.weight_bits}-{self.embedding_bits}-{self.activation_bits}"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from a dict (e.g. `config.json`'s `quantization_config`); unknown keys raise. Keyword
        arguments that name a field override the dict's value and are validated with it (Transformers'
        base class sets them after validation); the others are returned unused when asked."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(f"SurgeConfig has no field(s) {unknown}; allowed fields: {sorted(known)}")
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in known}
        config = cls(**{**config_dict, **overrides})
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SurgeConfig) and self.to_dict() == other.to_dict()
