"""Module swapping, in one place: which modules of a BERT-family model SURGE replaces, and how.

Replaced: every `nn.Linear` inside the encoder's layer stack, as the model's family
(`surge_nlp.families`) names it (`encoder.layer.N.` for BERT/RoBERTa/ELECTRA/DeBERTa,
`transformer.layer.N.` for DistilBERT, `layers.N.` for ModernBERT): the attention projections and
output, and the FFN linears. The pooler's dense layer (`pooler.dense`, BERT-style) is binarized too, but
only when "pooler" is removed from `modules_to_not_convert` (the default keeps it; BiBERT/BiT count it
binarized in their 13.4 MB). With `binarize_attention`, every self-attention module of the stack also gets
`AttentionQuantizers` and the model runs the "surge" attention implementation. With
`embedding_bits=1`, the word embeddings become a `SurgeEmbedding`. With `ffn_activation="relu"`
(BiT's FFN), every encoder layer's FFN activation becomes ReLU and its FFN output linear quantizes
its input unsigned (where the family keeps them: `surge_nlp.families`). Nothing else changes; a module
is kept in full precision when an entry of `modules_to_not_convert` (a name or a regex) matches whole
dotted components of its name anywhere: "encoder.layer.0", "output.dense" and "bert.pooler" all work.

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> import surge_nlp
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
    >>> model = surge_nlp.binarize(model, surge_nlp.SurgeConfig())
    >>> sorted({type(m).__name__ for m in model.modules() if "Surge" in type(m).__name__})
    ['SurgeLinear']
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from .attention import ATTENTION_IMPLEMENTATION, FULL_PRECISION_ATTENTION, AttentionQuantizers, register_attention
from .binarizers import ActivationQuantizer
from .config import SurgeConfig
from .families import family_of, ffn_output_names, model_type, set_ffn_activation, supported_model_types
from .layers import SurgeEmbedding, SurgeLinear
from .surrogates import ProgressDriven

POOLER = re.compile(r"(?:^|\.)pooler\.")


def should_convert_module(name: str, patterns: list[str]) -> bool:
    """False when a pattern matches whole dotted components of `name` (prefix, middle or suffix)."""
    return not any(re.search(rf"(?:^|\.)(?:{pattern})(?:\.|$)", name) for pattern in patterns)


def encoder_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the encoder-stack linears SURGE binarizes (before exclusions)."""
    return family_of(model).linear_names(model)


def pooler_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the pooler linears, binarized only when "pooler" is not excluded."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and POOLER.search(name)]


def _word_embedding_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    for name, module in model.named_modules():
        if module is embedding:
            return name
    return None


def _materialize_like(old: nn.Module, new: nn.Module) -> nn.Module:
    """Put `new` (built on meta) on `old`'s device; off meta, carry old's weights over and reset
    the SURGE state from them. On meta (from_pretrained) the quantizer does this after loading."""
    device = old.weight.device
    new = new.to_empty(device=device).train(old.training)  # a fresh module is in training mode; keep the model's
    if device.type != "meta":
        if isinstance(new, SurgeEmbedding):
            new.weight = old.weight  # the same parameter: an MLM decoder tied to it stays tied, as from_pretrained ties it
        else:
            with torch.no_grad():
                new.load_state_dict(old.state_dict(), strict=False)
        if isinstance(new, SurgeLinear):
            new.reset_surge_state()
    return new


def module_filter(modules_to_not_convert: list[str], filter_fn: Callable[[nn.Module, str], bool] | None = None
                  ) -> Callable[[nn.Module, str], bool]:
    """The selection as one predicate `(module, name) -> bool`: not matched by `modules_to_not_convert`
    (see `should_convert_module`) and, when given, accepted by `filter_fn`."""
    def selected(module: nn.Module, name: str) -> bool:
        return should_convert_module(name, modules_to_not_convert) and (filter_fn is None or bool(filter_fn(module, name)))
    return selected


def replace_with_surge_modules(model: nn.Module, config: SurgeConfig, modules_to_not_convert: list[str] | None = None,
                               filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Swap the encoder linears (and attention, embeddings per `config`) in place; returns `model`.

    Selection (`module_filter`) is apart from the transformation: a module is converted when no entry
    of `modules_to_not_convert` (default: the config's) matches it and `filter_fn`, if given, accepts it.
    Works on a model on the meta device (from_pretrained, weights load afterwards) and on a
    materialised model (weights are carried over). Raises ValueError when nothing is binarizable.
    """
    skip = list(config.modules_to_not_convert if modules_to_not_convert is None else modules_to_not_convert)
    selected = module_filter(skip, filter_fn)
    linear_names = [name for name in encoder_linear_names(model) if selected(model.get_submodule(name), name)]
    if not linear_names:
        raise ValueError(
            f"SURGE found no encoder linear to binarize in {type(model).__name__} (model type {model_type(model)!r}, "
            f"looked under `{family_of(model).layers}.N`); supported model types: {', '.join(supported_model_types())}, "
            f"with modules_to_not_convert={skip}" + (" and the given filter_fn" if filter_fn is not None else "")
        )
    linear_names += [name for name in pooler_linear_names(model) if selected(model.get_submodule(name), name)]
    # Everything that can refuse the model is asked before the first module changes.
    family = family_of(model)
    attention_names = family.attention_names(model) if config.binarize_attention else []
    # BiT's ReLU goes where the FFN output linear is binarized (its input quantized unsigned); FFNs left
    # in full precision keep the checkpoint's activation.
    post_relu = ffn_output_names(model) & set(linear_names) if config.ffn_activation == "relu" else set()
    if config.aux_rank is not None:
        # The low-rank branch is cut from each weight's SVD: its rank cannot exceed the smaller side.
        smallest = min(min(linear.in_features, linear.out_features) for linear in map(model.get_submodule, linear_names))
        if config.aux_rank > smallest:
            raise ValueError(f"SurgeConfig.aux_rank={config.aux_rank} is invalid for this model; allowed values: None "
                             f"(full rank) or an integer from 1 to {smallest} (the smallest side of a binarized linear)")
    if post_relu:
        set_ffn_activation(model, nn.ReLU(), only_before=post_relu)
    for name in linear_names:
        old = model.get_submodule(name)
        with torch.device("meta"):
            new = SurgeLinear.from_config(config, old.in_features, old.out_features, bias=old.bias is not None,
                                          dtype=old.weight.dtype, input_signed=name not in post_relu)
        model.set_submodule(name, _materialize_like(old, new))

    if config.binarize_attention:
        register_attention()
        text_config = model.config.get_text_config()  # a PreTrainedModel's: binarize and from_pretrained check
        num_heads = text_config.num_attention_heads
        head_dim = text_config.hidden_size // num_heads
        for name in attention_names:
            attention = model.get_submodule(name)
            if not selected(attention, name):
                setattr(attention, FULL_PRECISION_ATTENTION, True)  # one implementation for all layers: this one stays FP
                continue
            device = next(attention.parameters()).device
            compensator = config.estimator if config.compensate_attention else None
            attention.surge_attention = AttentionQuantizers(
                num_heads, head_dim, config.activation_bits, config.binary_estimator, compensator=compensator, eta=config.eta,
                learn_probability_shift=config.attention_probability_shift == "learned",
                probability_scale=config.attention_probability_scale).to(device).train(attention.training)
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)  # Transformers' hook; reaches every sub-config

    if config.embedding_bits == 1:
        name = _word_embedding_name(model)
        if name is None:
            raise ValueError("SurgeConfig.embedding_bits=1 but the model has no word embedding (get_input_embeddings)")
        if not selected(model.get_submodule(name), name):
            matching = [pattern for pattern in skip if not should_convert_module(name, [pattern])]
            raise ValueError(f"SurgeConfig.embedding_bits=1 but the word embedding {name!r} is left out by "
                             + (f"modules_to_not_convert entries {matching}" if matching else "the given filter_fn")
                             + "; set embedding_bits=32 to keep it in full precision")
        old = model.get_submodule(name)
        with torch.device("meta"):
            new = SurgeEmbedding(old.num_embeddings, old.embedding_dim, padding_idx=old.padding_idx, dtype=old.weight.dtype,
                                 weight_scale_gradient=config.weight_scale_gradient)
        model.set_submodule(name, _materialize_like(old, new))
    return model


def reset_surge_state(model: nn.Module) -> None:
    """Fresh quantization of pretrained weights: aux weights := latent weights, quantizers un-calibrated."""
    for module in model.modules():
        if isinstance(module, SurgeLinear):
            module.reset_surge_state()
        elif isinstance(module, AttentionQuantizers):
            module.reset_parameters()


def set_training_progress(model: nn.Module, progress: float) -> None:
    """Tell progress-driven surrogates (EDE) how far training is: 0 at the start, 1 at the end."""
    for module in model.modules():
        if isinstance(module, ActivationQuantizer) and isinstance(module.surrogate, ProgressDriven):
            module.surrogate.set_progress(progress)


def surge_linears(model: nn.Module) -> dict[str, SurgeLinear]:
    """The model's SurgeLinear modules by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SurgeLinear)}
