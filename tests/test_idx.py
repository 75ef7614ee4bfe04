"""The idx: data source (MNIST-style IDX files)."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from igpt.data import open_source

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x00000800 | array.ndim if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def _write(directory: Path, prefix: str, image_array, label_array, compress=True, **raw) -> Path:
    """IDX files of the arrays; `raw` replaces a file's bytes (images=..., labels=...)."""
    directory.mkdir(parents=True, exist_ok=True)
    for kind, ndim, array in (("images", 3, image_array), ("labels", 1, label_array)):
        data = raw.get(kind) or _idx_bytes(array)
        name = f"{prefix}-{kind}-idx{ndim}-ubyte"
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return directory


def _data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 5, 7), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


@pytest.mark.parametrize("compress", [True, False])
def test_reads_both_splits_as_rgb_with_labels_and_slices(tmp_path, compress):
    train, test = _data(12, 0), _data(5, 1)
    _write(tmp_path, "train", *train, compress=compress)
    _write(tmp_path, "t10k", *test, compress=compress)
    source = open_source(f"idx:{tmp_path}")
    assert len(source) == 12
    for i in (0, 7, -1):
        example = source[i]
        assert example["image"].shape == (5, 7, 3) and example["image"].dtype == np.uint8
        for channel in range(3):  # grey replicated to RGB
            np.testing.assert_array_equal(example["image"][..., channel], train[0][i])
        assert example["label"] == train[1][i]
    held_out = open_source(f"idx:{tmp_path}:train[9:]")
    assert [held_out[i]["label"] for i in range(3)] == list(train[1][9:])
    tested = open_source(f"idx:{tmp_path}:test")
    np.testing.assert_array_equal(tested[4]["image"][..., 0], test[0][4])


def test_bad_files_are_one_line_errors(tmp_path):
    images, labels = _data()
    with pytest.raises(FileNotFoundError, match="no train images file.*dataset-fashion-mnist"):
        open_source(f"idx:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        open_source(f"idx:{tmp_path / 'missing'}")
    wrong_magic = _write(tmp_path / "magic", "train", images, labels,
                         images=_idx_bytes(images, magic=0x00000D03))  # fmt: skip
    with pytest.raises(ValueError, match="magic number 0x00000d03"):
        open_source(f"idx:{wrong_magic}")
    counts = _write(tmp_path / "counts", "train", images, labels[:-1])
    with pytest.raises(ValueError, match="holds 12 images but .* holds 11 labels"):
        open_source(f"idx:{counts}")
    cut = _write(tmp_path / "cut", "train", images, labels, images=_idx_bytes(images)[:-10])
    with pytest.raises(ValueError, match="truncated: shape \\(12, 5, 7\\) needs 420 bytes"):
        open_source(f"idx:{cut}")
    not_gzip = _write(tmp_path / "gz", "train", images, labels, compress=False)
    (not_gzip / "train-labels-idx1-ubyte").rename(not_gzip / "train-labels-idx1-ubyte.gz")
    with pytest.raises(ValueError, match="cannot read IDX file"):
        open_source(f"idx:{not_gzip}")


@pytest.mark.skipif(
    not FASHION.is_dir(), reason="the real Fashion-MNIST is not installed (apt-get install "
    "dataset-fashion-mnist)"
)  # fmt: skip
def test_real_fashion_mnist():
    train, test = open_source(f"idx:{FASHION}"), open_source(f"idx:{FASHION}:test")
    assert (len(train), len(test)) == (60_000, 10_000)
    labels = np.array([test[i]["label"] for i in range(len(test))])
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
    assert train[0]["image"].shape == (28, 28, 3) and train[0]["label"] == 9  # an ankle boot
