"""Build-on-first-use of the binary kernels: compile `surge_kernels.c` with the system C compiler
into a per-user cache, keyed by the source and the compile command, and load it with ctypes.

No manual step and no build-time dependency: the library is compiled generic (no `-march`), with
the AVX2 / AVX-512 variants chosen at run time, so the cached file is valid on any x86-64 machine
sharing the cache. Written to a temporary name and renamed, so concurrent first uses are safe.

Environment:
    CC: the compiler (default `cc`).
    SURGE_NLP_KERNEL_CACHE: cache directory (default `$XDG_CACHE_HOME/surge_nlp/kernels`, i.e.
        `~/.cache/surge_nlp/kernels`).
    SURGE_NLP_DISABLE_KERNELS=1: never load the kernels (the simulated path runs).

Example:
    >>> from surge_nlp.kernels import build
    >>> lib = build.load_library()
    >>> lib is None or lib.surge_abi_version() == build.ABI_VERSION
    True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import subprocess
from pathlib import Path

import torch  # noqa: F401  (loaded first: its libgomp.so.1 is the OpenMP runtime the kernels bind to)

from ..atomic import atomic_write

SOURCE = Path(__file__).with_name("surge_kernels.c")
ABI_VERSION = 1
FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fvisibility=hidden")
OPENMP = "-fopenmp"  # dropped (single-threaded kernels) when the compiler has no OpenMP

_c_int, _i64, _f32, _ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {
    "surge_abi_version": ([], _c_int),
    "surge_variant_supported": ([_c_int], _c_int),
    "surge_set_variant": ([_c_int], _c_int),
    "surge_active_variant": ([], _c_int),
    "surge_binary_matmul": ([_c_int, _ptr, _ptr, _ptr] + [_i64] * 15 + [_f32, _ptr, _ptr, _c_int], None),
    "surge_pack_signs": ([_ptr] + [_i64] * 8 + [_ptr] + [_i64] * 4 + [_f32, _ptr, _i64, _c_int], None),
    "surge_pack_probs": ([_ptr] + [_i64] * 8 + [_ptr] + [_i64] * 4 + [_f32, _f32, _f32, _ptr, _i64, _c_int], None),
}


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled or loaded (message says why)."""


def cache_dir() -> Path:
    explicit = os.environ.get("SURGE_NLP_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "surge_nlp" / "kernels"


def _compile_command(compiler: str, output: Path, openmp: bool = True) -> list[str]:
    return [*shlex.split(compiler), *FLAGS, *([OPENMP] if openmp else []), str(SOURCE), "-o", str(output)]


def build_library() -> Path:
    """The path of the compiled library, compiling it if the cache has no copy for this source."""
    compiler = os.environ.get("CC") or "cc"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_compile_command(compiler, Path("out"))).encode()).hexdigest()[:16]
    directory = cache_dir()
    target = directory / f"surge_kernels-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as temporary:  # unique per process: concurrent builds do not collide
        failures = []
        for openmp in (True, False):
            command = _compile_command(compiler, temporary, openmp)
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as error:
                raise KernelBuildError(f"C compiler {compiler!r} not usable ({error})") from error
            if result.returncode == 0:
                break
            failures.append(f"`{' '.join(command)}` failed: {result.stderr.strip()[-300:]}")
        else:
            raise KernelBuildError("; ".join(failures))
    return target


def load_library() -> ctypes.CDLL | None:
    """Compile (first use) and load the kernels; None when disabled. Raises KernelBuildError."""
    if os.environ.get("SURGE_NLP_DISABLE_KERNELS", "") not in ("", "0"):
        return None
    path = build_library()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        raise KernelBuildError(f"cannot load {path} ({error})") from error
    for name, (argtypes, restype) in SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    if lib.surge_abi_version() != ABI_VERSION:
        raise KernelBuildError(f"{path} has ABI {lib.surge_abi_version()}, expected {ABI_VERSION}")
    return lib
