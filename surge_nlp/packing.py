"""Bit packing of binarized weights: 8 signs per byte.

A row of `n` signs becomes `ceil(n / 8)` bytes; bit `j` (least significant first) of byte `k`
holds sign `8 * k + j`, 1 for +1 and 0 for -1; the padding bits of the last byte are 0. Rows
(all leading dimensions) are packed independently, so a packed `[out, in]` weight is
`[out, ceil(in / 8)]` uint8.

Example:
    >>> import torch
    >>> from surge_nlp.packing import pack_signs, unpack_signs
    >>> signs = torch.tensor([[True, False, True, True, False, False, False, False, True]])
    >>> packed = pack_signs(signs)
    >>> packed.tolist()  # 1 + 4 + 8 = 13, then bit 0 of the second byte
    [[13, 1]]
    >>> bool((unpack_signs(packed, 9) == signs).all())
    True
"""

from __future__ import annotations

import torch

BITS_PER_BYTE = 8


def packed_length(num_signs: int) -> int:
    """Bytes holding `num_signs` signs: `ceil(num_signs / 8)`."""
    return -(-num_signs // BITS_PER_BYTE)


def _bit_values(device: torch.device) -> torch.Tensor:
    return torch.tensor([1 << bit for bit in range(BITS_PER_BYTE)], dtype=torch.uint8, device=device)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (True = +1) along its last dimension into uint8, 8 signs per byte."""
    if signs.dtype != torch.bool:
        raise TypeError(f"pack_signs needs a bool tensor (True = +1), got {signs.dtype}")
    num_signs = signs.shape[-1]
    padding = packed_length(num_signs) * BITS_PER_BYTE - num_signs
    bits = torch.nn.functional.pad(signs.to(torch.uint8), (0, padding))
    bits = bits.reshape(*signs.shape[:-1], -1, BITS_PER_BYTE)
    # Distinct powers of two: the sum is a bitwise OR and stays below 256.
    return (bits * _bit_values(signs.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, num_signs: int) -> torch.Tensor:
    """Inverse of `pack_signs`: uint8 `[..., ceil(num_signs / 8)]` -> bool `[..., num_signs]`."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_signs needs a uint8 tensor, got {packed.dtype}")
    if packed.shape[-1] != packed_length(num_signs):
        raise ValueError(
            f"a packed row of {num_signs} signs has {packed_length(num_signs)} bytes, got {packed.shape[-1]} "
            f"(packed shape {list(packed.shape)})"
        )
    bits = (packed.unsqueeze(-1) & _bit_values(packed.device)) != 0
    return bits.reshape(*packed.shape[:-1], -1)[..., :num_signs]


def unpack_binary_weight(packed: torch.Tensor, scale: torch.Tensor, num_columns: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense binarized weight `scale_row * (+1 / -1)` of a packed `[rows, bytes]` weight."""
    signs = unpack_signs(packed, num_columns)
    ones = torch.where(signs, 1.0, -1.0).to(dtype)
    return scale.to(dtype).unsqueeze(-1) * ones
