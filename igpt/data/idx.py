"""IDX files, the format MNIST, Fashion-MNIST, KMNIST and EMNIST ship in.

A file is a big-endian header, then the data: magic `0x0000 08 DD` (08 = unsigned bytes, DD =
number of dimensions), DD int32 sizes, then the bytes in C order. Image files have 3 dimensions
(N, rows, cols), label files 1 (N). Files may be gzip-compressed (`.gz`, as distributed).

A directory holds a split's images and labels as `<split>-images-idx3-ubyte[.gz]` and
`<split>-labels-idx1-ubyte[.gz]`, where the test split is spelled `t10k` (MNIST's name) or
`test`; a prefix such as `emnist-digits-` is allowed.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np

UNSIGNED_BYTE = 0x08
# split -> the spellings of its file prefix
SPLIT_NAMES = {"train": ("train",), "test": ("t10k", "test")}
WHERE_TO_GET = (
    "Fashion-MNIST: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, into "
    "/usr/share/datasets/fashion-mnist) or the four .gz files from "
    "https://github.com/zalandoresearch/fashion-mnist"
)


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file with `ndim` dimensions; one-line errors for a file that
    is not IDX, has another shape, or is cut short."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read IDX file {path}: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (its first bytes are {data[:4].hex()})")
    kind, dims = data[2], data[3]
    if kind != UNSIGNED_BYTE or dims != ndim:
        raise ValueError(
            f"{path}: magic number 0x{data[:4].hex()} means type 0x{kind:02x} with {dims} "
            f"dimension(s); expected unsigned bytes (0x08) with {ndim} (magic 0x000008{ndim:02x})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated: its header needs {header} bytes")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        what = "truncated" if len(data) - header < expected else "longer than its header says"
        raise ValueError(
            f"{path} is {what}: shape {shape} needs {expected} bytes of data, found "
            f"{len(data) - header}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def split_files(directory: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """The (images, labels) files of `split` ("train" or "test") in `directory`."""
    directory = Path(directory)
    if split not in SPLIT_NAMES:
        raise ValueError(f"idx sources have the splits 'train' and 'test', got {split!r}")
    if not directory.is_dir():
        raise FileNotFoundError(f"idx source: {directory} is not a directory. {WHERE_TO_GET}")
    found = []
    for kind, ndim in (("images", 3), ("labels", 1)):
        names = "|".join(SPLIT_NAMES[split])
        pattern = re.compile(rf"^(.*-)?({names})-{kind}-idx{ndim}-ubyte(\.gz)?$")
        matches = sorted(p for p in directory.iterdir() if pattern.match(p.name))
        if not matches:
            raise FileNotFoundError(
                f"idx source: {directory} has no {split} {kind} file "
                f"({SPLIT_NAMES[split][0]}-{kind}-idx{ndim}-ubyte[.gz]). {WHERE_TO_GET}"
            )
        if len(matches) > 1:
            raise ValueError(
                f"idx source: {directory} has several {split} {kind} files "
                f"({', '.join(p.name for p in matches)}); keep one dataset per directory"
            )
        found.append(matches[0])
    return found[0], found[1]


def read_split(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`(images (N, rows, cols) uint8, labels (N,) int64)` of a split of an IDX directory."""
    images_path, labels_path = split_files(directory, split)
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise ValueError(
            f"idx source {directory} ({split}): {images_path.name} holds {len(images)} images "
            f"but {labels_path.name} holds {len(labels)} labels"
        )
    return images, labels.astype(np.int64)
