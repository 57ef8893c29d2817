"""SURGE monitoring: what the gradient compensators did in the last backward, per encoder layer.

Read by the trainer at each logged step (and by the plots): for every compensated `SurgeLinear`,
its AGS lambda and the cosine between the binary and auxiliary gradients, summarised per layer;
with `compensate_attention`, the same for the attention products' operands. Layers are found
through the model family registry (`surge_nlp.families.layer_index`).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from .attention import AttentionQuantizers
from .families import layer_index
from .integration import surge_linears


def lambda_statistics(model: nn.Module) -> dict[str, float]:
    """DPGC/SURGE monitoring of the latest backward: lambda per encoder layer (mean, min, max over its
    SurgeLinears) and overall mean, and the cosine between the binary and auxiliary input gradients
    ("alignment/layer_<i>/mean", "alignment/mean"); with `compensate_attention`, the same for the
    attention products' operands ("attention_lambda/layer_<i>/<operand>", "attention_alignment/...").
    Empty for a model without compensators."""
    stats = _attention_compensation_statistics(model)
    lambdas: dict[int, list[float]] = {}
    alignments: dict[int, list[float]] = {}
    for name, linear in surge_linears(model).items():
        layer = layer_index(name)
        value = linear.last_lambda  # a host sync: read once
        if layer is None or value is None:
            continue
        lambdas.setdefault(layer, []).append(value)
        alignments.setdefault(layer, []).append(linear.last_alignment)
    for layer, values in sorted(lambdas.items()):
        stats[f"lambda/layer_{layer}/mean"] = float(np.mean(values))
        stats[f"lambda/layer_{layer}/min"] = float(np.min(values))
        stats[f"lambda/layer_{layer}/max"] = float(np.max(values))
        stats[f"alignment/layer_{layer}/mean"] = float(np.mean(alignments[layer]))
    if lambdas:
        stats["lambda/mean"] = float(np.mean([v for values in lambdas.values() for v in values]))
        stats["alignment/mean"] = float(np.mean([v for values in alignments.values() for v in values]))
    return stats


def _attention_compensation_statistics(model: nn.Module) -> dict[str, float]:
    stats = {}
    for name, module in model.named_modules():
        layer = layer_index(name)
        if not isinstance(module, AttentionQuantizers) or module.compensators is None or layer is None:
            continue
        for operand, compensator in module.compensators.items():
            value = compensator.last_lambda
            if value is not None:
                stats[f"attention_lambda/layer_{layer}/{operand}"] = value
                stats[f"attention_alignment/layer_{layer}/{operand}"] = compensator.last_alignment
    return stats
