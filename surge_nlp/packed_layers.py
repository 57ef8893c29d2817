"""The packed forms of the binarized layers: `PackedSurgeLinear` and `PackedSurgeEmbedding`.

What a packed checkpoint loads into: 1-bit weights 8 per byte plus one scale per row, no latent or
auxiliary copy. `PackedSurgeLinear` is also the one deployed layer: `use_kernels()` (what
`surge_nlp.deploy` calls) moves its forward onto the compiled popcount kernels, its state dict
unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .binarizers import require_calibrated, weight_signs_and_scales
from .kernels import ops
from .layers import KERNEL_ENGINES, SIMULATED, OneBitLinearBits, SurgeEmbedding, SurgeLinear, _input_quantizer, exact_binary_linear, exact_inference
from .packing import pack_signs, packed_length, unpack_binary_weight


KERNEL_INPUT_BITS = (1, 2, 4)  # the kernels' inputs: 1 bit (XOR/AND), 2 and 4 bits (bit-serial)
BIT_SERIAL_ENGINE = "bit-serial-popcount"


class PackedSurgeLinear(OneBitLinearBits, nn.Linear):
    """The deployed form of `SurgeLinear`: 1-bit weights packed 8 per byte, no latent or auxiliary copy.

    State: `weight` (uint8 buffer `[out, ceil(in / 8)]`, see `surge_nlp.packing`), `weight_scale`
    (per-output-row alpha), `bias`, and the `input_quantizer`'s learned scale/shift. The packed
    weight keeps the name `weight` so that a plain (non-SURGE) model refuses to load it (size
    mismatch) instead of silently running unquantized. Its forward equals `SurgeLinear`'s eval forward.
    It is an `nn.Linear` (features, bias, forward signature) so that PEFT can put LoRA adapters on it;
    the packed weight itself is frozen (a buffer), and merging adapters into it is not possible.

    Example:
        >>> import torch
        >>> from surge_nlp import PackedSurgeLinear, SurgeConfig, SurgeLinear
        >>> layer = SurgeLinear.from_config(SurgeConfig(), in_features=16, out_features=4).eval()
        >>> packed = PackedSurgeLinear.from_surge_linear(layer)
        >>> packed.weight.dtype, tuple(packed.weight.shape)
        (torch.uint8, (4, 2))
        >>> x = torch.randn(3, 16)
        >>> bool(torch.equal(packed(x), layer(x)))
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        activation_bits: int = 1,
        estimator: str = "surge",
        base_estimator: str = "clipped_ste",
        input_signed: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # nn.Linear's latent weight is only built on the meta device, then replaced by the packed buffer.
        super().__init__(in_features, out_features, bias=bias, device="meta", dtype=dtype)
        del self.weight
        self.register_buffer("weight", torch.zeros(out_features, packed_length(in_features), dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        # The surrogate only matters for training; it is rebuilt so the quantizer is the same module type.
        self.input_quantizer = _input_quantizer(activation_bits, estimator, base_estimator, in_features, device, dtype,
                                                signed=input_signed)

    @classmethod
    @torch.no_grad()
    def from_surge_linear(cls, layer: SurgeLinear) -> "PackedSurgeLinear":
        """Pack a trained `SurgeLinear` (its latent weight, bias and input quantizer state)."""
        packed = cls(layer.in_features, layer.out_features, layer.bias is not None, activation_bits=32,
                     device=layer.weight.device, dtype=layer.weight.dtype)
        # The same quantizer (scale, shift, calibration flag and surrogate), detached from the training model.
        packed.input_quantizer = copy.deepcopy(layer.input_quantizer)
        signs, scales = weight_signs_and_scales(layer.weight)
        packed.weight = pack_signs(signs)
        packed.weight_scale = scales.detach().clone()
        if layer.bias is not None:
            packed.bias.data = layer.bias.detach().clone()
        return packed.train(layer.training)  # the same mode: eval mode is what selects the exact inference path

    # engine: SIMULATED until use_kernels() sets the kernel this layer runs on
    def reset_parameters(self) -> None:
        """Nothing to initialise: the packed weights come from a trained SurgeLinear or a checkpoint."""

    def binary_weight(self) -> torch.Tensor:
        """The dense `alpha_row * sign` weight the layer multiplies with."""
        return unpack_binary_weight(self.weight, self.weight_scale, self.in_features, self.weight_scale.dtype)

    @torch.no_grad()
    def use_kernels(self) -> "PackedSurgeLinear":
        """Run the forward on the compiled popcount kernels (inference); returns the layer.

        A signed 1-bit input ({-alpha, alpha}) runs on XOR/popcount,
        `y = alpha_x * alpha_w[o] * (K - 2 popcount(x_bits ^ w_bits)) + bias[o]`; an unsigned one
        ({0, alpha}, BiT's post-ReLU FFN input) on AND/popcount,
        `y = alpha_x * alpha_w[o] * (2 popcount(x_bits & w_bits) - popcount(x_bits)) + bias[o]`;
        2- and 4-bit inputs on the bit-serial AND/popcount kernel: the levels `-Qn..Qp` as codes
        `level + Qn` of b bit-planes, `dot = sum_p 2^p (2 popcount(x_p & w) - popcount(x_p)) - Qn (2 popcount(w) - K)`.
        The integer dot product is exact, then scaled as the simulated path scales it, so both give
        the same floats. The state dict stays the packed checkpoint's (the kernels' layout of the
        weights and the quantizer's constants are copies outside it, refreshed when a state dict is
        loaded), so `save_pretrained` of a deployed model writes a loadable checkpoint. Raises
        ValueError for an input the kernels cannot run (32 or 8 bits) or an uncalibrated quantizer,
        RuntimeError when the kernels are unavailable. Inference only: the layer is put in eval mode,
        and its kernel forward (which computes no gradient) refuses training mode.
        """
        quantizer = self.input_quantizer
        if quantizer is None or quantizer.bits not in KERNEL_INPUT_BITS:
            raise ValueError("the popcount kernels need 1-, 2- or 4-bit inputs; this layer has "
                             f"activation_bits={self.activation_bits}")
        require_calibrated(quantizer, "the layer")
        if not ops.available():
            raise RuntimeError(f"surge_nlp binary kernels unavailable: {ops.unavailable_reason()}")
        self._snapshot_for_kernels()
        if not getattr(self, "_snapshot_on_load", False):  # a state dict loaded later refreshes the copies
            self._snapshot_on_load = True
            self.register_load_state_dict_post_hook(_refresh_kernel_snapshot)
        self.engine = KERNEL_ENGINES[quantizer.signed] if quantizer.bits == 1 else BIT_SERIAL_ENGINE
        return self.eval()  # inference only: the kernel forward refuses training mode

    @torch.no_grad()
    def _snapshot_for_kernels(self) -> None:
        """What every kernel forward reads, bound once (`ops.LinearKernel`): the weights in the kernels'
        panel layout, the quantizer's alpha and shift, the row scales and bias as float32."""
        quantizer = self.input_quantizer
        self.kernel = ops.LinearKernel(
            ops.weight_panels(ops.bytes_to_words(self.weight, self.in_features)), self.in_features,
            float(quantizer.effective_scale()), quantizer.beta.detach().float().reshape(self.in_features).contiguous(),
            quantizer.bits, quantizer.signed, quantizer.q_neg, quantizer.q_pos,
            self.weight_scale.detach().float().contiguous(),
            None if self.bias is None else self.bias.detach().float().contiguous())

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            # The kernels compute no gradient: earlier layers (or adapters) would silently get none.
            raise RuntimeError("a layer on the binary kernels is inference only (it computes no gradient) and the model "
                               "is in training mode; call model.eval(), or train before surge_nlp.deploy")
        out = self.kernel(x.reshape(-1, self.in_features).float())
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.engine != SIMULATED:
            return self._kernel_forward(x)
        if self.input_quantizer is not None and exact_inference(self):  # the kernels' arithmetic, in torch
            signs = unpack_binary_weight(self.weight, torch.ones_like(self.weight_scale), self.in_features, torch.float32)
            out = exact_binary_linear(self.input_quantizer.unit_levels(x), signs, self.input_quantizer.effective_scale(),
                                      self.weight_scale, self.bias)
            return out.to(x.dtype)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.binary_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight_bits=1 (packed), activation_bits={self.activation_bits}, engine={self.engine}")


def _refresh_kernel_snapshot(module: PackedSurgeLinear, incompatible_keys) -> None:
    """Load-state-dict hook of a layer on the kernels (a module-level function: a deployed model pickles)."""
    module._snapshot_for_kernels()


class PackedSurgeEmbedding(nn.Module):
    """The deployed form of `SurgeEmbedding`: rows packed 8 signs per byte plus one scale per row.

    Example:
        >>> import torch
        >>> from surge_nlp import PackedSurgeEmbedding, SurgeEmbedding
        >>> embedding = SurgeEmbedding(10, 16)
        >>> packed = PackedSurgeEmbedding.from_surge_embedding(embedding)
        >>> ids = torch.tensor([[1, 2, 9]])
        >>> bool(torch.equal(packed(ids), embedding(ids)))
        True
    """

    weight_bits = 1
    input_bits = 32
    engine = SIMULATED  # a gather of packed rows, no product (use_kernels only makes the gather faster)
    gather_kernel = False

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.register_buffer("weight", torch.zeros(num_embeddings, packed_length(embedding_dim), dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, device=device, dtype=dtype))

    @classmethod
    @torch.no_grad()
    def from_surge_embedding(cls, embedding: SurgeEmbedding) -> "PackedSurgeEmbedding":
        packed = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                     device=embedding.weight.device, dtype=embedding.weight.dtype)
        signs, scales = weight_signs_and_scales(embedding.weight)
        packed.weight = pack_signs(signs)
        packed.weight_scale = scales.detach().clone()
        return packed

    def use_kernels(self) -> "PackedSurgeEmbedding":
        """Gather the looked-up rows with the compiled kernels (`ops.gather_signs`: the same floats,
        without the intermediate bool rows); returns the embedding."""
        if not ops.available():
            raise RuntimeError(f"surge_nlp binary kernels unavailable: {ops.unavailable_reason()}")
        self.gather_kernel = True
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.gather_kernel and self.weight_scale.dtype == torch.float32 and self.weight.is_contiguous():
            return ops.gather_signs(self.weight, input_ids, self.weight_scale.contiguous(), self.embedding_dim)
        return unpack_binary_weight(self.weight[input_ids], self.weight_scale[input_ids], self.embedding_dim, self.weight_scale.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight_bits=1 (packed)"

    @property
    def binary_shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim
