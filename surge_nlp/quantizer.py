"""The Transformers plug-in: `SurgeHfQuantizer`, registered with `SurgeConfig` as method "surge".

The quantizer only orchestrates (module swapping lives in `surge_nlp.integration`):
- before weights load: swap the encoder linears for `SurgeLinear` on the meta model;
- after: for a full-precision checkpoint, initialise the SURGE state from the pretrained weights
  (aux weights := latent weights, activation scales calibrated on the first batch). For a
  checkpoint saved by surge_nlp (pre-quantized) the saved state is kept as loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .config import QUANT_METHOD, SurgeConfig
from .integration import replace_with_surge_modules, reset_surge_state

if TYPE_CHECKING:
    from transformers import PreTrainedModel


SURGE_STATE_PATTERNS = (r"\.aux_weight$", r"\.input_quantizer\.", r"\.surge_attention\.")


class SurgeHfQuantizer(HfQuantizer):
    """HfQuantizer for SURGE binarization-aware training (see `SurgeConfig`)."""

    requires_calibration = False
    quantization_config: SurgeConfig

    def __init__(self, quantization_config: SurgeConfig, **kwargs) -> None:
        if not isinstance(quantization_config, SurgeConfig):
            raise TypeError(f"SurgeHfQuantizer needs a SurgeConfig, got {type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model: "PreTrainedModel", **kwargs) -> None:
        keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
        replace_with_surge_modules(model, self.quantization_config, keep_fp32)
        if not self.pre_quantized:
            # A full-precision checkpoint has no SURGE state; it is initialised after loading,
            # so the load report should not list it as missing.
            model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | set(SURGE_STATE_PATTERNS)

    def _process_model_after_weight_loading(self, model: "PreTrainedModel", **kwargs) -> "PreTrainedModel":
        if not self.pre_quantized:
            reset_surge_state(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def _register(mapping: dict, decorator, cls: type) -> None:
    # Public API when the name is free; re-importing or reloading surge_nlp replaces our own stale
    # class instead of raising (the decorators refuse duplicates). Another package's "surge" is kept.
    current = mapping.get(QUANT_METHOD)
    if current is None:
        decorator(QUANT_METHOD)(cls)
    elif current is not cls:
        if current.__module__ != cls.__module__ or current.__qualname__ != cls.__qualname__:
            raise RuntimeError(f"quantization method {QUANT_METHOD!r} is already registered by {current.__module__}.{current.__qualname__}")
        mapping[QUANT_METHOD] = cls


def register() -> None:
    """Register "surge" with Transformers (idempotent; `import surge_nlp` calls it)."""
    _register(AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config, SurgeConfig)
    _register(AUTO_QUANTIZER_MAPPING, register_quantizer, SurgeHfQuantizer)
