"""`summary(model)`: a Larq-style report of bits, parameters, memory and binary MACs.

Counts what the deployed model holds: each binarized weight at 1 bit, every other parameter at
32 bits (its per-channel scales and the activation scales/shifts included). Training-only state
(DPGC auxiliary weights) is not part of the deployed model and is excluded. Binarized rows are
stored as the packed checkpoint stores them (`ceil(columns / 8)` bytes per row), so for a model
reloaded from a packed checkpoint `deployed_bytes` is the file's tensor data, less the quantizers'
one-byte `initialized` flags.

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> import surge_nlp
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
    >>> report = surge_nlp.summary(surge_nlp.binarize(model, surge_nlp.SurgeConfig()), print_fn=None)
    >>> report.totals["binarized_layers"]
    6
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

from .attention import AttentionQuantizers
from .deploy import runs_on_binary_kernels
from .layers import SIMULATED, BinarizedLayer
from .packing import packed_length

_TRAINING_ONLY = ("aux_weight", "aux_u", "aux_v")


@dataclass
class LayerSummary:
    name: str
    kind: str
    weight_bits: int
    input_bits: int
    params_1bit: int
    params_32bit: int
    memory_bytes: int
    macs_per_token: int  # per input row; a per-sequence layer (see `per_token`) runs one row per sequence
    engine: str = "simulated"  # or the kernel surge_nlp.deploy runs it on: "xor-popcount", "and-popcount", "bit-serial-popcount"
    per_token: bool = True  # False: runs once per sequence (the pooler, a sequence-classification head)


@dataclass
class ModelSummary:
    layers: list[LayerSummary]
    totals: dict

    def as_dict(self) -> dict:
        return {"layers": [asdict(layer) for layer in self.layers], "totals": dict(self.totals)}

    def __str__(self) -> str:
        return self.format(layers=True)

    def format(self, layers: bool = True) -> str:
        """The report: the per-layer table (with `layers`) and the totals."""
        header = f"{'layer':<48} {'W':>3} {'A':>3} {'1-bit params':>13} {'32-bit params':>14} {'memory KiB':>11}  engine"
        lines = [header, "-" * len(header)] if layers else []
        for layer in self.layers if layers else []:
            lines.append(
                f"{layer.name:<48} {layer.weight_bits:>3} {layer.input_bits:>3} {layer.params_1bit:>13,} "
                f"{layer.params_32bit:>14,} {layer.memory_bytes / 1024:>11.1f}  {layer.engine}"
            )
        t = self.totals
        lines += ["-" * len(header)] if layers else []
        # the share is cut, not rounded, to two decimals: 100.00% only when every MAC is binary
        lines += [
            f"binarized layers:          {t['binarized_layers']}",
            f"on binary kernels:         {t['kernel_layers']} layers, {t['kernel_attention_modules']} attention modules",
            f"1-bit parameters:          {t['params_1bit']:,}",
            f"32-bit parameters:         {t['params_32bit']:,}",
            f"deployed size:             {t['deployed_bytes'] / 2**20:.2f} MiB ({t['deployed_bytes']:,} bytes)",
            f"FP32 equivalent:           {t['fp32_bytes'] / 2**20:.2f} MiB ({t['fp32_bytes']:,} bytes)",
            f"compression ratio:         {t['compression_ratio']:.2f}x",
            f"binary MACs (seq {t['seq_len']}):     {math.floor(10000 * t['binary_mac_share']) / 100:.2f}% of {t['macs_per_sequence']:,}",
        ]
        return "\n".join(lines)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if n.rsplit(".", 1)[-1] not in _TRAINING_ONLY)


# Heads that read one vector per sequence (the first token's, or the pooler's); other heads (token
# classification, question answering, masked LM) run on every token.
_PER_SEQUENCE_HEADS = ("ForSequenceClassification", "ForMultipleChoice", "ForNextSentencePrediction")


def _runs_per_token(model: nn.Module, name: str) -> bool:
    """Whether the linear `name` runs on every token of a sequence, or once per sequence."""
    prefix = getattr(model, "base_model_prefix", "")
    base = f"{prefix}." if prefix and hasattr(model, prefix) else ""
    if name.startswith(f"{base}pooler.") or name == f"{base}pooler":
        return False
    in_head = bool(base) and not name.startswith(base)
    return not (in_head and type(model).__name__.endswith(_PER_SEQUENCE_HEADS))


def summary(model: nn.Module, seq_len: int = 128, print_fn=print) -> ModelSummary:
    """Per binarized layer and totals; printed through `print_fn` (None: silent) and returned.

    `seq_len` sets the MACs of a sequence: each encoder linear and attention matmul runs on every
    token, the pooler and a sequence-classification head once.
    """
    layers: list[LayerSummary] = []
    binarized_ids: set[int] = set()
    packed_fp32_bytes = 0  # packed weights are buffers, not parameters: count their FP32 size here
    for name, module in model.named_modules():
        if not isinstance(module, BinarizedLayer):  # the layer says its bits and engine (larq's `precision`)
            continue
        rows, columns = module.binary_shape
        ones = rows * columns
        # 32-bit: one weight scale per row, the bias, the input quantizer's alpha and beta.
        fp = rows + sum(p.numel() for p in (getattr(module, "bias", None),) if p is not None)
        quantizer = getattr(module, "input_quantizer", None)
        fp += _own_params(quantizer) if quantizer is not None else 0
        is_linear = isinstance(module, nn.Linear)  # PackedSurgeLinear is one
        layers.append(LayerSummary(name, "linear" if is_linear else "embedding", module.weight_bits, module.input_bits,
                                   ones, fp, rows * packed_length(columns) + 4 * fp, ones if is_linear else 0, module.engine,
                                   _runs_per_token(model, name)))
        if not isinstance(getattr(module, "weight", None), nn.Parameter):  # packed: a buffer, not a parameter
            packed_fp32_bytes += 4 * ones
        binarized_ids.update(id(p) for p in module.parameters())

    params_1bit = sum(layer.params_1bit for layer in layers)
    other_fp = sum(
        p.numel() for n, p in model.named_parameters() if id(p) not in binarized_ids and n.rsplit(".", 1)[-1] not in _TRAINING_ONLY
    )
    params_32bit = sum(layer.params_32bit for layer in layers) + other_fp
    deployed = sum(layer.memory_bytes for layer in layers) + 4 * other_fp
    fp32 = packed_fp32_bytes + 4 * sum(
        p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] not in _TRAINING_ONLY and "quantizer" not in n and "surge_attention" not in n
    )

    def rows(per_token: bool) -> int:  # input rows a layer processes per sequence
        return seq_len if per_token else 1

    binary_macs = sum(layer.macs_per_token * rows(layer.per_token) for layer in layers
                      if layer.kind == "linear" and layer.input_bits == 1)
    total_macs = sum(m.in_features * m.out_features * rows(_runs_per_token(model, name))
                     for name, m in model.named_modules() if isinstance(m, nn.Linear))
    attention_macs = 0
    for module in model.modules():
        if isinstance(module, AttentionQuantizers):
            num_heads, _, head_dim = module.query.beta.shape
            per_sequence = 2 * seq_len * seq_len * num_heads * head_dim  # Q.K^T and P.V
            attention_macs += per_sequence
            binary_macs += per_sequence if module.query.bits == 1 else 0
    config = getattr(model, "config", None)
    # No attention quantizers (attention not binarized): count the full-precision attention matmuls.
    if attention_macs == 0 and config is not None and hasattr(config, "get_text_config"):
        text = config.get_text_config()
        attention_macs = 2 * seq_len * seq_len * text.hidden_size * text.num_hidden_layers
    total_macs += attention_macs
    totals = {
        "binarized_layers": len(layers),
        "kernel_layers": sum(layer.engine != SIMULATED for layer in layers),
        "kernel_attention_modules": sum(
            runs_on_binary_kernels(model, m) for m in model.modules() if isinstance(m, AttentionQuantizers)
        ),
        "params_1bit": params_1bit,
        "params_32bit": params_32bit,
        "deployed_bytes": deployed,
        "fp32_bytes": fp32,
        "compression_ratio": fp32 / deployed if deployed else 1.0,
        "seq_len": seq_len,
        "macs_per_sequence": total_macs,
        "binary_mac_share": binary_macs / total_macs if total_macs else 0.0,
    }
    result = ModelSummary(layers, totals)
    if print_fn is not None:
        print_fn(str(result))
    return result
