"""Compiled popcount kernels for deployed SURGE models: 1-bit weights times 1-bit activations
(XOR/AND + popcount) and 2-/4-bit activations (bit-serial AND + popcount).

`build` compiles and loads the C source on first use; `ops` runs the kernels on torch tensors.
`surge_nlp.deploy` is the user-facing entry point.
"""

from .ops import available, unavailable_reason

__all__ = ["available", "unavailable_reason"]
