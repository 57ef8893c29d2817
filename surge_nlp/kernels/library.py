"""The compiled kernel library: built and loaded once per process, which variants this CPU runs,
and forcing one (tests and benchmarks). `ops` calls into it; nothing else touches the C library.

Example:
    >>> from surge_nlp.kernels import library
    >>> library.available() in (True, False) and (library.available() or library.unavailable_reason() is not None)
    True
"""

from __future__ import annotations

import contextlib
import warnings

from .build import INTERFACE, KernelBuildError, load_library

VARIANTS = INTERFACE.variants  # the C source's table, in its enum order

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
