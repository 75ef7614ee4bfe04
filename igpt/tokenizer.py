"""Colour tokenizer: RGB images <-> ImageGPT colour-cluster ids.

Each pixel becomes the index of its nearest colour cluster (k-means centres in [-1, 1]^3),
in raster order, with no start-of-sequence token. The preprocessing follows transformers'
`ImageGPTImageProcessor` (PIL backend) step by step, so ids agree with it:

1. convert to RGB: greyscale is replicated, transparency is composited onto white;
2. resize to (H, W) with PIL bilinear (an image already at (H, W) is left as it is);
3. scale the uint8 value u to `x/127.5 - 1` with the processor's float32 rounding
   (`float32(u * (1/255))`, then `(v - 0.5) / 0.5` in float32), see `PIXEL_LEVELS`;
4. pick the cluster with the smallest squared distance, the lowest id on an exact tie.

Step 4 is exact (float64 distances), where the processor computes `|a|^2 - 2ab + |b|^2` in
float32, so the two can disagree only where two clusters are equidistant within float32
rounding. Because resized pixels are uint8, the nearest cluster of every one of the 2^24
colours is tabulated once per palette (about a second for 512 clusters, 32 MiB) and encoding
is then a table look-up.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

PREPROCESSOR_CONFIG = "preprocessor_config.json"
DEFAULT_SIZE = (32, 32)  # the released models' resolution


def _pixel_levels() -> np.ndarray:
    u = np.arange(256, dtype=np.float64)
    # The processor rescales in float64, casts to float32, then normalises with float32 mean
    # and std 0.5; for half of the 256 levels this differs by one ulp from float32(u/127.5 - 1).
    v = (u * (1 / 255)).astype(np.float32)
    return (v - np.float32(0.5)) / np.float32(0.5)


PIXEL_LEVELS = _pixel_levels()  # (256,) float32: uint8 value -> model-space value in [-1, 1]


def pixel_values(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 values in [-1, 1], exactly as the transformers processor scales."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"pixel_values expects uint8 pixels, got dtype {images.dtype}")
    return PIXEL_LEVELS[images]


# ----------------------------------------------------------------------------------------------
# Images -> RGB uint8 arrays at a given size


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully (so a truncated file fails here), upright per its EXIF tag."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """A PIL image or an integer array (H, W), (H, W, 1|3|4) or (N, H, W, 1|3|4) -> uint8 RGB.

    Greyscale is replicated to three channels; an alpha channel (or a palette transparency) is
    composited onto white, as the transformers processor does with `do_convert_rgb=True`.
    """
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        return np.asarray(image.convert("RGB"))
    array = _as_uint8(image)
    if array.ndim == 2:
        array = array[..., None]
    channels = array.shape[-1]
    if array.ndim not in (3, 4) or channels not in (1, 3, 4):
        raise ValueError(
            f"expected an image of shape (H, W), (H, W, C) or a batch (N, H, W, C) with C in "
            f"1, 3, 4; got shape {array.shape}. A batch of greyscale images needs a trailing "
            "channel axis: (N, H, W, 1)."
        )
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        alpha = array[..., 3:] / 255.0
        return np.round(alpha * array[..., :3] + (1.0 - alpha) * 255.0).astype(np.uint8)
    return array


def _as_uint8(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"expected uint8 pixels in 0..255, got dtype {array.dtype}. Convert floats in [0, 1] "
            "with `np.rint(x * 255).astype(np.uint8)`."
        )
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(
            f"integer pixels must lie in 0..255, got [{array.min()}, {array.max()}]; "
            "rescale to 8 bits first"
        )
    return array.astype(np.uint8)


def as_size(size: int | Sequence[int]) -> tuple[int, int]:
    """An int or (height, width) -> (height, width), checked positive."""
    height, width = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (height, width), got {size!r}")
    return int(height), int(width)


def resize(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (height, width, 3) with PIL bilinear, as the processor resizes.

    An image that already has the target size is returned unchanged (PIL would copy it).
    """
    height, width = as_size(size)
    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), resample=Image.Resampling.BILINEAR)
    return np.asarray(resized)


def prepare_images(images, size: int | Sequence[int]) -> np.ndarray:
    """Any supported image input -> a uint8 batch (B, height, width, 3), ready to look up.

    `images` is a PIL image, a path, an integer array (H, W), (H, W, 1|3|4) or (N, H, W, 1|3|4),
    or a list of single images (PIL images, paths, arrays). A batch array of the target size
    goes through without touching PIL.
    """
    size = as_size(size)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        batch = to_rgb(images)
        if batch.shape[1:3] == size:
            return batch
        return np.stack([resize(image, size) for image in batch])
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("no images given: pass at least one image")
    return np.stack([resize(_single_rgb(image), size) for image in images])


def _single_rgb(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        return to_rgb(load_image(image))
    if isinstance(image, Image.Image):
        return to_rgb(image)
    array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise ValueError(
            f"a list element must be one image of shape (H, W) or (H, W, C), got shape "
            f"{array.shape}; pass a batch as one (N, H, W, C) array instead of inside a list"
        )
    return to_rgb(array)


# ----------------------------------------------------------------------------------------------
# Nearest-cluster table over all 2^24 colours

_CELL = 8  # side of the colour cells, in uint8 steps; 32^3 cells of 8^3 colours
_ENCODE_CHUNK = 2**18  # pixels looked up at a time


def nearest_cluster_table(clusters: np.ndarray) -> np.ndarray:
    """The nearest cluster of every uint8 colour, indexed by `r << 16 | g << 8 | b`.

    Distances are squared Euclidean in float64 between `PIXEL_LEVELS` values and the clusters;
    ties go to the lowest id, as `argmin` does. The colour cube is cut into 8^3-colour cells.
    Some cluster is within distance U of every colour of a cell, U being the smallest over
    clusters of their largest distance to the cell; so a cluster whose smallest distance to the
    cell exceeds U is never nearest there. Only the remaining candidates (about 3 to 7 per cell
    for 512 clusters) are compared, exactly, colour by colour.
    """
    centres = np.asarray(clusters, np.float64)
    n = 256 // _CELL
    candidates = _cell_candidates(centres.astype(np.float32), n)  # (n, n, n, K) bool
    counts = candidates.sum(-1).reshape(-1)
    candidates = candidates.reshape(n**3, -1)
    dtype = np.uint16 if len(centres) <= 2**16 else np.int32
    table = np.empty((n, _CELL) * 3, dtype)  # axes: r cell, r in cell, g cell, g in cell, ...
    cell_r, cell_g, cell_b = np.unravel_index(np.arange(n**3), (n, n, n))
    offsets = np.arange(_CELL)
    levels = PIXEL_LEVELS.astype(np.float64)
    # Cells with the same number of candidates are evaluated together as one dense array.
    order = np.argsort(counts, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(counts[order])) + 1)
    for group in groups:
        m = int(counts[group[0]])
        ids = np.nonzero(candidates[group])[1].reshape(len(group), m)  # ascending per cell
        step = max(1, 2**22 // (_CELL**3 * m))  # bounds the temporaries to ~32 MiB
        for start in range(0, len(group), step):
            cells, cand = group[start : start + step], ids[start : start + step]
            r, g, b = cell_r[cells], cell_g[cells], cell_b[cells]
            if m == 1:
                best = np.broadcast_to(cand[:, :1, None, None], (len(cells),) + (_CELL,) * 3)
            else:
                c = centres[cand]  # (cells, m, 3)
                per_axis = [
                    (levels[axis[:, None] * _CELL + offsets][:, :, None] - c[:, None, :, ch]) ** 2
                    for ch, axis in enumerate((r, g, b))
                ]  # each (cells, 8, m)
                dist = np.empty((len(cells),) + (_CELL,) * 3 + (m,))
                np.add(per_axis[0][:, :, None, None, :], per_axis[1][:, None, :, None, :], out=dist)
                dist += per_axis[2][:, None, None, :, :]
                nearest = dist.argmin(-1).reshape(len(cells), -1)  # first minimum = lowest id
                best = cand[np.arange(len(cells))[:, None], nearest].reshape(dist.shape[:-1])
            table[r, :, g, :, b, :] = best
    return table.reshape(-1)


def _cell_candidates(centres: np.ndarray, n: int) -> np.ndarray:
    """(n, n, n, K) bool: clusters that may be nearest to some colour of each cell."""
    first = PIXEL_LEVELS[np.arange(n) * _CELL][:, None]  # (n, 1) low edge of each cell
    last = PIXEL_LEVELS[np.arange(n) * _CELL + _CELL - 1][:, None]
    near, far = [], []  # per channel (n, K): smallest / largest squared distance along it
    for ch in range(3):
        c = centres[None, :, ch]
        gap = np.maximum(np.maximum(first - c, c - last), 0)
        near.append(gap * gap)
        far.append(np.maximum((c - first) ** 2, (c - last) ** 2))
    candidates = np.empty((n, n, n, len(centres)), bool)
    for i in range(n):  # one slab of cells at a time keeps the temporaries small
        worst = (far[0][i] + far[1][:, None, :] + far[2][None, :, :]).min(-1)  # (n, n)
        best = near[0][i] + near[1][:, None, :] + near[2][None, :, :]
        # float32 bounds with a margin: over-including a candidate costs time, never accuracy.
        np.less_equal(best, (worst * (1 + 1e-5) + 1e-6)[..., None], out=candidates[i])
    return candidates


# ----------------------------------------------------------------------------------------------


class ColorTokenizer:
    """Maps images to colour-cluster ids and back.

    Args:
      clusters: (K, 3) colour clusters in [-1, 1] (K = 512 for the released models).
      size: default (height, width) that `encode` resizes to and `decode` expects.
    """

    def __init__(self, clusters, size: int | Sequence[int] = DEFAULT_SIZE):
        self._clusters = _validate_clusters(clusters)
        self._clusters.setflags(write=False)
        self.size = as_size(size)
        self._table: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def clusters(self) -> np.ndarray:
        """(K, 3) float32 colour clusters in [-1, 1] (read-only)."""
        return self._clusters

    @property
    def num_clusters(self) -> int:
        """K, the number of colour clusters (ids run 0..K-1)."""
        return len(self._clusters)

    def __repr__(self) -> str:
        return f"ColorTokenizer(num_clusters={self.num_clusters}, size={self.size})"

    # -- files -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ColorTokenizer:
        """Read a transformers `preprocessor_config.json` (the file, or a directory holding it).

        Uses its `clusters` and, when present, its `size`.
        """
        path = Path(path)
        file = path / PREPROCESSOR_CONFIG if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no {PREPROCESSOR_CONFIG} at {path}; pass the file or the model directory "
                "that holds it (transformers ImageGPT checkpoints ship one)"
            )
        config = json.loads(file.read_text())
        if "clusters" not in config:
            raise ValueError(
                f"{file} has no 'clusters' entry; it is not an ImageGPT preprocessor config "
                "(it needs a K x 3 list of colour clusters)"
            )
        size = config.get("size") or {}
        if "height" in size and "width" in size:
            return cls(config["clusters"], size=(size["height"], size["width"]))
        return cls(config["clusters"])

    @classmethod
    def from_npy(cls, path: str | os.PathLike, size: int | Sequence[int] = DEFAULT_SIZE):
        """Read a (K, 3) `.npy` palette, e.g. OpenAI's `kmeans_centers.npy`."""
        return cls(np.load(path), size=size)

    def save(self, path: str | os.PathLike) -> None:
        """Write the clusters as a (K, 3) float32 `.npy` file (readable by `from_npy`)."""
        np.save(path, self._clusters)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write a transformers-compatible `preprocessor_config.json` into `directory`.

        `transformers.ImageGPTImageProcessor.from_pretrained(directory)` reads it back.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "image_processor_type": "ImageGPTImageProcessor",
            "clusters": self._clusters.tolist(),
            "do_color_quantize": True,
            "do_normalize": True,
            "do_resize": True,
            "resample": 2,
            "size": {"height": self.size[0], "width": self.size[1]},
        }
        file = directory / PREPROCESSOR_CONFIG
        file.write_text(json.dumps(config) + "\n")
        return file

    # -- encode / decode -------------------------------------------------------------------

    def encode(self, images, size: int | Sequence[int] | None = None) -> np.ndarray:
        """Images -> int32 ids (B, height * width), raster order, no start-of-sequence token.

        `images`: a PIL image, a file path, an integer array (H, W), (H, W, 1|3|4) or a batch
        (N, H, W, 1|3|4), or a list of single images. `size` (int or (height, width)) defaults
        to `self.size`.
        """
        batch = prepare_images(images, self.size if size is None else size)
        return self.encode_pixels(batch).reshape(len(batch), -1)

    def encode_pixels(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB (..., 3) -> int32 ids (...): the nearest cluster per pixel, no resizing."""
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.shape[-1:] != (3,):
            raise ValueError(
                f"encode_pixels expects uint8 RGB pixels (..., 3), got {rgb.dtype} {rgb.shape}; "
                "use `encode` for other image inputs"
            )
        flat = rgb.reshape(-1, 3)
        ids = np.empty(len(flat), np.int32)
        table = self.table
        # Chunks keep the index temporaries in cache and out of fresh (page-faulting) memory.
        for start in range(0, len(flat), _ENCODE_CHUNK):
            part = flat[start : start + _ENCODE_CHUNK]
            index = part[:, 0].astype(np.int32)
            index <<= 8
            index |= part[:, 1]
            index <<= 8
            index |= part[:, 2]
            ids[start : start + len(part)] = table.take(index)
        return ids.reshape(rgb.shape[:-1])

    def decode(self, ids, size: int | Sequence[int] | None = None) -> np.ndarray:
        """Ids (B, height * width), (height * width,) or (B, height, width) -> uint8 (B, H, W, 3).

        Each pixel is `rint(127.5 * (cluster + 1))`, the colour the model's token stands for.
        """
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        if ids.ndim == 3:
            size = ids.shape[1:]
        elif ids.ndim in (1, 2):
            ids = ids.reshape(-1, ids.shape[-1])
        else:
            raise ValueError(f"ids must be (B, H*W), (H*W,) or (B, H, W); got shape {ids.shape}")
        height, width = self.size if size is None else as_size(size)
        if ids.shape[1:] not in ((height * width,), (height, width)):
            raise ValueError(
                f"ids of shape {ids.shape} do not hold {height}x{width} images; pass the "
                "matching `size=(height, width)`"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_clusters):
            raise ValueError(
                f"ids must lie in 0..{self.num_clusters - 1} (colour clusters), got "
                f"[{ids.min()}, {ids.max()}]; strip any start-of-sequence token first"
            )
        colours = np.rint(127.5 * (self._clusters.astype(np.float64) + 1.0))
        colours = np.clip(colours, 0, 255).astype(np.uint8)
        return colours[ids].reshape(len(ids), height, width, 3)

    @property
    def table(self) -> np.ndarray:
        """(2^24,) nearest-cluster id of every colour `r << 16 | g << 8 | b`; built on first use."""
        if self._table is None:
            with self._lock:
                if self._table is None:
                    self._table = nearest_cluster_table(self._clusters)
        return self._table

    # The table is a cache: worker processes rebuild it instead of receiving 32 MiB each.
    def __getstate__(self):
        return {"clusters": self._clusters, "size": self.size}

    def __setstate__(self, state):
        self.__init__(state["clusters"], size=state["size"])


def _validate_clusters(clusters) -> np.ndarray:
    try:
        array = np.array(clusters, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"clusters must be a (K, 3) array of numbers, got {type(clusters).__name__} ({error})"
        ) from None
    if array.ndim != 2 or array.shape[1] != 3 or len(array) == 0:
        raise ValueError(
            f"clusters must have shape (K, 3) with K >= 1 (one RGB colour per row), got "
            f"{array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("clusters contain NaN or infinite values")
    if array.min() < -1 or array.max() > 1:
        raise ValueError(
            f"clusters must lie in [-1, 1] (pixel values x/127.5 - 1), got "
            f"[{array.min():.4g}, {array.max():.4g}]; for colours in 0..255 use c/127.5 - 1"
        )
    return array
