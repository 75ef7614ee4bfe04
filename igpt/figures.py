"""Pictures: sample sheets, the completion figure of the iGPT paper, and line charts, as PNG.

The grids work on uint8 RGB arrays (..., H, W, 3), the tokenizer's `decode` output. Charts
(probe accuracy by layer, fine-tuning curves) are drawn by matplotlib, an optional dependency.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
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


def fill_in_sheet(
    originals: np.ndarray, masked_NxHxW: np.ndarray, filled: np.ndarray, scale: int = 1
) -> np.ndarray:
    """A BERT model's picture, one column per image: the masked input (masked pixels red, a
    colour no greyscale or natural image palette confuses with its own),
    the model's fill (its most likely colour at each masked pixel), then the original.

    originals, filled: (N, H, W, 3); masked_NxHxW: (N, H, W) bool.
    """
    shown = np.where(masked_NxHxW[..., None], np.array(COLOURS[3], np.uint8), originals)
    return grid(upscale(np.stack([shown, filled, originals]), scale))


def save_png(path: str | os.PathLike, picture: np.ndarray) -> Path:
    """Write a (H, W, 3) uint8 picture as PNG, creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(picture, np.uint8)).save(path, format="PNG")
    return path


# Distinguishable on white and in greyscale print: matplotlib's first Tableau colours.
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
REFERENCE_COLOUR = (110, 110, 110)
REFERENCE_STYLES = ("--", "-.", ":")  # several references stay apart in one grey


def line_chart(
    path: str | os.PathLike,
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    references: dict[str, float] | None = None,
    highlight_x: float | None = None,
    size: tuple[int, int] = (800, 500),
) -> Path | None:
    """Draw each of `series` (name -> y values at `x`) as a line with markers, as a PNG.

    `references` are named horizontal dashed lines (e.g. a baseline); `highlight_x` gets a
    dotted vertical line (e.g. the best layer). Needs matplotlib (`pip install igpt[plots]`);
    without it nothing is drawn, a warning says so, and None is returned.
    """
    if not series or any(len(ys) != len(x) for ys in series.values()) or not len(x):
        raise ValueError("line_chart needs at least one point and series as long as x")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        from matplotlib import pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        warnings.warn(f"matplotlib is not installed: not drawing {path} (pip install "
                      "igpt[plots])", stacklevel=2)  # fmt: skip
        return None

    def rgb(colour):
        return tuple(c / 255 for c in colour)

    dpi = 100
    figure, axes = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    for i, (name, ys) in enumerate(series.items()):
        axes.plot(x, ys, marker="o", markersize=4, linewidth=2, label=name,
                  color=rgb(COLOURS[i % len(COLOURS)]))  # fmt: skip
    for i, (name, level) in enumerate((references or {}).items()):
        style = REFERENCE_STYLES[i % len(REFERENCE_STYLES)]
        axes.axhline(level, linestyle=style, linewidth=1.5, color=rgb(REFERENCE_COLOUR), label=name)
    if highlight_x is not None:
        axes.axvline(highlight_x, linestyle=":", color="0.6")
    if all(float(v).is_integer() for v in x):  # layer numbers: integer ticks only
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(color="0.92")
    axes.legend(loc="lower right")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path
