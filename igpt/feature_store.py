"""Feature stores: a data split's probe features on disk, written batch by batch as they are
computed and read back in blocks of bounded size, so that no split has to fit in host memory
(iGPT-L's features of ImageNet's training split are about 8 GB per layer).

A store is a directory for one split:

    NAME.npy          (N, D) float32 per feature set (`layer_3`, `pixels`), rows in the
                      split's example order; plain .npy files (`np.load(path, mmap_mode="r")`)
    labels.npy        (N,) int32
    store.json        the complete feature sets and N
    pass.json         while feature sets are being written: which, and how they are split
    progress-P.json   how many of its batches process P has made durable

Every process computes and writes the rows of its own examples into the same files (so with
several hosts the store must be on a file system all of them see, as checkpoints must). A
pass that is killed resumes from each process's last durable batch; a pass with different
feature sets or a different process count starts over.

Rows are read with positioned reads rather than through a memory map: pages of a map that
have been read stay in the process's resident set until the kernel wants them back, so a
probe streaming an 8 GB file would appear to hold 8 GB.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from igpt import files

STORE_JSON = "store.json"
PASS_JSON = "pass.json"
LABELS = "labels"
_READ_BYTES = 1 << 22  # the buffer of reads that select columns or convert
# A batch the producer hands to `FeatureStore.fill`: example indices in the split, their
# labels, and {feature set: (len(indices), D) rows}.
Batch = tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class _Array:
    """One stored (rows, width) .npy file, of which `columns` are read."""

    path: Path
    offset: int  # bytes before the first row
    rows: int
    width: int
    dtype: np.dtype
    columns: slice

    @property
    def dim(self) -> int:
        return len(range(self.width)[self.columns])

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows start..stop into `out` (stop - start, dim), which may be a column range of
        a wider array. Straight into `out` where it is the rows' exact bytes, else through
        a buffer of at most _READ_BYTES: nothing larger than `out` is ever allocated."""
        row_bytes = self.width * self.dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * row_bytes)
            exact = self.columns == slice(None) and out.dtype == self.dtype
            if exact and out.flags.c_contiguous:
                view = memoryview(out).cast("B")
                if f.readinto(view) != len(view):
                    raise EOFError(f"{self.path} is shorter than its header says")
                return
            step = max(1, _READ_BYTES // row_bytes)
            for a in range(0, stop - start, step):
                rows = min(step, stop - start - a)
                block = np.fromfile(f, self.dtype, rows * self.width).reshape(rows, self.width)
                out[a : a + rows] = block[:, self.columns]


def open_npy(path: Path, columns: slice = slice(None)) -> _Array:
    """The stored 1-D or 2-D array at `path` (numpy reads its header; nothing is mapped in
    until read, and igpt reads with positioned reads instead)."""
    array = np.load(path, mmap_mode="r")
    if not array.flags.c_contiguous or array.ndim not in (1, 2):
        raise ValueError(f"{path}: expected a C-ordered 1-D or 2-D array, got {array.shape}")
    width = array.shape[1] if array.ndim == 2 else 1
    return _Array(path, array.offset, array.shape[0], width, array.dtype, columns)


class StoredFeatures:
    """An (N, D) float32 matrix of stored feature sets, side by side (columns) and one below
    another (rows), read from disk only when asked, in blocks of at most `max_bytes`.

    Index it with a slice or an integer array to read those rows into memory, as with numpy
    (`x[:]` reads everything). It has no `__array__` on purpose: nothing reads a whole split
    into memory by accident.
    """

    def __init__(self, segments: Sequence[Sequence[_Array]], max_bytes: int):
        self._segments = tuple(tuple(segment) for segment in segments)
        dims = {sum(a.dim for a in segment) for segment in self._segments}
        if len(dims) != 1 or any(len({a.rows for a in s}) != 1 for s in self._segments):
            raise ValueError(
                "stored features side by side need equal rows, one below another equal columns"
            )
        self._starts = np.cumsum([0] + [segment[0].rows for segment in self._segments])
        self.shape = (int(self._starts[-1]), dims.pop())
        self.max_bytes = int(max_bytes)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * 4

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def _read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        bounds = zip(self._segments, self._starts[:-1], self._starts[1:], strict=True)
        for segment, first, end in bounds:
            lo, hi = max(start, first), min(stop, end)
            column = 0
            for array in segment if lo < hi else ():
                part = out[lo - start : hi - start, column : column + array.dim]
                array.read_into(lo - first, hi - first, part)
                column += array.dim

    def take(self, index, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `index` (a 1-D integer array) into `out` (a new (len(index), D) float32
        array if None), as `np.take(x, index, axis=0, out=out)`: each run of consecutive
        indices is one read."""
        index = np.asarray(index)
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise TypeError("stored features are indexed by a slice or a 1-D integer array")
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row indices must be in [0, {len(self)})")
        if out is None:
            out = np.empty((len(index), self.shape[1]), np.float32)
        for a, b in runs_of(index):
            self._read_into(int(index[a]), int(index[b - 1]) + 1, out[a:b])
        return out

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            key = np.arange(*key.indices(len(self)))
        return self.take(key)

    def block_rows(self) -> int:
        """Rows per block of `blocks()`: an eighth of max_bytes, so that a block and what is
        computed from it (a float64 copy for statistics, standardised values) fit."""
        return max(1, self.max_bytes // (8 * self.row_bytes))

    def blocks(self) -> Iterator[np.ndarray]:
        """Consecutive blocks of rows, top to bottom."""
        step = self.block_rows()
        for start in range(0, len(self), step):
            yield self.take(np.arange(start, min(len(self), start + step)))


def runs_of(index: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) positions of the runs of consecutive values in `index`."""
    if not len(index):
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    bounds = [0, *breaks.tolist(), len(index)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def concatenate(parts: Sequence, axis: int):
    """`np.concatenate` for arrays; for stored features, the same matrix without reading it."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts, axis=axis)
    if not all(isinstance(p, StoredFeatures) for p in parts):
        raise TypeError("concatenate arrays with arrays and stored features with stored ones")
    max_bytes = min(p.max_bytes for p in parts)
    if axis == 0:
        return StoredFeatures([s for p in parts for s in p._segments], max_bytes)
    if any(len(p._segments) != 1 for p in parts):
        raise ValueError("only stored features of one row segment can be joined side by side")
    return StoredFeatures([[a for p in parts for a in p._segments[0]]], max_bytes)


def blocks(features) -> Iterator[np.ndarray]:
    """Row blocks of an array (the array itself) or of stored features."""
    if isinstance(features, np.ndarray):
        yield features
    else:
        yield from features.blocks()


def in_memory(parts: Sequence, copies: int = 1) -> list:
    """Arrays and stored features, all read into memory if `copies` copies of the stored
    ones fit in their smallest max_bytes, else as they are."""
    stored = [p for p in parts if isinstance(p, StoredFeatures)]
    if stored and copies * sum(p.nbytes for p in stored) <= min(p.max_bytes for p in stored):
        return [p[:] if isinstance(p, StoredFeatures) else p for p in parts]
    return list(parts)


class FeatureStore:
    """The feature sets of one data split in `directory` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def _read_json(self, name: str) -> dict | None:
        path = self.directory / name
        return json.loads(path.read_text()) if path.exists() else None

    def names(self) -> set[str]:
        """The feature sets that are completely written."""
        return set((self._read_json(STORE_JSON) or {"features": {}})["features"])

    def labels(self) -> np.ndarray:
        return np.load(self.directory / f"{LABELS}.npy")

    def features(self, name: str, max_bytes: int, columns: slice = slice(None)) -> StoredFeatures:
        """Feature set `name` (its `columns`), read in blocks of at most max_bytes."""
        if name not in self.names():
            raise KeyError(f"{self.directory} holds no complete feature set {name!r}")
        return StoredFeatures([[open_npy(self.directory / f"{name}.npy", columns)]], max_bytes)

    def fill(
        self,
        dims: dict[str, int],
        num_examples: int,
        num_batches: int,
        batches: Callable[[int], Iterable[Batch]],
        desc: str = "features",
        sync_seconds: float = 30.0,
    ) -> None:
        """Write feature sets {name: D} of all `num_examples` examples.

        `batches(start)` yields this process's batches from its batch `start` on (of
        `num_batches` at most). Written rows are made durable, and the progress recorded, at most
        every `sync_seconds` and at the end, so a killed pass loses that much work at most.
        """
        process, count = jax.process_index(), jax.process_count()
        key = {
            "features": dims,
            "num_examples": num_examples,
            "num_batches": num_batches,
            "process_count": count,
        }
        if process == 0:
            self._begin(key)
        _barrier(f"igpt-store-begin-{self.directory}")
        progress = self.directory / f"progress-{process}.json"
        done = (self._read_json(progress.name) or {"batches": 0})["batches"]
        targets = {name: open_npy(self.directory / f"{name}.npy") for name in [*dims, LABELS]}
        fds = {name: os.open(a.path, os.O_WRONLY) for name, a in targets.items()}

        def sync(step: int) -> None:  # the rows first, then the record that they are there
            for fd in fds.values():
                os.fsync(fd)
            files.write_json(progress, {"batches": step})

        try:
            last_sync, step = time.monotonic(), done
            show = process == 0
            bar = tqdm(total=num_batches, initial=done, desc=desc, disable=not show, leave=False)
            for step, (index, labels, rows) in enumerate(batches(done), start=done + 1):
                for name, values in [*rows.items(), (LABELS, labels)]:
                    _write_rows(fds[name], targets[name], np.asarray(index), values)
                bar.update()
                if time.monotonic() - last_sync >= sync_seconds:
                    sync(step)
                    last_sync = time.monotonic()
            sync(step)  # a process may have a batch fewer than num_batches
            bar.close()
        finally:
            for fd in fds.values():
                os.close(fd)
        _barrier(f"igpt-store-end-{self.directory}")
        if process == 0:
            self._finish(key)
        _barrier(f"igpt-store-done-{self.directory}")

    def _begin(self, key: dict) -> None:
        """Resume the pass `key` if it is the one in progress, else set its files up (and
        drop the half-written files of a different pass that was killed)."""
        previous = self._read_json(PASS_JSON)
        if previous == key:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("progress-*.json"):
            stale.unlink()
        for name in set((previous or {"features": {}})["features"]) - self.names():
            (self.directory / f"{name}.npy").unlink(missing_ok=True)
        n = key["num_examples"]
        labels = self.directory / f"{LABELS}.npy"
        if not labels.exists() or open_npy(labels).rows != n:
            _allocate(labels, (n,), np.int32)
        for name, dim in key["features"].items():
            _allocate(self.directory / f"{name}.npy", (n, dim), np.float32)
        files.write_json(self.directory / PASS_JSON, key)

    def _finish(self, key: dict) -> None:
        meta = self._read_json(STORE_JSON) or {"features": {}}
        meta = {"num_examples": key["num_examples"], "features": meta["features"] | key["features"]}
        files.write_json(self.directory / STORE_JSON, meta)
        (self.directory / PASS_JSON).unlink()
        for progress in self.directory.glob("progress-*.json"):
            progress.unlink()


def _allocate(path: Path, shape: tuple[int, ...], dtype) -> None:
    """An .npy file of `shape`, its data not yet written (a sparse file: no memory, and disk
    only as rows arrive)."""
    with files.atomic_path(path) as staging:
        np.lib.format.open_memmap(staging, mode="w+", dtype=dtype, shape=shape).flush()


def _write_rows(fd: int, target: _Array, index: np.ndarray, values: np.ndarray) -> None:
    """Write `values[i]` as row `index[i]` of the file open at `fd`."""
    values = np.ascontiguousarray(values, target.dtype)
    row_bytes = target.width * target.dtype.itemsize
    for a, b in runs_of(index):
        data = memoryview(values[a:b]).cast("B")
        position = target.offset + int(index[a]) * row_bytes
        while data:  # a positioned write may write less than asked
            written = os.pwrite(fd, data, position)
            data, position = data[written:], position + written


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
