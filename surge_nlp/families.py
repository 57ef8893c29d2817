"""Where each model family keeps its feed-forward block: data, one entry per family.

`SurgeConfig(ffn_activation="relu")` (BiT's FFN) needs two places in every encoder layer: the
activation module between the FFN linears, replaced by ReLU, and the FFN output linear, whose input
is then quantized unsigned. A family is one `FfnLayout` here, keyed by `config.model_type`;
families without an entry that follow BERT's layout (`intermediate.intermediate_act_fn`,
`output.dense`) work as BERT does, others raise an error that names the model type.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100))
    >>> [(layer, layout.output) for layer, layout in ffn_layouts(model)]
    [('encoder.layer.0', 'output.dense'), ('encoder.layer.1', 'output.dense')]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FfnLayout:
    """Paths inside one encoder layer: the FFN activation module and the FFN output linear."""

    activation: str
    output: str

    def fits(self, layer: nn.Module) -> bool:
        return _has(layer, self.activation) and isinstance(_get(layer, self.output), nn.Linear)


BERT_FFN = FfnLayout(activation="intermediate.intermediate_act_fn", output="output.dense")
FFN_LAYOUTS: dict[str, FfnLayout] = {
    "bert": BERT_FFN,
    "roberta": BERT_FFN,
    "xlm-roberta": BERT_FFN,
    "camembert": BERT_FFN,
    "electra": BERT_FFN,
    "distilbert": FfnLayout(activation="ffn.activation", output="ffn.lin2"),
}
ENCODER_LAYER_MODULE = re.compile(r"(?:^|\.)(?:encoder|transformer)\.layer\.\d+$")


def _get(module: nn.Module, path: str) -> object | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _has(module: nn.Module, path: str) -> bool:
    return _get(module, path) is not None


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    return getattr(text_config, "model_type", "") or ""


def ffn_layouts(model: nn.Module) -> list[tuple[str, FfnLayout]]:
    """(qualified layer name, its FFN layout) for every encoder layer; ValueError for an unknown layout."""
    family = model_type(model)
    layout = FFN_LAYOUTS.get(family, BERT_FFN)
    found = []
    for name, layer in model.named_modules():
        if not ENCODER_LAYER_MODULE.search(name):
            continue
        if not layout.fits(layer):
            raise ValueError(
                f"SurgeConfig.ffn_activation='relu' needs to know where model type {family!r} keeps its FFN "
                f"activation and output linear ({name} has no {layout.activation!r} / {layout.output!r}); "
                f"supported model types: {', '.join(sorted(FFN_LAYOUTS))}, or use ffn_activation='gelu'"
            )
        found.append((name, layout))
    return found


def ffn_output_names(model: nn.Module) -> set[str]:
    """Qualified names of the FFN output linears (the linears after the FFN activation)."""
    return {f"{layer}.{layout.output}" for layer, layout in ffn_layouts(model)}


def set_ffn_activation(model: nn.Module, activation: nn.Module) -> None:
    """Put a fresh copy of `activation` (a parameter-free module) in every encoder layer's FFN."""
    for layer_name, layout in ffn_layouts(model):
        parent_path, _, attribute = layout.activation.rpartition(".")
        parent = model.get_submodule(f"{layer_name}.{parent_path}" if parent_path else layer_name)
        setattr(parent, attribute, type(activation)())
