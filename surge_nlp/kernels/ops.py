"""Torch-facing binary kernels: bit packing and binary x binary matmuls on packed operands.

Packed operands are int64 tensors (`..., words`) holding 64 elements per word along the
reduction dimension (bit j of word w = element 64*w + j, padding bits 0). Inputs are float32 CPU
tensors with any strides; threads follow `torch.get_num_threads()`.

Example:
    >>> import torch
    >>> from surge_nlp.kernels import ops
    >>> if ops.available():
    ...     a = ops.pack_signs(torch.tensor([[1.0, -2.0, 3.0]]), torch.zeros(3), 1.0)
    ...     b = ops.pack_signs(torch.tensor([[1.0, 2.0, -3.0]]), torch.zeros(3), 1.0)
    ...     print(ops.binary_matmul(a, b, k=3).tolist())  # (+1)(+1) + (-1)(+1) + (+1)(-1)
    ... else:
    ...     print([[-1.0]])
    [[-1.0]]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

# The library's state and variant selection live in `library`; re-exported as ops' own API.
from .library import (VARIANTS, _lib, active_variant, available, notify_unavailable, reset, supported_variants,
                      unavailable_reason, use_variant)

XOR, AND = 0, 1

def bytes_to_words(rows: torch.Tensor, columns: int) -> torch.Tensor:
    """uint8 rows (8 signs per byte, least significant bit first: the packed checkpoint) -> the
    kernels' int64 words. On a little-endian machine the same bits read as 64-bit words are the
    kernels' layout, so this only pads each row to whole words."""
    if sys.byteorder != "little":
        raise RuntimeError("the binary kernels' packed layout needs a little-endian machine")
    if rows.shape[-1] != (columns + 7) // 8:
        raise ValueError(f"{columns} columns need {(columns + 7) // 8} bytes per row, got {rows.shape[-1]}")
    if columns % 8:  # the last byte's unused bits: zero, as the kernels' packed activations have them
        rows = rows.clone()
        rows[..., -1] &= (1 << (columns % 8)) - 1
    padding = 8 * words(columns) - rows.shape[-1]
    return torch.nn.functional.pad(rows, (0, padding)).contiguous().view(torch.int64)


def words(k: int) -> int:
    """64-bit words per packed row of k elements."""
    return (k + 63) // 64


def _shape_4d(t: torch.Tensor) -> tuple[int, ...]:
    if t.dim() > 4:
        raise ValueError(f"binary kernels take at most 4-D tensors, got shape {tuple(t.shape)}")
    return (1,) * (4 - t.dim()) + tuple(t.shape)


def _strides_4d(t: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of `t` broadcast to the 4-D `shape` (0 along broadcast dims), without views."""
    if t.dim() > 4:
        raise ValueError(f"binary kernels take at most 4-D tensors, got shape {tuple(t.shape)}")
    sizes, strides = (1,) * (4 - t.dim()) + tuple(t.shape), (0,) * (4 - t.dim()) + t.stride()
    if any(size not in (1, target) for size, target in zip(sizes, shape)):
        raise ValueError(f"shape {tuple(t.shape)} does not broadcast to {shape[4 - t.dim():]}")
    return tuple(stride if size == target else 0 for size, target, stride in zip(sizes, shape, strides))


def _check_allocated(status: int) -> None:
    if status != 0:
        raise MemoryError("the binary matmul could not allocate its scratch buffers (the operands' layout)")


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise TypeError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")


def _check_cpu(**tensors: torch.Tensor | None) -> None:
    """The kernels read host memory: a tensor on another device would hand C a device pointer."""
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise TypeError(f"{name} must be a CPU tensor (the binary kernels run on the CPU), got one on {t.device}")


def pack_signs(x: torch.Tensor, beta: torch.Tensor, alpha: float) -> torch.Tensor:
    """Packed bits of `sign((x - beta) / alpha)` along x's last dim (bit 1 = +1, 0 counts as +1).

    `beta` broadcasts against x. Returns int64 `(*x.shape[:-1], words(x.shape[-1]))`.
    """
    _check_float("x", x)
    _check_float("beta", beta)
    lib = _lib()
    k = x.shape[-1]
    out = torch.empty(*x.shape[:-1], words(k), dtype=torch.int64)
    shape = _shape_4d(x)
    lib.surge_pack_signs(x.data_ptr(), *shape, *_strides_4d(x, shape), beta.data_ptr(), *_strides_4d(beta, shape),
                         float(alpha), out.data_ptr(), out.shape[-1], torch.get_num_threads())
    return out


def planes_for(q_neg: int, q_pos: int) -> int:
    """Bit-planes of the codes 0..q_neg + q_pos of a quantizer with levels -q_neg..q_pos."""
    return max(1, (q_neg + q_pos).bit_length())


def pack_levels(x: torch.Tensor, beta: torch.Tensor, alpha: float, q_neg: int, q_pos: int,
                mask: torch.Tensor | None = None, mask_floor: float | None = None) -> torch.Tensor:
    """Bit-planes of the quantizer levels `round(clip((x - beta) / alpha, -q_neg, q_pos))` along x's
    last dim (torch's rounding, half to even), stored as the codes `level + q_neg`: plane p holds
    bit p. Where the additive `mask` (broadcast against x) is `<= mask_floor` the code is 0.

    `beta` broadcasts against x. Returns int64 `(*x.shape[:-1], planes * words(k))`, the planes of a
    row one after the other (`planes_for(q_neg, q_pos)` of them). The unsigned 1-bit quantizer (the
    attention probabilities) is `q_neg=0, q_pos=1`: bit = `(x - beta) / alpha > 0.5`.
    """
    _check_float("x", x)
    _check_float("beta", beta)
    lib = _lib()
    k, planes = x.shape[-1], planes_for(q_neg, q_pos)
    if planes > 8 or q_neg < 0 or q_pos < 1:
        raise ValueError(f"levels -{q_neg}..{q_pos} are invalid; allowed: up to 8 bits, q_neg >= 0, q_pos >= 1")
    out = torch.empty(*x.shape[:-1], planes * words(k), dtype=torch.int64)
    shape = _shape_4d(x)
    if mask is None:
        mask_ptr, mask_strides, floor = None, (0, 0, 0, 0), 0.0
    else:
        _check_float("mask", mask)
        mask_ptr, mask_strides = mask.data_ptr(), _strides_4d(mask, shape)
        floor = torch.finfo(torch.float32).min / 2 if mask_floor is None else mask_floor
    lib.surge_pack_levels(x.data_ptr(), *shape, *_strides_4d(x, shape), beta.data_ptr(), *_strides_4d(beta, shape),
                          mask_ptr, *mask_strides, float(floor), float(alpha), q_neg, q_pos, planes,
                          out.data_ptr(), words(k), torch.get_num_threads())
    return out


@dataclass(frozen=True)
class WeightPanels:
    """B rows laid out once for the kernels (`weight_panels`): panels of 8 rows, word w of the 8 rows
    side by side, so that each vector lane of the micro-kernels accumulates one output."""

    data: torch.Tensor  # int64 (ceil(rows / 8), words, 8), rows past `rows` zero
    rows: int

    @property
    def words(self) -> int:
        return self.data.shape[1]


def weight_panels(rows: torch.Tensor) -> WeightPanels:
    """The panel layout of packed rows (int64 `(n, words)`), for a B operand used many times (weights)."""
    if rows.dtype != torch.int64 or rows.dim() != 2 or rows.stride(-1) != 1:
        raise ValueError(f"weight_panels needs int64 (n, words) rows with unit last stride, got {rows.dtype} {tuple(rows.shape)}")
    _check_cpu(rows=rows)
    n, n_words = rows.shape
    data = torch.empty((n + 7) // 8, n_words, 8, dtype=torch.int64)
    _lib().surge_weight_panels(rows.data_ptr(), n, n_words, rows.stride(0), data.data_ptr())
    return WeightPanels(data, n)


def binary_matmul(a: torch.Tensor, b: torch.Tensor | WeightPanels, k: int, mode: int = XOR, scale: float = 1.0,
                  col_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, planes: int = 1, offset: int = 0) -> torch.Tensor:
    """`dot(a[..., m, :], b[..., n, :]) * scale * col_scale[n] + bias[n]` on packed rows.

    XOR mode (both signed, k = true reduction length): dot = k - 2 popcount(a ^ b).
    AND mode (a holds `planes` bit-planes of level codes `level + offset`, from `pack_levels`; b
    signed): dot = sum_p 2^p (2 popcount(a_p & b) - popcount(a_p)) - offset (2 popcount(b) - k);
    one plane with offset 0 is the unsigned {0, 1} input.
    a: `(*batch, m, planes * words)`, b: `(*batch, n, words)` with up to two batch dims, or the
    `WeightPanels` of a 2-D b; `out` (float32, unit last stride, any other strides) receives the
    result when given. `bias` is `(n,)`, or one vector per batch entry: a float32 tensor that
    broadcasts to `(*batch, 1, n)` with unit last stride (an additive attention mask over the keys).
    """
    lib = _lib()
    panels = isinstance(b, WeightPanels)
    b_words = b.words if panels else b.shape[-1]
    if planes not in (1, 2, 4) or (mode == XOR and (planes != 1 or offset)):
        raise ValueError(f"planes={planes}, offset={offset} is invalid for mode {mode}; allowed: XOR with one plane, "
                         "AND with 1, 2 or 4 planes")
    if a.dtype != torch.int64 or (b.data if panels else b).dtype != torch.int64:
        raise TypeError("packed operands must be int64 tensors (from pack_signs / pack_levels)")
    _check_cpu(a=a, b=b.data if panels else b, out=out)
    if (not panels and a.shape[:-2] != b.shape[:-2]) or (panels and a.dim() != 2) or a.shape[-1] != planes * b_words \
            or a.dim() > 4 or a.dim() < 2:
        raise ValueError(f"packed operands do not match: {tuple(a.shape)} and "
                         f"{('panels of ' + str(b.rows) + ' rows x ' + str(b_words) + ' words') if panels else tuple(b.shape)}"
                         f" ({planes} planes)")
    if b_words != words(k):
        raise ValueError(f"k={k} needs {words(k)} words per row, operands have {b_words}")
    m, n = a.shape[-2], (b.rows if panels else b.shape[-2])
    if out is None:
        out = torch.empty(*a.shape[:-2], m, n, dtype=torch.float32)
    elif out.shape != (*a.shape[:-2], m, n) or out.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError(f"out must be float32 {(*a.shape[:-2], m, n)} with unit last stride")
    if col_scale is not None:
        _check_float("col_scale", col_scale)
        if col_scale.shape != (n,) or not col_scale.is_contiguous():
            raise ValueError(f"col_scale must be contiguous of shape ({n},)")
    bias_strides = (0, 0)
    if bias is not None:
        _check_float("bias", bias)
        rows_shape = _shape_4d(out)[:2] + (1, n)
        if bias.stride(-1) != 1 or bias.shape[-1] != n or (bias.dim() > 1 and bias.shape[-2] != 1):
            raise ValueError(f"bias must have shape ({n},) or broadcast to {(*a.shape[:-2], 1, n)} with unit last stride")
        bias_strides = _strides_4d(bias, rows_shape)[:2]
    if a.stride(-1) != 1 or (not panels and b.stride(-1) != 1):
        raise ValueError("packed operands need contiguous rows")
    shape = _shape_4d(a)
    a_strides = _strides_4d(a, shape)
    b_strides = (0, 0, 0) if panels else _strides_4d(b, _shape_4d(b))[:3]
    o_strides = _strides_4d(out, _shape_4d(out))
    _check_allocated(lib.surge_binary_matmul(
        mode, planes, offset, a.data_ptr(), (b.data if panels else b).data_ptr(), int(panels), out.data_ptr(),
        shape[0], shape[1], m, n, b_words, k, *a_strides[:3], *b_strides, *o_strides[:3], float(scale),
        col_scale.data_ptr() if col_scale is not None else None, bias.data_ptr() if bias is not None else None,
        *bias_strides, torch.get_num_threads(),
    ))
    return out


def gather_signs(packed: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor, columns: int) -> torch.Tensor:
    """Rows `ids` of a packed 1-bit matrix (uint8 `(rows, ceil(columns / 8))`, 8 signs per byte, least
    significant bit first: the packed checkpoint's embedding) as floats `scales[id] * (+1 / -1)`,
    shape `(*ids.shape, columns)`: what `surge_nlp.packing.unpack_binary_weight` gives for the
    looked-up rows, without materialising them as bools first."""
    _check_float("scales", scales)
    _check_cpu(packed=packed, ids=ids)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or not packed.is_contiguous():
        raise ValueError(f"gather_signs needs a contiguous uint8 (rows, bytes) matrix, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != (columns + 7) // 8:  # the C loop reads ceil(columns / 8) bytes of each row
        raise ValueError(f"{columns} columns need {(columns + 7) // 8} bytes per row, the matrix has {packed.shape[1]}")
    if scales.shape != packed.shape[:1] or not scales.is_contiguous():
        raise ValueError(f"scales must be contiguous of shape ({packed.shape[0]},)")
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(*ids.shape, columns, dtype=torch.float32)
    bad = _lib().surge_gather_signs(packed.data_ptr(), packed.shape[0], packed.shape[1], columns, flat.data_ptr(),
                                    flat.numel(), scales.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if bad >= 0:
        raise IndexError(f"index {int(flat[bad])} is out of bounds for {packed.shape[0]} rows")
    return out


class LinearKernel:
    """One linear layer on the kernels with its constants bound once (the deployed layer's forward
    pays for two C calls and two allocations, not for argument checks): the input quantizer's
    `alpha`, shift and levels, the weights' panels, per-row scales and bias.

    1-bit signed inputs: XOR; other inputs (unsigned 1-bit, 2- and 4-bit levels): AND, bit-serial.
    """

    def __init__(self, panels: WeightPanels, in_features: int, alpha: float, shift: torch.Tensor, bits: int, signed: bool,
                 q_neg: int, q_pos: int, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        for name, vector, size in (("shift", shift, in_features), ("weight_scale", weight_scale, panels.rows),
                                   ("bias", bias, panels.rows)):
            if vector is not None and (vector.dtype != torch.float32 or vector.shape != (size,) or not vector.is_contiguous()):
                raise ValueError(f"{name} must be a contiguous float32 vector of {size}")
        _check_cpu(panels=panels.data, shift=shift, weight_scale=weight_scale, bias=bias)
        if panels.words != words(in_features):
            raise ValueError(f"panels of {panels.words} words do not hold {in_features} inputs")
        self.panels, self.k, self.n, self.alpha = panels, in_features, panels.rows, float(alpha)
        self.shift, self.weight_scale, self.bias = shift, weight_scale, bias
        self.xor = signed and bits == 1
        self.q_neg, self.q_pos, self.planes = q_neg, q_pos, 1 if self.xor else planes_for(q_neg, q_pos)
        if self.planes not in (1, 2, 4):
            raise ValueError(f"the kernels take 1-, 2- or 4-bit inputs, not {bits}")

    def pack(self, rows: torch.Tensor) -> torch.Tensor:
        """The packed input of float32 rows `(m, in_features)` with unit last stride."""
        m, n_words = rows.shape[0], self.panels.words
        out = torch.empty(m, self.planes * n_words, dtype=torch.int64)
        strides = (0, 0, rows.stride(0), 1)
        if self.xor:
            _lib().surge_pack_signs(rows.data_ptr(), 1, 1, m, self.k, *strides, self.shift.data_ptr(), 0, 0, 0, 1,
                                       self.alpha, out.data_ptr(), n_words, torch.get_num_threads())
        else:
            _lib().surge_pack_levels(rows.data_ptr(), 1, 1, m, self.k, *strides, self.shift.data_ptr(), 0, 0, 0, 1,
                                        None, 0, 0, 0, 0, 0.0, self.alpha, self.q_neg, self.q_pos, self.planes,
                                        out.data_ptr(), n_words, torch.get_num_threads())
        return out

    def matmul(self, packed: torch.Tensor) -> torch.Tensor:
        """`dot * alpha * weight_scale + bias` of packed rows (from `pack`), float32 `(m, out_features)`."""
        m = packed.shape[0]
        out = torch.empty(m, self.n, dtype=torch.float32)
        _check_allocated(_lib().surge_binary_matmul(
            XOR if self.xor else AND, self.planes, 0 if self.xor else self.q_neg, packed.data_ptr(),
            self.panels.data.data_ptr(), 1, out.data_ptr(), 1, 1, m, self.n, self.panels.words, self.k,
            0, 0, packed.stride(0), 0, 0, 0, 0, 0, self.n, self.alpha, self.weight_scale.data_ptr(),
            self.bias.data_ptr() if self.bias is not None else None, 0, 0, torch.get_num_threads()))
        return out

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        _check_float("rows", rows)
        if rows.dim() != 2 or rows.shape[1] != self.k:
            raise ValueError(f"rows must be (m, {self.k}), got {tuple(rows.shape)}")
        if rows.stride(1) != 1:
            rows = rows.contiguous()
        return self.matmul(self.pack(rows))


PEAK_WORDS = 1024  # 8 KiB of b (and 256 bytes of a): L1-resident on any x86 core
PEAK_PRODUCTS_PER_WORD = 4  # each word of b meets four words of a, as in the matmul's micro-kernels


def peak_xor_popcount(a: torch.Tensor, b: torch.Tensor, reps: int, threads: int | None = None) -> int:
    """`reps` passes of XOR + popcount + accumulate of each word of `b` against four words of `a`
    held in registers (`sum_w sum_{r<4} popcount(a[8r + w % 8] ^ b[w])`), on each of `threads`
    threads (default: torch's), with the active variant's popcount and nothing else: the binary
    ceiling that `recipes/benchmark_kernels.py` times. `a` and `b`: int64 vectors of the same length,
    a multiple of 32. Returns the set bits counted over all passes and threads.

    Example:
        >>> import torch
        >>> from surge_nlp.kernels import ops
        >>> a, b = torch.full((32,), -1, dtype=torch.int64), torch.zeros(32, dtype=torch.int64)
        >>> ops.peak_xor_popcount(a, b, reps=3, threads=2) if ops.available() else 32 * 4 * 64 * 3 * 2
        49152
    """
    if a.dtype != torch.int64 or b.dtype != torch.int64 or a.shape != b.shape or a.dim() != 1 or a.numel() % 32:
        raise ValueError(f"peak_xor_popcount needs two int64 vectors of the same length, a multiple of 32; got "
                         f"{a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    return int(_lib().surge_peak_xor_popcount(a.data_ptr(), b.data_ptr(), b.numel(), reps,
                                              torch.get_num_threads() if threads is None else threads))


__all__ = ["AND", "PEAK_PRODUCTS_PER_WORD", "PEAK_WORDS", "VARIANTS", "XOR", "LinearKernel", "WeightPanels",
           "active_variant", "available", "binary_matmul", "bytes_to_words", "gather_signs", "notify_unavailable",
           "pack_levels", "pack_signs", "peak_xor_popcount", "planes_for", "reset", "supported_variants",
           "unavailable_reason", "use_variant", "weight_panels", "words"]
