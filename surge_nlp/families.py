"""Model families as data: where each encoder family keeps what SURGE binarizes, one entry per family.

A `Family` says, for one set of `config.model_type`s: the layer stack (`encoder.layer` for BERT,
`layers` for ModernBERT), the self-attention module inside a layer and whether it runs through
Transformers' attention interface (what binarized attention plugs into), the query/key/value
linears (three, or one fused linear split in three), the FFN activation module and the FFN output
linear whose input is post-activation (unsigned 1-bit under `ffn_activation="relu"`; None where
the FFN is gated, so that input has both signs). Integration (which linears and attention modules
are converted), the ReLU FFN, the Q/K/V recorder of attention distillation and the trainer's
per-layer statistics all read it. Adding a family is one entry in `FAMILIES` plus its test
(tests/test_families.py). A model type without an entry is treated as BERT-shaped.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100))
    >>> family = family_of(model)
    >>> family.name, [name for name, _ in family.layers_of(model)]
    ('bert', ['encoder.layer.0', 'encoder.layer.1'])
    >>> family.layer_index("bert.encoder.layer.1.attention.self.query")
    1
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """One encoder family; every path below a layer is relative to that layer."""

    name: str
    model_types: tuple[str, ...]
    layers: str                          # the layer stack: its modules are `<layers>.<N>`
    attention: str                       # the self-attention module
    projections: tuple[str, ...]         # the Q, K, V linears; one path: a fused QKV linear, split in three
    ffn_activation: str | None           # the activation module between the FFN linears
    ffn_output: str | None               # the FFN output linear, when its input is the activation's output
    attention_interface: bool = True     # attention dispatches through ALL_ATTENTION_FUNCTIONS

    @property
    def _layer_pattern(self) -> re.Pattern:
        return re.compile(rf"(?:^|\.){re.escape(self.layers)}\.(\d+)(?:\.|$)")

    def layer_index(self, name: str) -> int | None:
        """The encoder layer a qualified module name lies in (None: outside the layer stack)."""
        match = self._layer_pattern.search(name)
        return int(match[1]) if match else None

    def layers_of(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(qualified name, module) of every encoder layer, in order."""
        pattern = re.compile(rf"(?:^|\.){re.escape(self.layers)}\.\d+$")
        return [(name, module) for name, module in model.named_modules() if pattern.search(name)]

    def linear_names(self, model: nn.Module) -> list[str]:
        """Qualified names of every linear inside the layer stack (what SURGE binarizes)."""
        return [name for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and self._layer_pattern.search(name)]

    def attention_names(self, model: nn.Module) -> list[str]:
        """Qualified names of the layers' self-attention modules (binarized attention); ValueError where
        the family's attention does not run through Transformers' attention interface."""
        if not self.attention_interface:
            raise ValueError(
                f"SurgeConfig.binarize_attention=True is not available for model type {model_type(model) or self.name!r}: its attention "
                f"({self.attention}) computes its own products instead of Transformers' attention interface; "
                "use binarize_attention=False (its linears still binarize)"
            )
        return [f"{name}.{self.attention}" for name, layer in self.layers_of(model) if _get(layer, self.attention) is not None]

    def projection_modules(self, model: nn.Module) -> dict[int, tuple[nn.Module, ...]]:
        """Per layer index, its Q/K/V linear(s) (three, or one fused)."""
        found = {}
        for name, layer in self.layers_of(model):
            modules = tuple(_get(layer, path) for path in self.projections)
            if all(isinstance(m, nn.Module) for m in modules):
                found[self.layer_index(name)] = modules
        return found

    def ffn_parts(self, model: nn.Module) -> list[tuple[str, str, str]]:
        """(layer name, activation path, output path) per layer, for the ReLU FFN; ValueError where the
        family has no post-activation FFN input or a layer lacks the parts."""
        if self.ffn_activation is None or self.ffn_output is None:
            raise ValueError(
                f"SurgeConfig.ffn_activation='relu' is not available for model type {model_type(model) or self.name!r}: its FFN output "
                "linear does not take the activation's output alone (a gated FFN), so that input is not unsigned; "
                "use ffn_activation='gelu'"
            )
        parts = []
        for name, layer in self.layers_of(model):
            if _get(layer, self.ffn_activation) is None or not isinstance(_get(layer, self.ffn_output), nn.Linear):
                raise ValueError(
                    f"SurgeConfig.ffn_activation='relu' needs to know where model type {model_type(model) or self.name!r} keeps its FFN "
                    f"activation and output linear ({name} has no {self.ffn_activation!r} / {self.ffn_output!r}); "
                    f"supported model types: {', '.join(supported_model_types())}, or use ffn_activation='gelu'"
                )
            parts.append((name, self.ffn_activation, self.ffn_output))
        return parts


_BERT_LIKE = dict(layers="encoder.layer", attention="attention.self",
                  projections=("attention.self.query", "attention.self.key", "attention.self.value"),
                  ffn_activation="intermediate.intermediate_act_fn", ffn_output="output.dense")

FAMILIES: tuple[Family, ...] = (
    Family("bert", ("bert",), **_BERT_LIKE),
    Family("roberta", ("roberta", "camembert"), **_BERT_LIKE),
    Family("xlm-roberta", ("xlm-roberta",), **_BERT_LIKE),
    Family("electra", ("electra",), **_BERT_LIKE),
    Family("distilbert", ("distilbert",), layers="transformer.layer", attention="attention",
           projections=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
           ffn_activation="ffn.activation", ffn_output="ffn.lin2"),
    # Disentangled attention: its own score products (content and relative position), so no binarized
    # attention; the linears (query_proj/key_proj/value_proj, the position projections) binarize.
    Family("deberta-v2", ("deberta-v2",), layers="encoder.layer", attention="attention.self",
           projections=("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"),
           ffn_activation="intermediate.intermediate_act_fn", ffn_output="output.dense", attention_interface=False),
    # Fused Wqkv, rotary positions, local/global attention (the mask carries the window), a GLU FFN:
    # Wo takes act(input) * gate, both signs, so BiT's unsigned FFN input does not apply.
    Family("modernbert", ("modernbert",), layers="layers", attention="attn", projections=("attn.Wqkv",),
           ffn_activation=None, ffn_output=None),
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
BERT = _BY_MODEL_TYPE["bert"]


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    return getattr(text_config, "model_type", "") or ""


def family_of(model: nn.Module) -> Family:
    """The model's family by `config.model_type`; a type without an entry is taken as BERT-shaped."""
    return _BY_MODEL_TYPE.get(model_type(model), BERT)


def layer_index(name: str) -> int | None:
    """The encoder layer of a qualified module name, in any registered family's layer stack."""
    for family in FAMILIES:
        index = family.layer_index(name)
        if index is not None:
            return index
    return None


def ffn_output_names(model: nn.Module) -> set[str]:
    """Qualified names of the FFN output linears (the linears after the FFN activation)."""
    return {f"{layer}.{output}" for layer, _, output in family_of(model).ffn_parts(model)}


def set_ffn_activation(model: nn.Module, activation: nn.Module, only_before: set[str] | None = None) -> None:
    """Put a fresh copy of `activation` (a parameter-free module) in every encoder layer's FFN, or
    only in the FFNs whose output linear is named in `only_before`."""
    for layer_name, path, output in family_of(model).ffn_parts(model):
        if only_before is not None and f"{layer_name}.{output}" not in only_before:
            continue
        parent_path, _, attribute = path.rpartition(".")
        parent = model.get_submodule(f"{layer_name}.{parent_path}" if parent_path else layer_name)
        setattr(parent, attribute, type(activation)().train(parent.training))


def _get(module: nn.Module, path: str) -> object | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module
