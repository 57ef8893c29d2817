"""Atomic writes, in one place: write under a temporary sibling name, then rename over the target.

A killed process leaves the old target or the new one, never half of one that looks whole. The
temporary is hidden (`.NAME.<token>.tmp<suffix>`, so no reader that lists files by name mistakes
it for a result; the suffix is kept because some writers, such as matplotlib, read the format from
it) and is removed when the write fails. The written data is flushed to disk (fsync) before the
rename and the rename after it, so that a power loss, too, leaves the old target or the whole new
one. Every writer of the package goes through here: JSON
results, `save_pretrained` folders, trainer checkpoints, best weights, plots, submissions and the
compiled kernel library.

Example:
    >>> import json, pathlib, tempfile
    >>> from surge_nlp.atomic import atomic_write, write_json_atomically
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "results.json"
    >>> write_json_atomically(path, {"accuracy": 0.61})
    >>> with atomic_write(path) as temporary:  # any writer; renamed over `path` when the block succeeds
    ...     _ = temporary.write_text(json.dumps({"accuracy": 0.62}))
    >>> json.loads(path.read_text()), sorted(p.name for p in path.parent.iterdir())
    ({'accuracy': 0.62}, ['results.json'])
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temporary_sibling(path: str | os.PathLike, unique: bool = True) -> Path:
    """The temporary name `path` is written under. `unique=False` gives a fixed name, for writers
    that must agree on it across processes (the trainer's collective checkpoint)."""
    path = Path(path)
    token = f"{os.getpid()}-{secrets.token_hex(3)}." if unique else ""
    return path.with_name(f".{path.name}.{token}tmp{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush `path` (a file, or a directory's entries) to disk, best effort: where the platform or
    the filesystem cannot (a directory on Windows, EINVAL on some network or FUSE mounts), the write
    stays atomic, only not flushed, and no error is raised for it."""
    is_dir = path.is_dir()
    if is_dir and os.name == "nt":
        return
    # Windows flushes a file only through a handle that may write.
    flags = os.O_RDWR if os.name == "nt" else os.O_RDONLY
    try:
        descriptor = os.open(path, flags)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)


def _fsync_tree(path: Path) -> None:
    """`_fsync` of a file, or of every file and folder under a directory (a save_pretrained folder)."""
    if path.is_dir() and not path.is_symlink():
        for folder, _, files in os.walk(path):
            for name in files:
                _fsync(Path(folder) / name)
            _fsync(Path(folder))
    else:
        _fsync(path)


def commit(temporary: Path, path: str | os.PathLike) -> None:
    """Rename a finished `temporary` over `path`. A file replaces atomically; a directory replaces
    an existing one by moving the old aside first, so `path` is never a mix of both. The data is on
    disk before the rename, and the rename on disk when this returns."""
    path = Path(path)
    _fsync_tree(temporary)
    if temporary.is_dir() and path.exists():
        old = temporary_sibling(path)
        os.replace(path, old)
        os.replace(temporary, path)
        _remove(old)
    else:
        os.replace(temporary, path)
    _fsync(path.parent)


@contextmanager
def atomic_write(path: str | os.PathLike, unique: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (a file, or a directory the writer creates);
    rename it over `path` when the block succeeds, remove it when the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path, unique)
    _remove(temporary)
    try:
        yield temporary
        commit(temporary, path)
    except BaseException:
        _remove(temporary)
        raise


def write_json_atomically(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented JSON at `path`, written atomically."""
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=str))


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """`text` (UTF-8, newlines as given) at `path`, written atomically; returns `path`."""
    with atomic_write(path) as temporary:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    return Path(path)
