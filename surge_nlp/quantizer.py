"""The Transformers plug-in: `SurgeHfQuantizer`, registered with `SurgeConfig` as method "surge".

The quantizer only orchestrates (module swapping lives in `surge_nlp.integration`):
- before weights load: swap the encoder linears for `SurgeLinear` on the meta model;
- after: for a full-precision checkpoint, initialise the SURGE state from the pretrained weights
  (aux weights := latent weights, activation scales calibrated on the first batch). For a
  checkpoint saved by surge_nlp (pre-quantized) the saved state is kept as loaded;
- a pre-quantized checkpoint is validated first and, in the "packed" form, loads into the packed
  layers; `save_pretrained` writes the form `SurgeConfig.checkpoint_format` names
  (see `surge_nlp.serialization`);
- a SurgeConfig passed for a checkpoint that already has one: Transformers has no quantizer hook for
  it (it warns and keeps the saved config); `surge_nlp.from_pretrained` checks it
  (`check_requested_config`) before loading.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .config import QUANT_METHOD, SurgeConfig
from .integration import replace_with_surge_modules, reset_surge_state
from .serialization import checkpoint_state_dict, pack_model, validate_checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel


SURGE_STATE_PATTERNS = (r"\.aux_(weight|u|v)$", r"\.input_quantizer\.", r"\.surge_attention\.")


class SurgeHfQuantizer(HfQuantizer):
    """HfQuantizer for SURGE binarization-aware training (see `SurgeConfig`)."""

    requires_calibration = False
    quantization_config: SurgeConfig

    def __init__(self, quantization_config: SurgeConfig, **kwargs) -> None:
        if not isinstance(quantization_config, SurgeConfig):
            raise TypeError(f"SurgeHfQuantizer needs a SurgeConfig, got {type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model: "PreTrainedModel", checkpoint_files=None, filter_fn=None, **kwargs) -> None:
        # filter_fn: `surge_nlp.binarize`'s selection; from_pretrained selects by modules_to_not_convert only.
        skip = self.get_modules_to_not_convert(model, self.quantization_config.modules_to_not_convert,
                                               list(getattr(model, "_keep_in_fp32_modules", None) or []))
        replace_with_surge_modules(model, self.quantization_config, sorted(skip), filter_fn=filter_fn)
        if self.pre_quantized:
            if self.quantization_config.checkpoint_format == "packed":
                pack_model(model)
            validate_checkpoint(model, checkpoint_files or [], self.quantization_config)
        else:
            # A full-precision checkpoint has no SURGE state; it is initialised after loading,
            # so the load report should not list it as missing. Transformers 5 has no quantizer hook
            # for missing keys (4.x's update_missing_keys is gone): this model attribute is what its
            # loader reads (_adjust_missing_and_unexpected_keys), as models declare their own.
            model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | set(SURGE_STATE_PATTERNS)

    def _process_model_after_weight_loading(self, model: "PreTrainedModel", **kwargs) -> "PreTrainedModel":
        if not self.pre_quantized:
            reset_surge_state(model)
        return model

    def get_state_dict_and_metadata(self, model: "PreTrainedModel"):
        return checkpoint_state_dict(model)

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


def check_requested_config(saved: dict | SurgeConfig, requested: SurgeConfig) -> None:
    """Raise when the SurgeConfig passed to `from_pretrained` differs from the checkpoint's."""
    saved = saved if isinstance(saved, SurgeConfig) else SurgeConfig.from_dict(saved)
    requested_fields, saved_fields = requested.to_dict(), saved.to_dict()
    differences = [f"{key}: saved {saved_fields[key]!r}, passed {requested_fields[key]!r}"
                   for key in saved_fields if saved_fields[key] != requested_fields[key]]
    if differences:
        raise ValueError(
            "the SurgeConfig passed to from_pretrained conflicts with the checkpoint's quantization_config ("
            + "; ".join(differences) + "): load without quantization_config to use the saved one "
            "(surge_nlp.set_checkpoint_format changes what a later save writes)"
        )


def register() -> None:
    """Register "surge" with Transformers (idempotent; `import surge_nlp` calls it)."""
    _register(AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config, SurgeConfig)
    _register(AUTO_QUANTIZER_MAPPING, register_quantizer, SurgeHfQuantizer)
