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
    >>> build.INTERFACE.variants
    ('generic', 'avx2', 'avx512_vpopcntdq')
    >>> lib = build.load_library()
    >>> lib is None or lib.surge_interface().decode() == build.INTERFACE.text
    True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import sys
import warnings
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (loaded first: its libgomp.so.1 is the OpenMP runtime the kernels bind to)

from ..atomic import atomic_write

SOURCE = Path(__file__).with_name("surge_kernels.c")
# -ffp-contract=off: the epilogue must round `dot * scale * col_scale + bias` step by step, as torch does.
FLAGS = ("-O3", "-std=c11", "-ffp-contract=off", "-fPIC", "-shared", "-fvisibility=hidden")
OPENMP = "-fopenmp"  # dropped (single-threaded kernels) when the compiler has no OpenMP
_CTYPES = {"i": ctypes.c_int, "q": ctypes.c_int64, "f": ctypes.c_float, "p": ctypes.c_void_p, "s": ctypes.c_char_p, "v": None}


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled or loaded (message says why)."""


@dataclass(frozen=True)
class Interface:
    """The C source's SURGE_INTERFACE table: ABI version, variants, and each function's ctypes signature."""

    text: str
    abi: int
    variants: tuple[str, ...]
    signatures: dict[str, tuple[list, Any]]  # name -> (argtypes, restype)


def _ctype_list(tokens: list[str]) -> list:
    types = []
    for token in tokens:
        count, _, kind = token.rpartition("*")
        types += [_CTYPES[kind]] * int(count or 1)
    return types


def read_interface(source: str) -> Interface:
    """Parse the SURGE_INTERFACE string literal of the C source (the one table of the interface)."""
    match = re.search(r"#define SURGE_INTERFACE((?:.*\\\n)*.*)", source)
    if match is None:
        raise KernelBuildError(f"{SOURCE.name} has no SURGE_INTERFACE table")
    text = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', match[1])).replace("\\n", "\n")
    abi, variants, signatures = None, (), {}
    for line in text.splitlines():
        key, *fields = line.split()
        if key == "abi":
            abi = int(fields[0])
        elif key == "variants":
            variants = tuple(fields)
        elif key == "fn":
            name, result, *arguments = fields
            signatures[name] = (_ctype_list(arguments), _CTYPES[result])
    return Interface(text, abi, variants, signatures)


INTERFACE = read_interface(SOURCE.read_text())


def cache_dir() -> Path:
    explicit = os.environ.get("SURGE_NLP_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "surge_nlp" / "kernels"


def _compile_command(compiler: str, output: Path, openmp: bool = True) -> list[str]:
    return [*shlex.split(compiler), *FLAGS, *([OPENMP] if openmp else []), str(SOURCE), "-o", str(output)]


def _cache_key(compiler: str, openmp: bool) -> str:
    """The source, the compile command and the platform: a cache shared by other machines (an x86 and
    an ARM node, another OS or C library) never hands one machine another's build."""
    platform_tag = f"{platform.machine()} {sys.platform} {' '.join(platform.libc_ver())}"
    command = " ".join(_compile_command(compiler, Path("out"), openmp))
    return hashlib.sha256(SOURCE.read_bytes() + command.encode() + platform_tag.encode()).hexdigest()[:16]


class _CompileFailed(Exception):
    """One compile command failed (its message: the command and the compiler's last words)."""


def _compile(compiler: str, target: Path, openmp: bool) -> None:
    """Compile into `target` (temporary name, then rename); _CompileFailed with the compiler's complaint."""
    with atomic_write(target) as temporary:  # unique per process: concurrent builds do not collide
        command = _compile_command(compiler, temporary, openmp)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise KernelBuildError(f"C compiler {compiler!r} not usable ({error})") from error
        if result.returncode != 0:
            raise _CompileFailed(f"`{' '.join(command)}` failed: {result.stderr.strip()[-300:]}")


def build_library() -> Path:
    """The path of the compiled library, compiling it if the cache has no copy for this source and machine.

    With OpenMP when the compiler has it; otherwise single-threaded, with a warning, cached under its
    own name (a compiler that gains OpenMP later builds the threaded one)."""
    compiler = os.environ.get("CC") or "cc"
    directory = cache_dir()
    threaded, single = (directory / f"surge_kernels-{_cache_key(compiler, openmp)}.so" for openmp in (True, False))
    if threaded.exists():
        return threaded
    try:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            _compile(compiler, threaded, openmp=True)
            return threaded
        except _CompileFailed as threaded_failure:
            if not single.exists():
                try:
                    _compile(compiler, single, openmp=False)
                except _CompileFailed as single_failure:
                    raise KernelBuildError(f"{threaded_failure}; {single_failure}") from None
            warnings.warn(f"surge_nlp: the binary kernels are built without OpenMP (single-threaded): {threaded_failure}",
                          RuntimeWarning, stacklevel=2)
            return single
    except OSError as error:  # an unwritable cache (read-only home, a file in the way)
        raise KernelBuildError(f"cannot write the kernel cache {directory} ({error}); set SURGE_NLP_KERNEL_CACHE "
                               "to a writable folder") from error


def load_library() -> ctypes.CDLL | None:
    """Compile (first use) and load the kernels; None when disabled. Raises KernelBuildError."""
    if os.environ.get("SURGE_NLP_DISABLE_KERNELS", "") not in ("", "0"):
        return None
    path = build_library()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        raise KernelBuildError(f"cannot load {path} ({error})") from error
    try:
        for name, (argtypes, restype) in INTERFACE.signatures.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, restype
    except AttributeError as error:
        raise KernelBuildError(f"{path} does not match {SOURCE.name}'s interface (ABI {INTERFACE.abi}): {error}") from None
    if lib.surge_interface().decode() != INTERFACE.text:
        raise KernelBuildError(f"{path} reports another interface than {SOURCE.name}'s (ABI {INTERFACE.abi})")
    return lib
