"""Build-on-first-use of the binary kernels: compile `surge_kernels.c` with the system C compiler
into a per-user cache, keyed by the source and the compile command, and load it with ctypes.

No manual step and no build-time dependency: the library is compiled generic (no `-march`), with
the AVX2 / AVX-512 variants chosen at run time, so the cached file is valid on any x86-64 machine
sharing the cache. Written to a temporary name and renamed, so concurrent first uses are safe.
A library is code that runs as the user who loads it: a cached file that another user owns or could
write is built again in its place, and never loaded. The cache keeps the `KEEP_BUILDS` most recently
used builds (other checkouts, older sources); older ones are removed after each new build.

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
import stat
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
KEEP_BUILDS = 8  # builds kept in the cache, the most recently used (a checkout's path is part of the key)
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
        temporary.chmod(0o755)  # not the umask's: under 002 the group could write the code we load


def untrusted_reason(mode: int, owner: int, user: int) -> str | None:
    """Why a file (`mode`, `owner` as os.stat gives them) must not supply code that `user` runs; None if it
    may. Root's files are trusted as the system's. The folder's permissions do not matter: whoever can
    write the folder can remove our file or put theirs in its place, but that file is then theirs."""
    if owner not in (user, 0):
        return f"owned by another user (uid {owner})"
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by other users ({stat.filemode(mode)})"
    return None


def _distrust(path: Path) -> str | None:
    """`untrusted_reason` for a cached library (a symbolic link also by its own owner), or None on Windows."""
    if os.name != "posix":
        return None
    user, link = os.getuid(), path.lstat()
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (user, 0):
        return f"a link owned by another user (uid {link.st_uid})"
    target = path.stat()
    return untrusted_reason(target.st_mode, target.st_uid, user)


def _cached(path: Path) -> bool:
    """A usable cached build: present and trusted (an untrusted one is built again and replaced)."""
    return path.exists() and _distrust(path) is None


def _last_used(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # pruned by another process meanwhile
        return 0.0


def _prune(directory: Path, keep: int = KEEP_BUILDS) -> None:
    """Remove all but the `keep` most recently used builds (best effort: another process may be pruning too;
    a library already loaded stays mapped in the processes that use it)."""
    builds = sorted(directory.glob("surge_kernels-*.so"), key=_last_used, reverse=True)
    for old in builds[keep:]:
        try:
            old.unlink()
        except OSError:
            pass


def build_library() -> Path:
    """The path of the compiled library, compiling it if the cache has no copy for this source and machine.

    With OpenMP when the compiler has it; otherwise single-threaded, with a warning, cached under its
    own name (a compiler that gains OpenMP later builds the threaded one)."""
    compiler = os.environ.get("CC") or "cc"
    directory = cache_dir()
    threaded, single = (directory / f"surge_kernels-{_cache_key(compiler, openmp)}.so" for openmp in (True, False))
    if _cached(threaded):
        return threaded
    try:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            _compile(compiler, threaded, openmp=True)
            _prune(directory)
            return threaded
        except _CompileFailed as threaded_failure:
            if not _cached(single):
                try:
                    _compile(compiler, single, openmp=False)
                except _CompileFailed as single_failure:
                    raise KernelBuildError(f"{threaded_failure}; {single_failure}") from None
            warnings.warn(f"surge_nlp: the binary kernels are built without OpenMP (single-threaded): {threaded_failure}",
                          RuntimeWarning, stacklevel=2)
            _prune(directory)
            return single
    except OSError as error:  # an unwritable cache (read-only home, a file in the way)
        raise KernelBuildError(f"cannot write the kernel cache {directory} ({error}); set SURGE_NLP_KERNEL_CACHE "
                               "to a writable folder") from error


def load_library() -> ctypes.CDLL | None:
    """Compile (first use) and load the kernels; None when disabled. Raises KernelBuildError."""
    if os.environ.get("SURGE_NLP_DISABLE_KERNELS", "") not in ("", "0"):
        return None
    path = build_library()
    reason = _distrust(path)
    if reason:
        raise KernelBuildError(f"{path} is {reason}: the kernels are not loaded from it; set SURGE_NLP_KERNEL_CACHE "
                               "to a folder of your own")
    try:
        os.utime(path)  # "recently used", for _prune
    except OSError:
        pass  # a read-only cache someone else filled
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
