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

import contextlib
import sys
import warnings

import numpy as np
import torch

from .build import INTERFACE, KernelBuildError, load_library

VARIANTS = INTERFACE.variants  # the C source's table, in its enum order
XOR, AND = 0, 1

_state: dict = {}


def _library():
    if "lib" not in _state:
        try:
            _state["lib"] = load_library()
            _state["reason"] = None if _state["lib"] is not None else "disabled by SURGE_NLP_DISABLE_KERNELS"
        except KernelBuildError as error:
            _state["lib"], _state["reason"] = None, str(error)
    return _state["lib"]


def available() -> bool:
    """True when the compiled kernels are loaded (compiling them on first call)."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why the kernels are not available (None when they are)."""
    _library()
    return _state["reason"]


def notify_unavailable() -> None:
    """The one-line notice shown (once per process) when a model stays on the simulated path."""
    if not _state.get("notified"):
        _state["notified"] = True
        warnings.warn(f"surge_nlp: binary kernels unavailable ({unavailable_reason()}); running the simulated path",
                      RuntimeWarning, stacklevel=3)


def reset() -> None:
    """Forget the loaded library (the next call re-runs the build); for tests of the fallback."""
    _state.clear()


def _lib():
    lib = _library()
    if lib is None:
        raise RuntimeError(f"surge_nlp binary kernels unavailable: {unavailable_reason()}")
    return lib


def supported_variants() -> list[str]:
    """The kernel variants this CPU runs, portable first."""
    lib = _lib()
    return [name for index, name in enumerate(VARIANTS) if lib.surge_variant_supported(index)]


def active_variant() -> str:
    return VARIANTS[_lib().surge_active_variant()]


@contextlib.contextmanager
def use_variant(name: str):
    """Run the block on one kernel variant, forced: every product runs on it, small ones included
    (automatic selection may hand them to a faster neighbour). Restores the previous selection."""
    if name not in VARIANTS:
        raise ValueError(f"kernel variant {name!r} is invalid; allowed values: {', '.join(VARIANTS)}")
    lib = _lib()
    previous = lib.surge_forced_variant()  # -1: automatic
    if lib.surge_set_variant(VARIANTS.index(name)) < 0:
        raise ValueError(f"kernel variant {name!r} is not supported by this CPU; supported: {supported_variants()}")
    try:
        yield
    finally:
        lib.surge_set_variant(previous)


def bytes_to_words(rows: torch.Tensor, columns: int) -> torch.Tensor:
    """uint8 rows (8 signs per byte, least significant bit first: the packed checkpoint) -> the
    kernels' int64 words. On a little-endian machine the same bits read as 64-bit words are the
    kernels' layout, so this only pads each row to whole words."""
    if sys.byteorder != "little":
        raise RuntimeError("the binary kernels' packed layout needs a little-endian machine")
    padding = 8 * words(columns) - rows.shape[-1]
    return torch.nn.functional.pad(rows, (0, padding)).contiguous().view(torch.int64)


def pack_unsigned(rows: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed bits of the unsigned 1-bit quantizer `round(clip((x - beta) / alpha, 0, 1))` of each row,
    computed with the simulated quantizer's own expression so that both paths take the same bits."""
    bits = ((rows - shift) / scale > 0.5).contiguous().numpy()
    as_bytes = torch.from_numpy(np.packbits(bits, axis=-1, bitorder="little"))
    return bytes_to_words(as_bytes, rows.shape[-1])


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


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise TypeError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")


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


def pack_probs(p: torch.Tensor, beta: float, alpha: float, mask: torch.Tensor | None = None,
               mask_floor: float | None = None) -> torch.Tensor:
    """Packed bits of the unsigned 1-bit quantizer `round(clip((p - beta) / alpha, 0, 1))` along p's
    last dim, cleared where the additive `mask` (broadcast against p) is `<= mask_floor`."""
    _check_float("p", p)
    lib = _lib()
    k = p.shape[-1]
    out = torch.empty(*p.shape[:-1], words(k), dtype=torch.int64)
    shape = _shape_4d(p)
    if mask is None:
        mask_ptr, mask_strides, floor = None, (0, 0, 0, 0), 0.0
    else:
        _check_float("mask", mask)
        mask_ptr, mask_strides = mask.data_ptr(), _strides_4d(mask, shape)
        floor = torch.finfo(torch.float32).min / 2 if mask_floor is None else mask_floor
    lib.surge_pack_probs(p.data_ptr(), *shape, *_strides_4d(p, shape), mask_ptr, *mask_strides, float(floor),
                         float(beta), float(alpha), out.data_ptr(), out.shape[-1], torch.get_num_threads())
    return out


def binary_matmul(a: torch.Tensor, b: torch.Tensor, k: int, mode: int = XOR, scale: float = 1.0,
                  col_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """`dot(a[..., m, :], b[..., n, :]) * scale * col_scale[n] + bias[n]` on packed rows.

    XOR mode (both signed, k = true reduction length): dot = k - 2 popcount(a ^ b).
    AND mode (a unsigned {0, 1}, b signed): dot = 2 popcount(a & b) - popcount(a).
    a: `(*batch, m, words)`, b: `(*batch, n, words)` with up to two batch dims; `out` (float32,
    unit last stride, any other strides) receives the result when given.
    """
    lib = _lib()
    if a.dtype != torch.int64 or b.dtype != torch.int64:
        raise TypeError("packed operands must be int64 tensors (from pack_signs / pack_probs)")
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-1] or a.dim() > 4 or a.dim() < 2:
        raise ValueError(f"packed operands do not match: {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != words(k):
        raise ValueError(f"k={k} needs {words(k)} words per row, operands have {a.shape[-1]}")
    m, n = a.shape[-2], b.shape[-2]
    if out is None:
        out = torch.empty(*a.shape[:-2], m, n, dtype=torch.float32)
    elif out.shape != (*a.shape[:-2], m, n) or out.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError(f"out must be float32 {(*a.shape[:-2], m, n)} with unit last stride")
    for name, vector in (("col_scale", col_scale), ("bias", bias)):
        if vector is not None:
            _check_float(name, vector)
            if vector.shape != (n,) or not vector.is_contiguous():
                raise ValueError(f"{name} must be contiguous of shape ({n},)")
    if a.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError("packed operands need contiguous rows")
    shape = _shape_4d(a)
    a_strides, b_strides = _strides_4d(a, shape), _strides_4d(b, _shape_4d(b))
    o_strides = _strides_4d(out, _shape_4d(out))
    lib.surge_binary_matmul(
        mode, a.data_ptr(), b.data_ptr(), out.data_ptr(), shape[0], shape[1], m, n, a.shape[-1], k,
        *a_strides[:3], *b_strides[:3], *o_strides[:3], float(scale),
        col_scale.data_ptr() if col_scale is not None else None, bias.data_ptr() if bias is not None else None,
        torch.get_num_threads(),
    )
    return out


PEAK_WORDS = 1024  # 2 x 8 KiB of operands: L1-resident on any x86 core


def peak_xor_popcount(a: torch.Tensor, b: torch.Tensor, reps: int, threads: int | None = None) -> int:
    """Set bits of `reps` passes of XOR + popcount over the int64 words `a` and `b` (same length, a
    multiple of 32) on each of `threads` threads (default: torch's), with the active variant's
    popcount and nothing else: the binary ceiling that `recipes/benchmark_kernels.py` times.

    Example:
        >>> import torch
        >>> from surge_nlp.kernels import ops
        >>> a, b = torch.full((32,), -1, dtype=torch.int64), torch.zeros(32, dtype=torch.int64)
        >>> ops.peak_xor_popcount(a, b, reps=3, threads=2) if ops.available() else 32 * 64 * 3 * 2
        12288
    """
    if a.dtype != torch.int64 or b.dtype != torch.int64 or a.shape != b.shape or a.dim() != 1 or a.numel() % 32:
        raise ValueError(f"peak_xor_popcount needs two int64 vectors of the same length, a multiple of 32; got "
                         f"{a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    return int(_lib().surge_peak_xor_popcount(a.data_ptr(), b.data_ptr(), a.numel(), reps,
                                              torch.get_num_threads() if threads is None else threads))
