"""`deploy(model)`: the fast inference form of a SURGE model, on bit-packed operands and popcount kernels.

Every binary x binary product runs on the compiled kernels of `surge_nlp.kernels`:
- binarized linears with 1-bit inputs (`SurgeLinear` or the packed `PackedSurgeLinear`) become
  `BinaryLinear`: `y = alpha_x * alpha_w[o] * (K - 2 popcount(x_bits ^ w_bits)) + bias[o]`; an
  unsigned 1-bit input (BiT's post-ReLU FFN output, levels {0, alpha_x}) runs on AND/popcount,
  `y = alpha_x * alpha_w[o] * (2 popcount(x_bits & w_bits) - popcount(x_bits)) + bias[o]`;
- with `binarize_attention` at 1 bit, attention runs as "surge_binary": Q.K^T on XOR/popcount,
  the softmax in float, the 1-bit probabilities packed and P.V on AND/popcount
  (`sum_j p_j v_j = 2 popcount(p & v_pos) - popcount(p)`), scales applied afterwards;
- 1-bit word embeddings are kept packed (`PackedSurgeEmbedding`), unpacked only for the looked-up rows.
Inputs with 2/4/8-bit activations stay on the simulated path (see `surge_nlp.summary`). The
result equals the simulated eval-mode model up to float rounding.

The kernels compile on first use (system C compiler, cached per user). Without a compiler, deploy
returns the model on the simulated path with a one-line RuntimeWarning.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> import surge_nlp
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
    >>> model = surge_nlp.binarize(model, surge_nlp.SurgeConfig()).eval()
    >>> ids = torch.randint(0, 100, (2, 8))
    >>> _ = model(ids)  # calibrates the activation scales
    >>> fast = surge_nlp.deploy(model)  # in place
    >>> type(fast.bert.encoder.layer[0].attention.self.query).__name__
    'BinaryLinear'
    >>> fast(ids).logits.shape
    torch.Size([2, 2])

The deployed logits equal the simulated ones up to float rounding (tests/test_kernels.py). One
caveat: a value that is exactly 0 in exact arithmetic (possible when shifts and biases are all 0,
as in a freshly initialised model) is an FP32 rounding residue of either sign in the simulated
matmul, while the kernels produce the exact 0 (+1 after the next sign); trained models do not sit
on such ties.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .attention import ATTENTION_IMPLEMENTATION, AttentionQuantizers, surge_attention_forward
from .binarizers import MIN_SCALE, ActivationQuantizer, weight_signs_and_scales
from .kernels import ops
from .layers import PackedSurgeEmbedding, PackedSurgeLinear, SurgeEmbedding, SurgeLinear

BINARY_ATTENTION_IMPLEMENTATION = "surge_binary"


def _is_binary_input(quantizer: ActivationQuantizer | None) -> bool:
    """1-bit inputs, signed ({-alpha, alpha}: XOR kernel) or unsigned ({0, alpha}: AND kernel)."""
    return quantizer is not None and quantizer.bits == 1


def _pack_unsigned(rows: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed bits of the unsigned 1-bit quantizer `round(clip((x - beta) / alpha, 0, 1))` of each row,
    computed with the simulated quantizer's own expression so that both paths take the same bits."""
    bits = ((rows - shift) / scale > 0.5).contiguous().numpy()
    as_bytes = torch.from_numpy(np.packbits(bits, axis=-1, bitorder="little"))
    return _bytes_to_words(as_bytes, rows.shape[-1])


def _check_calibrated(name: str, quantizer: ActivationQuantizer) -> None:
    if not bool(quantizer.initialized):
        raise ValueError(
            f"{name}: its activation quantizer is not calibrated yet; run at least one forward pass "
            "(or train / load a trained checkpoint) before surge_nlp.deploy"
        )


def _bytes_to_words(rows: torch.Tensor, columns: int) -> torch.Tensor:
    """uint8 rows (8 signs per byte, least significant bit first) -> int64 words of the kernels.

    On a little-endian machine the same bits read as 64-bit words are the kernels' layout, so
    this only pads each row to whole words.
    """
    if sys.byteorder != "little":
        raise RuntimeError("the binary kernels' packed layout needs a little-endian machine")
    padding = 8 * ops.words(columns) - rows.shape[-1]
    return F.pad(rows, (0, padding)).contiguous().view(torch.int64)


class BinaryLinear(nn.Module):
    """A 1-bit-weight, 1-bit-input linear running on XOR/popcount kernels (inference only).

    Buffers: `packed_weight` (int64 `[out, ceil(in / 64)]`, bit j of word w = sign of input
    64*w + j, 1 for +1), `weight_scale` (alpha_w per output), `bias`, `input_scale` (alpha_x) and
    `input_shift` (beta, per input channel). `input_signed=False`: the input is unsigned 1-bit
    ({0, alpha_x}, a post-ReLU input) and the product runs on AND/popcount. Build it with
    `from_surge_linear` or `from_packed`.
    """

    def __init__(self, in_features: int, out_features: int, packed_weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, input_scale: torch.Tensor, input_shift: torch.Tensor,
                 input_signed: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.input_signed = input_signed
        if tuple(packed_weight.shape) != (out_features, ops.words(in_features)) or packed_weight.dtype != torch.int64:
            raise ValueError(f"packed_weight must be int64 ({out_features}, {ops.words(in_features)}), got "
                             f"{packed_weight.dtype} {tuple(packed_weight.shape)}")
        self.register_buffer("packed_weight", packed_weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.register_buffer("input_scale", input_scale.detach().float().reshape(()).clone())
        self.register_buffer("input_shift", input_shift.detach().float().reshape(in_features).contiguous())

    @classmethod
    @torch.no_grad()
    def from_surge_linear(cls, layer: SurgeLinear) -> "BinaryLinear":
        """From the training form: signs and scales of the latent weight (DPGC auxiliary weight dropped)."""
        signs, scales = weight_signs_and_scales(layer.weight.detach().float())
        packed = ops.pack_signs(torch.where(signs, 1.0, -1.0), torch.zeros(layer.in_features), 1.0)
        return cls._with_quantizer(layer, packed, scales)

    @classmethod
    @torch.no_grad()
    def from_packed(cls, layer: PackedSurgeLinear) -> "BinaryLinear":
        """From the packed checkpoint form (uint8, 8 signs per byte, least significant bit first).

        On a little-endian machine the same bits read as 64-bit words are this kernel's layout,
        so the conversion only pads each row to whole words.
        """
        return cls._with_quantizer(layer, _bytes_to_words(layer.weight, layer.in_features), layer.weight_scale)

    @classmethod
    def _with_quantizer(cls, layer: nn.Module, packed: torch.Tensor, scales: torch.Tensor) -> "BinaryLinear":
        quantizer = layer.input_quantizer
        if not _is_binary_input(quantizer):
            raise ValueError(f"BinaryLinear needs 1-bit inputs; this layer has activation_bits={layer.activation_bits}")
        # The simulated quantizer's effective scale: |alpha|, at least MIN_SCALE.
        scale = quantizer.alpha.detach().abs().clamp_min(MIN_SCALE)
        return cls(layer.in_features, layer.out_features, packed, scales, layer.bias, scale, quantizer.beta,
                   input_signed=quantizer.signed)

    # The state dict is the packed checkpoint's (`PackedSurgeLinear`: uint8 `weight`, `weight_scale`,
    # `bias`, `input_quantizer.*`), so save_pretrained on a deployed model writes a loadable checkpoint.
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        as_bytes = self.packed_weight.view(torch.uint8)[:, : (self.in_features + 7) // 8]
        destination[prefix + "weight"] = as_bytes.clone()
        destination[prefix + "weight_scale"] = self.weight_scale.clone()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias.clone()
        destination[prefix + "input_quantizer.alpha"] = self.input_scale.reshape(1).clone()
        destination[prefix + "input_quantizer.beta"] = self.input_shift.clone()
        destination[prefix + "input_quantizer.initialized"] = torch.ones((), dtype=torch.bool)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        names = ["weight", "weight_scale", "input_quantizer.alpha", "input_quantizer.beta", "input_quantizer.initialized"]
        names += ["bias"] if self.bias is not None else []
        missing = [prefix + name for name in names if prefix + name not in state_dict]
        missing_keys.extend(missing)
        if missing:
            return
        rows = state_dict[prefix + "weight"]
        if rows.dtype != torch.uint8 or tuple(rows.shape) != (self.out_features, (self.in_features + 7) // 8):
            error_msgs.append(f"{prefix}weight: expected uint8 {(self.out_features, (self.in_features + 7) // 8)}, "
                              f"got {rows.dtype} {tuple(rows.shape)}")
            return
        with torch.no_grad():
            self.packed_weight.copy_(_bytes_to_words(rows, self.in_features))
            self.weight_scale.copy_(state_dict[prefix + "weight_scale"])
            if self.bias is not None:
                self.bias.copy_(state_dict[prefix + "bias"])
            self.input_scale.copy_(state_dict[prefix + "input_quantizer.alpha"].reshape(()))
            self.input_shift.copy_(state_dict[prefix + "input_quantizer.beta"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        rows = x.reshape(-1, self.in_features).float()
        alpha = float(self.input_scale)
        if self.input_signed:
            bits, mode = ops.pack_signs(rows, self.input_shift, alpha), ops.XOR
        else:
            bits, mode = _pack_unsigned(rows, self.input_shift, self.input_scale), ops.AND
        out = ops.binary_matmul(bits, self.packed_weight, self.in_features, mode, alpha,
                                self.weight_scale, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        kind = "signed, kernel=xor-popcount" if self.input_signed else "unsigned, kernel=and-popcount"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight_bits=1, activation_bits=1 ({kind})")


def _attention_is_binary(quantizers: AttentionQuantizers) -> bool:
    return all(q.bits == 1 for q in (quantizers.query, quantizers.key, quantizers.value, quantizers.probs))


def binary_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The "surge" attention on packed operands (eval mode, 1-bit quantizers); otherwise the simulated one.

    Returns `(output, None)`: the binary path does not materialise the quantized probabilities.
    """
    quantizers: AttentionQuantizers | None = getattr(module, "surge_attention", None)
    if module.training or quantizers is None or not _attention_is_binary(quantizers) or query.dtype != torch.float32:
        return surge_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    q_quant, k_quant, v_quant, p_quant = quantizers.query, quantizers.key, quantizers.value, quantizers.probs
    alpha_q, alpha_k, alpha_v, alpha_p = (float(q.alpha.detach()) for q in (q_quant, k_quant, v_quant, p_quant))
    q_bits = ops.pack_signs(query, q_quant.beta.detach(), alpha_q)
    k_bits = ops.pack_signs(key, k_quant.beta.detach(), alpha_k)
    scores = ops.binary_matmul(q_bits, k_bits, head_dim, ops.XOR, alpha_q * alpha_k * scaling)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.float()
        scores += mask
    probs = torch.softmax(scores, dim=-1)
    p_bits = ops.pack_probs(probs, float(p_quant.beta.detach()), alpha_p, mask)
    # V packed along the tokens: one row of bits per (head, channel).
    v_bits = ops.pack_signs(value.transpose(2, 3), v_quant.beta.detach().transpose(1, 2), alpha_v)
    output = torch.empty(batch, q_len, heads, head_dim)
    ops.binary_matmul(p_bits, v_bits, k_len, ops.AND, alpha_p * alpha_v, out=output.transpose(1, 2))
    return output, None


def register_binary_attention() -> None:
    """Make "surge_binary" a valid `attn_implementation` (idempotent)."""
    AttentionInterface.register(BINARY_ATTENTION_IMPLEMENTATION, binary_attention_forward)
    AttentionMaskInterface.register(BINARY_ATTENTION_IMPLEMENTATION, eager_mask)


def _set_attention_implementation(model: nn.Module, implementation: str) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == ATTENTION_IMPLEMENTATION:
            config._attn_implementation = implementation


def runs_on_binary_kernels(model: nn.Module, module: nn.Module) -> bool:
    """Whether `module` (a layer or attention quantizer set of `model`) runs on the binary kernels."""
    if isinstance(module, BinaryLinear):
        return True
    if isinstance(module, AttentionQuantizers):
        config = getattr(model, "config", None)
        return getattr(config, "_attn_implementation", None) == BINARY_ATTENTION_IMPLEMENTATION and _attention_is_binary(module)
    return False


@torch.no_grad()
def deploy(model: nn.Module) -> nn.Module:
    """Switch a SURGE model (training or packed form) to the binary kernels, in place; returns it in eval mode.

    Replaces 1-bit-input `SurgeLinear` / `PackedSurgeLinear` by `BinaryLinear` (dropping the latent
    and auxiliary weights), `SurgeEmbedding` by `PackedSurgeEmbedding`, and 1-bit "surge" attention
    by "surge_binary". Layers with 2/4/8-bit inputs stay simulated. When the kernels cannot be
    built (no C compiler, SURGE_NLP_DISABLE_KERNELS=1) the model is returned unchanged, in eval
    mode, with a one-line RuntimeWarning. Raises ValueError for an uncalibrated activation quantizer.
    Inference only: the deployed model cannot be trained further.

    Example: see the module docstring.
    """
    model.eval()
    if not ops.available():
        ops.notify_unavailable()
        return model
    replacements: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, (SurgeLinear, PackedSurgeLinear)) and _is_binary_input(module.input_quantizer):
            _check_calibrated(name, module.input_quantizer)
            make = BinaryLinear.from_surge_linear if isinstance(module, SurgeLinear) else BinaryLinear.from_packed
            replacements[name] = make(module)
        elif isinstance(module, SurgeEmbedding) and module.max_norm is None:
            replacements[name] = PackedSurgeEmbedding.from_surge_embedding(module)
        elif isinstance(module, AttentionQuantizers) and _attention_is_binary(module):
            for part in ("query", "key", "value", "probs"):
                _check_calibrated(f"{name}.{part}", getattr(module, part))
    for name, replacement in replacements.items():
        model.set_submodule(name, replacement)
    if any(isinstance(m, AttentionQuantizers) and _attention_is_binary(m) for m in model.modules()):
        register_binary_attention()
        _set_attention_implementation(model, BINARY_ATTENTION_IMPLEMENTATION)
    return model
