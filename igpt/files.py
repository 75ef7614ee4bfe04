"""Atomic writes: a reader, a crash or a kill never sees a half-written file or directory.

Everything is written to a hidden staging path beside its destination, then renamed into place
(a rename within one directory is atomic on POSIX file systems).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging path to write a file or directory at; on success it replaces `path`.

    The staging name keeps the suffix (numpy adds `.npy` / `.npz` to names without one). On
    an exception the staging path is removed and `path` is left as it was. A directory that
    already exists is moved aside and removed after the new one is in place.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = path.with_name(f".{path.stem}.{token}.tmp{path.suffix}")
    try:
        yield staging
        if path.is_dir() and not staging.is_dir():
            raise IsADirectoryError(f"{path} is a directory; not replacing it with a file")
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.{token}.old")
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
    finally:
        _remove(staging)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as staging:
        staging.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, value) -> Path:
    """Write `value` as indented JSON to `path` atomically."""
    return write_text(path, json.dumps(value, indent=2) + "\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """`np.save` to `path` atomically."""
    with atomic_path(path) as staging:
        np.save(staging, array)
    return Path(path)
