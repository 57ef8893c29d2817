"""Record the real-valued Q/K/V projections of an encoder for attention distillation.

Forward hooks on the query/key/value linears that the model's family names (`surge_nlp.families`:
`attention.self.query|key|value` in BERT, RoBERTa, ELECTRA; `attention.q_lin|k_lin|v_lin` in
DistilBERT; `query_proj|key_proj|value_proj` in DeBERTa; ModernBERT's fused `attn.Wqkv`, split in
three) keep their outputs: for a SURGE model these are the SurgeLinear outputs, before the attention
quantizers binarize them, which is what BiBERT's direction matching compares.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from surge_nlp.distill.projections import ProjectionRecorder
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100))
    >>> with ProjectionRecorder(model) as recorder:
    ...     _ = model(input_ids=torch.randint(0, 100, (1, 5)))
    ...     layers = recorder.layers()
    >>> len(layers), [tuple(p.shape) for p in layers[0]]
    (2, [(1, 5, 32), (1, 5, 32), (1, 5, 32)])
"""

from __future__ import annotations

import torch
from torch import nn

from ..families import family_of, supported_model_types

def projection_modules(model: nn.Module) -> dict[tuple[int, int], nn.Module]:
    """The Q/K/V linears by (layer index, role) with role 0 = query, 1 = key, 2 = value; a fused QKV
    linear is listed under role 0 and split at recording."""
    return {(layer, role): module for layer, modules in family_of(model).projection_modules(model).items()
            for role, module in enumerate(modules)}


class ProjectionRecorder:
    """Keeps the latest output of every Q/K/V projection while active (a context manager)."""

    def __init__(self, model: nn.Module) -> None:
        family = family_of(model)
        self._modules = projection_modules(model)
        self._fused = len(family.projections) == 1  # one QKV linear per layer, split in three
        num_layers = len({layer for layer, _ in self._modules})
        if num_layers == 0 or sorted(layer for layer, _ in self._modules) != sorted(
                layer for layer in range(num_layers) for _ in family.projections):
            raise ValueError(
                f"{type(model).__name__} has no complete query/key/value projections where its family "
                f"({family.name!r}) keeps them ({', '.join(f'{family.layers}.N.{p}' for p in family.projections)}); "
                f"attention distillation supports the model types {', '.join(supported_model_types())}"
            )
        self.num_layers = num_layers
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "ProjectionRecorder":
        for key, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(key)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def _hook(self, key: tuple[int, int]):
        def keep_output(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if self._fused:  # [..., 3 * hidden] laid out as (q, k, v), as the attention module reads it
                for role, part in enumerate(output.chunk(3, dim=-1)):
                    self._outputs[(key[0], role)] = part
            else:
                self._outputs[key] = output
        return keep_output

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(query, key, value) per layer from the latest forward; clears the record."""
        if len(self._outputs) != 3 * self.num_layers:
            raise RuntimeError("ProjectionRecorder.layers() needs one forward pass of the model while recording")
        layers = [tuple(self._outputs[(layer, role)] for role in range(3)) for layer in range(self.num_layers)]
        self._outputs.clear()
        return layers
