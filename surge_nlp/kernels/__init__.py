"""Compiled binary x binary kernels (XOR/AND + popcount) for deployed SURGE models.

`build` compiles and loads the C source on first use; `ops` runs the kernels on torch tensors.
`surge_nlp.deploy` is the user-facing entry point.
"""

from .ops import available, unavailable_reason

__all__ = ["available", "unavailable_reason"]
