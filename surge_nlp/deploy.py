"""`deploy(model)`: the fast inference form of a SURGE model, on bit-packed operands and popcount kernels.

Every binary x binary product runs on the compiled kernels of `surge_nlp.kernels`:
- binarized linears with 1-bit inputs run as the one deployed layer, `PackedSurgeLinear` with its
  kernel engine (`use_kernels`): `y = alpha_x * alpha_w[o] * (K - 2 popcount(x_bits ^ w_bits)) + bias[o]`;
  an unsigned 1-bit input (BiT's post-ReLU FFN output, levels {0, alpha_x}) runs on AND/popcount,
  `y = alpha_x * alpha_w[o] * (2 popcount(x_bits & w_bits) - popcount(x_bits)) + bias[o]`;
- with `binarize_attention` at 1 bit, attention runs as "surge_binary": Q.K^T on XOR/popcount,
  the softmax in float, the 1-bit probabilities packed and P.V on AND/popcount
  (`sum_j p_j v_j = 2 popcount(p & v_pos) - popcount(p)`), scales applied afterwards;
- linears with 2- or 4-bit inputs run bit-serially ("bit-serial-popcount"): the input's LSQ levels
  `-Qn..Qp` as codes `level + Qn` in b bit-planes, `dot = sum_p 2^p (2 popcount(x_p & w) - popcount(x_p))
  - Qn (2 popcount(w) - K)`, exact, then scaled as the 1-bit products are;
- 1-bit word embeddings are kept packed (`PackedSurgeEmbedding`), unpacked only for the looked-up rows.
8-bit inputs and attention with 2/4/8-bit operands stay on the simulated path (`surge_nlp.summary`
says which layer runs where).

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
    >>> query = fast.bert.encoder.layer[0].attention.self.query
    >>> type(query).__name__, query.engine
    ('PackedSurgeLinear', 'xor-popcount')
    >>> fast(ids).logits.shape
    torch.Size([2, 2])

The deployed model computes the same floats as the simulated one, bit for bit (tests/test_kernels.py):
at inference (no gradients) the simulated layers and attention also take the integer products
first and apply the scales afterwards in the kernels' order (`dot * alpha_x * alpha_w + bias`), so
both binarize exactly the same values and a near-tie cannot flip one path and not the other.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .attention import AttentionQuantizers, surge_attention_forward
from .binarizers import ActivationQuantizer, require_calibrated
from .kernels import ops
from .layers import SIMULATED, BinarizedLayer, SurgeEmbedding, SurgeLinear
from .packed_layers import KERNEL_INPUT_BITS, PackedSurgeEmbedding, PackedSurgeLinear

BINARY_ATTENTION_IMPLEMENTATION = "surge_binary"


def _runs_on_kernels(quantizer: ActivationQuantizer | None) -> bool:
    """1-bit inputs, signed ({-alpha, alpha}: XOR kernel) or unsigned ({0, alpha}: AND kernel), and
    2- or 4-bit inputs (bit-serial AND kernel)."""
    return quantizer is not None and quantizer.bits in KERNEL_INPUT_BITS


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
    alpha_q, alpha_k, alpha_v, alpha_p = getattr(quantizers, "kernel_scales", None) or _scales(quantizers)
    q_bits = ops.pack_signs(query, q_quant.beta.detach(), alpha_q)
    k_bits = ops.pack_signs(key, k_quant.beta.detach(), alpha_k)
    mask = None if attention_mask is None else attention_mask.float()
    # A mask whose rows are all alike (padding only) is the epilogue's per-sequence bias over the keys:
    # dot * scale + mask, the same floats as `scores + mask`, without a second pass over the scores.
    per_key = (mask is not None and mask.dim() == 4 and mask.stride(-1) == 1
               and (mask.shape[-2] == 1 or torch.equal(mask, mask[..., :1, :].expand_as(mask))))
    scores = ops.binary_matmul(q_bits, k_bits, head_dim, ops.XOR, alpha_q * alpha_k * scaling,
                               bias=mask[..., :1, :] if per_key else None)
    if mask is not None and not per_key:
        scores += mask
    probs = torch.softmax(scores, dim=-1)
    p_bits = ops.pack_levels(probs, p_quant.beta.detach(), alpha_p, 0, 1, mask)  # the unsigned 1-bit quantizer
    # V packed along the tokens: one row of bits per (head, channel).
    v_bits = ops.pack_signs(value.transpose(2, 3), v_quant.beta.detach().transpose(1, 2), alpha_v)
    output = torch.empty(batch, q_len, heads, head_dim)
    ops.binary_matmul(p_bits, v_bits, k_len, ops.AND, alpha_p * alpha_v, out=output.transpose(1, 2))
    return output, None


def _scales(quantizers: AttentionQuantizers) -> tuple[float, float, float, float]:
    return tuple(float(getattr(quantizers, part).effective_scale()) for part in ("query", "key", "value", "probs"))


def _bind_scales(quantizers: AttentionQuantizers) -> None:
    """At deploy: the four quantizers' scales as Python floats, read once (each forward would otherwise
    convert four tensors); refreshed when a state dict is loaded."""
    quantizers.kernel_scales = _scales(quantizers)
    if not getattr(quantizers, "_scales_on_load", False):
        quantizers._scales_on_load = True
        quantizers.register_load_state_dict_post_hook(_rebind_scales)


def _rebind_scales(quantizers: AttentionQuantizers, incompatible_keys) -> None:
    """Load-state-dict hook (a module-level function: a deployed model pickles)."""
    _bind_scales(quantizers)


def register_binary_attention() -> None:
    """Make "surge_binary" a valid `attn_implementation` (idempotent)."""
    AttentionInterface.register(BINARY_ATTENTION_IMPLEMENTATION, binary_attention_forward)
    AttentionMaskInterface.register(BINARY_ATTENTION_IMPLEMENTATION, eager_mask)


def runs_on_binary_kernels(model: nn.Module, module: nn.Module) -> bool:
    """Whether `module` (a layer or attention quantizer set of `model`) runs on the binary kernels."""
    if isinstance(module, BinarizedLayer):
        return module.engine != SIMULATED
    if isinstance(module, AttentionQuantizers):
        # The Transformers model holding it decides (`model` itself, or one inside a plain wrapper).
        owner = next((m for m in model.modules() if isinstance(m, PreTrainedModel) and any(x is module for x in m.modules())),
                     model)
        config = getattr(owner, "config", None)
        return getattr(config, "_attn_implementation", None) == BINARY_ATTENTION_IMPLEMENTATION and _attention_is_binary(module)
    return False


def _attention_owners(model: nn.Module, binary_attention: dict[str, AttentionQuantizers]) -> list[PreTrainedModel]:
    """The Transformers models whose attention implementation must switch: `model` itself, or in a
    plain `nn.Module` wrapper the outermost `PreTrainedModel`s holding binary attention. ValueError
    when some binary attention lies outside every `PreTrainedModel` (nothing could switch it)."""
    if not binary_attention:
        return []
    if isinstance(model, PreTrainedModel):
        return [model]
    owners: dict[str, PreTrainedModel] = {}
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and name and not any(name.startswith(f"{o}.") for o in owners):
            owners[name] = module
    unowned = [name for name in binary_attention if not any(name.startswith(f"{o}.") for o in owners)]
    if unowned:
        raise ValueError(f"the binary attention at {unowned[0]} is not inside a Transformers model (PreTrainedModel), "
                         "whose attention implementation deploy switches; deploy the PreTrainedModel itself")
    return [module for o, module in owners.items() if any(name.startswith(f"{o}.") for name in binary_attention)]


def _model_device(model: nn.Module) -> torch.device | None:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return None if tensor is None else tensor.device


@torch.no_grad()
def deploy(model: nn.Module) -> nn.Module:
    """Switch a SURGE model (training or packed form) to the binary kernels, in place; returns it in eval mode.

    Packs `SurgeLinear`s with 1-, 2- or 4-bit inputs (dropping the latent and auxiliary weights) and
    puts every such `PackedSurgeLinear` on its kernel engine; `SurgeEmbedding` becomes
    `PackedSurgeEmbedding`, and 1-bit "surge" attention "surge_binary". Layers with 8-bit inputs stay
    simulated. When the kernels cannot be
    built (no C compiler, SURGE_NLP_DISABLE_KERNELS=1) the model is returned unchanged, in eval
    mode, with a one-line RuntimeWarning. Raises ValueError, before changing anything, for an
    uncalibrated activation quantizer, a model that is not on the CPU (the kernels are CPU code:
    `model.cpu()` first), or binary attention outside any Transformers model.
    Inference only: the deployed model cannot be trained further (its kernel layers refuse training mode).

    Example: see the module docstring.
    """
    model.eval()
    if not ops.available():
        ops.notify_unavailable()
        return model
    device = _model_device(model)
    if device is not None and device.type != "cpu":
        raise ValueError(f"deploy runs the model on the CPU binary kernels, and it is on {device}: call model.cpu() first")
    # Every check first, so that a refused model is left as it was.
    linears, embeddings, binary_attention = {}, {}, {}
    for name, module in model.named_modules():
        if isinstance(module, (SurgeLinear, PackedSurgeLinear)) and _runs_on_kernels(module.input_quantizer):
            require_calibrated(module.input_quantizer, name)
            linears[name] = module
        elif isinstance(module, (SurgeEmbedding, PackedSurgeEmbedding)) and getattr(module, "max_norm", None) is None:
            embeddings[name] = module
        elif isinstance(module, AttentionQuantizers) and _attention_is_binary(module):
            for part in ("query", "key", "value", "probs"):
                require_calibrated(getattr(module, part), f"{name}.{part}")
            binary_attention[name] = module
    owners = _attention_owners(model, binary_attention)

    for name, module in linears.items():
        packed = PackedSurgeLinear.from_surge_linear(module) if isinstance(module, SurgeLinear) else module
        model.set_submodule(name, packed.use_kernels())
    for name, module in embeddings.items():
        packed = PackedSurgeEmbedding.from_surge_embedding(module) if isinstance(module, SurgeEmbedding) else module
        model.set_submodule(name, packed.use_kernels())
    for quantizers in binary_attention.values():
        _bind_scales(quantizers)
    if owners:
        register_binary_attention()
        for owner in owners:
            owner.set_attn_implementation(BINARY_ATTENTION_IMPLEMENTATION)  # Transformers' hook
    return model.eval()  # the new packed modules too
