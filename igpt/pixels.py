"""Images as uint8 RGB arrays: reading files, converting modes, resizing, scaling to [-1, 1].

Each step follows transformers' `ImageGPTImageProcessor` (PIL backend), so the colour
tokenizer, the data pipeline and the raw-pixel probe baseline see exactly the pixels the
processor would.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps


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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully (so a truncated file fails here), upright per its EXIF tag."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """A PIL image or an integer array (H, W), (H, W, 1|3|4) or (N, H, W, 1|3|4) -> uint8 RGB.

    Greyscale is replicated to three channels; an alpha channel (or a palette transparency) is
    composited onto white, as the transformers processor does with `do_convert_rgb=True`.
    16-bit greyscale (PIL modes I;16 and I) is scaled to 8 bits (v / 257, rounded); PIL itself
    reduces 16-bit RGB to 8 bits; CMYK is converted by PIL.
    """
    if isinstance(image, Image.Image):
        if image.mode.startswith("I"):  # 16-bit (I;16, I;16B, ...) or 32-bit integer grey
            # PIL's convert("RGB") clips these at 255, crushing them to black and white.
            values = np.asarray(image, np.int64)
            if values.size and (values.min() < 0 or values.max() > 65535):
                raise ValueError(
                    f"a mode {image.mode} image with values in [{values.min()}, {values.max()}]"
                    " is not a 16-bit image; convert it to 8-bit RGB first"
                )
            grey = np.rint(values / 257.0).astype(np.uint8)  # 0..65535 -> 0..255
            return np.repeat(grey[..., None], 3, axis=-1)
        if image.mode == "F":
            raise ValueError(
                "a 32-bit float image has no fixed value range; convert it to 8-bit RGB first"
            )
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
