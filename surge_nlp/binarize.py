"""Entry points for models in memory and on disk: `binarize` (torchao's `quantize_` shape) and
`from_pretrained` (Transformers' loader plus the check Transformers has no hook for).

Both go through `SurgeHfQuantizer`'s own hooks (`preprocess_model` / `postprocess_model`), so a
binarized model is exactly what `from_pretrained(..., quantization_config=SurgeConfig(...))` gives.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from .config import QUANT_METHOD, SurgeConfig
from .families import family_of
from .integration import _word_embedding_name, encoder_linear_names, pooler_linear_names, should_convert_module
from .quantizer import SurgeHfQuantizer, check_requested_config

ModuleFilter = Callable[[nn.Module, str], bool]


def binarize(model: PreTrainedModel, config: SurgeConfig | None = None, filter_fn: ModuleFilter | None = None) -> PreTrainedModel:
    """Replace `model`'s encoder linears with SurgeLinear in place, as `from_pretrained` would.

    `filter_fn(module, name) -> bool` selects what is converted (linears, self-attention modules,
    the word embedding), on top of `config.modules_to_not_convert`; None converts everything the
    config allows. The model then carries the quantizer and a copy of `config` as
    `config.quantization_config` (the caller's object is not changed), so Trainer, save_pretrained
    and `surge_nlp.push_to_hub` treat it exactly like one loaded with a SurgeConfig. What `filter_fn`
    leaves out is written into that copy's `modules_to_not_convert` (one anchored entry per module),
    so the saved config.json says what is binarized and `from_pretrained` rebuilds the same model.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> import surge_nlp
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=64, vocab_size=100))
        >>> model = surge_nlp.binarize(model, surge_nlp.SurgeConfig(activation_bits=1),
        ...                            filter_fn=lambda module, name: ".layer.0." not in f".{name}.")
        >>> type(model.encoder.layer[1].output.dense).__name__, type(model.encoder.layer[0].output.dense).__name__
        ('SurgeLinear', 'Linear')
        >>> model.config.quantization_config.quant_method
        'surge'
        >>> print(model.config.quantization_config.modules_to_not_convert[-1])  # the filter's choice, saved
        encoder\\.layer\\.0\\.attention\\.self$
    """
    config = config if config is not None else SurgeConfig()
    if not isinstance(config, SurgeConfig):
        raise TypeError(f"binarize() needs a SurgeConfig, got {type(config).__name__}")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"binarize() needs a Transformers PreTrainedModel (BERT family), got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"binarize(filter_fn=...) must be a callable (module, name) -> bool, got {type(filter_fn).__name__}")
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(f"the model is already quantized ({model.config.quantization_config.quant_method}); binarize a full-precision model")
    config = copy.deepcopy(config)  # the model's own: saving formats and the filter's choice must not reach the caller's
    if filter_fn is not None:
        if not any(should_convert_module(name, config.modules_to_not_convert) and filter_fn(model.get_submodule(name), name)
                   for name in encoder_linear_names(model)):
            raise ValueError(f"SURGE found no encoder linear to binarize in {type(model).__name__}: "
                             f"modules_to_not_convert={config.modules_to_not_convert} and the given filter_fn leave out all of them")
        config.modules_to_not_convert = [*config.modules_to_not_convert, *_left_out_by(filter_fn, model, config)]
    quantizer = SurgeHfQuantizer(config, pre_quantized=False)
    quantizer.preprocess_model(model)
    model.hf_quantizer = quantizer  # what from_pretrained sets between its two quantizer hooks
    quantizer.postprocess_model(model)
    return model


def _left_out_by(filter_fn: ModuleFilter, model: PreTrainedModel, config: SurgeConfig) -> list[str]:
    """The convertible modules `filter_fn` rejects, as `modules_to_not_convert` entries: each module's
    escaped name (without the base model's prefix, so a reload under another head class matches too),
    ending with `$` so that it leaves out that module and not the modules inside it."""
    candidates = encoder_linear_names(model) + pooler_linear_names(model)
    if config.binarize_attention:
        candidates += family_of(model).attention_names(model)
    embedding = _word_embedding_name(model) if config.embedding_bits == 1 else None
    if embedding is not None:
        candidates.append(embedding)
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    left_out = [name for name in candidates if not filter_fn(model.get_submodule(name), name)]
    return [re.escape(name.removeprefix(prefix)) + "$" for name in left_out]


def from_pretrained(name_or_path: str | os.PathLike, quantization_config: SurgeConfig | None = None,
                    auto_class: Any = AutoModelForSequenceClassification, **kwargs: Any) -> PreTrainedModel:
    """`auto_class.from_pretrained`, refusing a SurgeConfig that conflicts with the checkpoint's.

    A bare `from_pretrained(saved_surge_checkpoint, quantization_config=other_config)` only warns and
    loads the checkpoint's own config (Transformers has no hook for a quantizer to refuse); here the
    conflict is an error that lists the differing fields. The CLI and the GLUE pipeline load through it.

    Example:
        >>> import surge_nlp
        >>> model = surge_nlp.from_pretrained("out", surge_nlp.SurgeConfig())  # doctest: +SKIP
    """
    if quantization_config is not None:
        config_kwargs = {key: kwargs[key] for key in ("revision", "token", "cache_dir", "local_files_only") if key in kwargs}
        saved = getattr(AutoConfig.from_pretrained(name_or_path, **config_kwargs), "quantization_config", None)
        saved_method = saved.get("quant_method") if isinstance(saved, dict) else getattr(saved, "quant_method", None)
        if isinstance(quantization_config, SurgeConfig) and saved_method == QUANT_METHOD:
            check_requested_config(saved, quantization_config)
            quantization_config = None  # identical: load with the saved one, without Transformers' warning
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return auto_class.from_pretrained(name_or_path, **kwargs)
