"""Image grids as PNG files: sample sheets and the completion figure of the iGPT paper.

Everything here works on uint8 RGB arrays (..., H, W, 3), the tokenizer's `decode` output.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

GREY = 128  # fill for the hidden part of an occluded image


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of (..., H, W, 3) by an integer factor: each pixel
    becomes a factor x factor block, so the colour tokens stay visible as they are."""
    if factor < 1:
        raise ValueError(f"upscale factor must be >= 1, got {factor}")
    return np.repeat(np.repeat(images, factor, axis=-3), factor, axis=-2)


def auto_scale(side: int, target: int = 96) -> int:
    """The integer factor that brings an image of `side` pixels to at least `target` pixels."""
    return max(1, -(-target // side))


def occlude(images: np.ndarray, rows_kept: int, fill: int = GREY) -> np.ndarray:
    """A copy of (..., H, W, 3) images with every row from `rows_kept` down set to `fill`."""
    out = np.array(images, copy=True)
    out[..., rows_kept:, :, :] = fill
    return out


def grid(images: np.ndarray, pad: int = 2, background: int = 255) -> np.ndarray:
    """Tile (rows, cols, H, W, 3) uint8 images into one (H', W', 3) picture with `pad` pixels
    of `background` between and around them."""
    images = np.asarray(images)
    if images.ndim != 5 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"grid expects uint8 images (rows, cols, H, W, 3); got {images.dtype} {images.shape}"
        )
    rows, cols, h, w, _ = images.shape
    out = np.full((pad + rows * (h + pad), pad + cols * (w + pad), 3), background, np.uint8)
    for r in range(rows):
        for c in range(cols):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            out[top : top + h, left : left + w] = images[r, c]
    return out


def sample_sheet(images: np.ndarray, scale: int = 1, cols: int | None = None) -> np.ndarray:
    """(N, H, W, 3) samples as a near-square grid (`cols` per row, default ceil(sqrt(N))); a
    short last row is filled with blank tiles."""
    n = len(images)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    blank = np.full((rows * cols - n, *images.shape[1:]), 255, np.uint8)
    tiles = np.concatenate([images, blank]).reshape(rows, cols, *images.shape[1:])
    return grid(upscale(tiles, scale))


def completion_sheet(
    originals: np.ndarray, completions: np.ndarray, rows_kept: int, scale: int = 1
) -> np.ndarray:
    """The paper's completion figure: per input image one row of the occluded input (rows below
    `rows_kept` greyed), the completions, then the original.

    originals: (N, H, W, 3); completions: (N, C, H, W, 3).
    """
    tiles = np.concatenate(
        [occlude(originals, rows_kept)[:, None], completions, originals[:, None]], axis=1
    )
    return grid(upscale(tiles, scale))


def save_png(path: str | os.PathLike, picture: np.ndarray) -> Path:
    """Write a (H, W, 3) uint8 picture as PNG, creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(picture, np.uint8)).save(path, format="PNG")
    return path
