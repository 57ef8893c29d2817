"""`binarize(model, config)`: SURGE-quantize a model already in memory (torchao's `quantize_` style)."""

from __future__ import annotations

from transformers import PreTrainedModel

from .config import SurgeConfig
from .hub import attach_push_to_hub
from .integration import replace_with_surge_modules
from .quantizer import SurgeHfQuantizer


def binarize(model: PreTrainedModel, config: SurgeConfig | None = None) -> PreTrainedModel:
    """Replace `model`'s encoder linears with SurgeLinear in place, as `from_pretrained` would.

    The model then carries the quantizer and `config.quantization_config`, so Trainer,
    save_pretrained and push_to_hub treat it exactly like one loaded with a SurgeConfig.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> import surge_nlp
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                              intermediate_size=64, vocab_size=100))
        >>> model = surge_nlp.binarize(model, surge_nlp.SurgeConfig(activation_bits=1))
        >>> model.config.quantization_config.quant_method
        'surge'
    """
    config = config if config is not None else SurgeConfig()
    if not isinstance(config, SurgeConfig):
        raise TypeError(f"binarize() needs a SurgeConfig, got {type(config).__name__}")
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(f"the model is already quantized ({model.config.quantization_config.quant_method}); binarize a full-precision model")
    quantizer = SurgeHfQuantizer(config, pre_quantized=False)
    replace_with_surge_modules(model, config, list(getattr(model, "_keep_in_fp32_modules", None) or []))
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.config.quantization_config = config
    attach_push_to_hub(model)
    return model
