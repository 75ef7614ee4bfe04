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
float32, so the two can disagree only where two palette are equidistant within float32
rounding. Because resized pixels are uint8, the nearest cluster of every one of the 2^24
colours is tabulated once per palette (about a second for 512 palette, 32 MiB) and encoding
is then a table look-up.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from igpt.pixels import PIXEL_LEVELS, as_size, prepare_images

PREPROCESSOR_CONFIG = "preprocessor_config.json"
DEFAULT_SIZE = (32, 32)  # the released models' resolution


# ----------------------------------------------------------------------------------------------
# Nearest-cluster table over all 2^24 colours

_CELL = 8  # side of the colour cells, in uint8 steps; 32^3 cells of 8^3 colours
_ENCODE_CHUNK = 2**18  # pixels looked up at a time


def nearest_colour_table(palette: np.ndarray) -> np.ndarray:
    """The nearest cluster of every uint8 colour, indexed by `r << 16 | g << 8 | b`.

    Distances are squared Euclidean in float64 between `PIXEL_LEVELS` values and the palette;
    ties go to the lowest id, as `argmin` does. The colour cube is cut into 8^3-colour cells.
    Some cluster is within distance U of every colour of a cell, U being the smallest over
    palette of their largest distance to the cell; so a cluster whose smallest distance to the
    cell exceeds U is never nearest there. Only the remaining candidates (about 3 to 7 per cell
    for 512 palette) are compared, exactly, colour by colour.
    """
    centres = np.asarray(palette, np.float64)
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
    """(n, n, n, K) bool: palette that may be nearest to some colour of each cell."""
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
      palette: (K, 3) colour palette in [-1, 1] (K = 512 for the released models).
      size: default (height, width) that `encode` resizes to and `decode` expects.
    """

    def __init__(self, palette, size: int | Sequence[int] = DEFAULT_SIZE):
        self._palette = _validate_palette(palette)
        self._palette.setflags(write=False)
        self.size = as_size(size)
        self._table: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def palette(self) -> np.ndarray:
        """(K, 3) float32 colour palette in [-1, 1] (read-only)."""
        return self._palette

    @property
    def palette_size(self) -> int:
        """K, the number of colour palette (ids run 0..K-1)."""
        return len(self._palette)

    def __repr__(self) -> str:
        return f"ColorTokenizer(palette_size={self.palette_size}, size={self.size})"

    # -- files -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ColorTokenizer:
        """Read a transformers `preprocessor_config.json` (the file, or a directory holding it).

        Uses its `palette` and, when present, its `size`.
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
                f"{file} has no 'palette' entry; it is not an ImageGPT preprocessor config "
                "(it needs a K x 3 list of colour palette)"
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
        """Write the palette as a (K, 3) float32 `.npy` file (readable by `from_npy`)."""
        np.save(path, self._palette)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write a transformers-compatible `preprocessor_config.json` into `directory`.

        `transformers.ImageGPTImageProcessor.from_pretrained(directory)` reads it back.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "image_processor_type": "ImageGPTImageProcessor",
            "clusters": self._palette.tolist(),
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
        if ids.size and (ids.min() < 0 or ids.max() >= self.palette_size):
            raise ValueError(
                f"ids must lie in 0..{self.palette_size - 1} (colour palette), got "
                f"[{ids.min()}, {ids.max()}]; strip any start-of-sequence token first"
            )
        colours = np.rint(127.5 * (self._palette.astype(np.float64) + 1.0))
        colours = np.clip(colours, 0, 255).astype(np.uint8)
        return colours[ids].reshape(len(ids), height, width, 3)

    @property
    def table(self) -> np.ndarray:
        """(2^24,) nearest-cluster id of every colour `r << 16 | g << 8 | b`; built on first use."""
        if self._table is None:
            with self._lock:
                if self._table is None:
                    self._table = nearest_colour_table(self._palette)
        return self._table

    # The table is a cache: worker processes rebuild it instead of receiving 32 MiB each.
    def __getstate__(self):
        return {"palette": self._palette, "size": self.size}

    def __setstate__(self, state):
        self.__init__(state["palette"], size=state["size"])


def _validate_palette(palette) -> np.ndarray:
    try:
        array = np.array(palette, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"palette must be a (K, 3) array of numbers, got {type(palette).__name__} ({error})"
        ) from None
    if array.ndim != 2 or array.shape[1] != 3 or len(array) == 0:
        raise ValueError(
            f"palette must have shape (K, 3) with K >= 1 (one RGB colour per row), got "
            f"{array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("palette contain NaN or infinite values")
    if array.min() < -1 or array.max() > 1:
        raise ValueError(
            f"palette must lie in [-1, 1] (pixel values x/127.5 - 1), got "
            f"[{array.min():.4g}, {array.max():.4g}]; for colours in 0..255 use c/127.5 - 1"
        )
    return array
