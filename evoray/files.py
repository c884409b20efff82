"""Atomic file writes: the one temporary-name rule and the one writer every module uses.

A file is written under a temporary name beside its target and renamed over it only when it is
complete, so a reader never sees half a file and a crash leaves the previous version. Base layer:
it imports nothing of evoray's (the LLM layer's cache, ledger and batch state use it, and so do
the data layer's tables).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterator


def temp_path(path: str | os.PathLike, directory: bool = False) -> Path:
    """A new, unique temporary name beside ``path`` (``.NAME.<random>.partial``), created empty.

    The one temporary-name rule of every atomic write: same folder as the target (so the final
    :func:`os.replace` is a rename on one file system), hidden, and never a name a reader trusts.
    With ``directory`` an empty folder is created instead of an empty file.
    """
    path = Path(path)
    if directory:
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    return Path(name)


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Remove temporary files :func:`temp_path` made for ``path`` that a killed run left behind;
    returns how many. Only for a writer that knows it is the only one writing ``path``."""
    path = Path(path)
    n = 0
    for p in path.parent.glob(f".{glob_escape(path.name)}.*.partial"):
        _remove(p)
        n += 1
    return n


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Write ``path`` atomically: yields a temporary path in the same folder (see :func:`temp_path`).

    When the block ends without an error the temporary file is flushed to disk (``fsync``) and
    renamed over ``path``; on an error it is removed and ``path`` is left as it was. With
    ``directory`` the temporary path is a folder, and an existing folder at ``path`` is removed just
    before the rename (a folder cannot be renamed over a non-empty one). The parent folder must
    exist.
    """
    path = Path(path)
    tmp = temp_path(path, directory=directory)
    try:
        yield tmp
        if fsync and not directory:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if directory and path.exists():
            _remove(path)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    path = Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding=encoding)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, fsync: bool = True, **dumps: Any) -> Path:
    """Write ``json.dumps(obj, **dumps)`` to ``path`` atomically; returns ``path``."""
    return write_text_atomic(path, json.dumps(obj, **dumps), fsync=fsync)


__all__ = ["atomic_path", "remove_stale_temps", "temp_path", "write_json_atomic", "write_text_atomic"]
