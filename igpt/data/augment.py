"""Per-example image augmentation, ending at the model resolution.

An augmentation is named by a spec string of `+`-joined parts:

    none           resize the whole image to the model resolution (as the HF processor does)
    resized_crop   the paper's ImageNet crop: resize the short side to s ~ U[256, 384], take a
                   random 224 square, then go down to the model resolution; done in one
                   resampling step as a random square of 224/s of the short side
    pad_crop       the paper's CIFAR crop: at the model resolution, reflect-pad 4 pixels and
                   take a random crop of the original size
    flip           horizontal flip with probability 1/2
    imagenet       = resized_crop;  cifar = pad_crop+flip  (aliases combine: imagenet+flip)

All randomness comes from the `np.random.Generator` passed in, which the pipeline seeds per
example, so augmentation is deterministic and resumable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from igpt.pixels import resize, to_rgb

_ALIASES = {"imagenet": "resized_crop", "cifar": "pad_crop+flip"}
_PARTS = ("none", "resized_crop", "pad_crop", "flip")


@dataclasses.dataclass(frozen=True)
class Augment:
    """What to do to one training image; `Augment()` only resizes.

    Attributes:
      resized_crop: random square crop of a random fraction of the short side.
      pad_crop: reflect-pad `pad` pixels at the model resolution, then a random crop.
      flip: horizontal flip with probability 1/2.
      short_side: the range s is drawn from; the crop is 224/s of the short side (paper).
      pad: padding of `pad_crop`, in pixels at the model resolution.
    """

    resized_crop: bool = False
    pad_crop: bool = False
    flip: bool = False
    short_side: tuple[float, float] = (256.0, 384.0)
    pad: int = 4

    def __post_init__(self):
        if self.resized_crop and self.pad_crop:
            raise ValueError("choose one crop: resized_crop (ImageNet) or pad_crop (CIFAR)")

    @property
    def random(self) -> bool:
        """Whether it draws from its generator (`Augment()` only resizes, and needs none)."""
        return self.resized_crop or self.pad_crop or self.flip

    @classmethod
    def parse(cls, spec: str) -> Augment:
        """`"none"`, `"flip"`, `"imagenet"`, `"cifar"`, `"imagenet+flip"`, ..."""
        parts = {part for name in spec.split("+") for part in _ALIASES.get(name, name).split("+")}
        unknown = parts - set(_PARTS)
        if unknown or ("none" in parts and len(parts) > 1):
            raise ValueError(
                f"unknown augmentation {spec!r}; use 'none', 'imagenet', 'cifar' or a "
                f"'+'-joined subset of {', '.join(_PARTS[1:])}"
            )
        return cls(
            resized_crop="resized_crop" in parts, pad_crop="pad_crop" in parts, flip="flip" in parts
        )

    def __call__(
        self, image: np.ndarray, size: Sequence[int], rng: np.random.Generator | None
    ) -> np.ndarray:
        """uint8 image (H, W, C) -> augmented uint8 RGB (height, width, 3) at `size`; `rng`
        may be None when the augmentation is not `random`."""
        image = to_rgb(image)
        if self.resized_crop:
            image = random_resized_crop(image, size, rng, self.short_side)
        else:
            image = resize(image, size)
        if self.pad_crop:
            image = pad_crop(image, rng, self.pad)
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return np.ascontiguousarray(image)


def random_resized_crop(
    image: np.ndarray,
    size: Sequence[int],
    rng: np.random.Generator,
    short_side: tuple[float, float] = (256.0, 384.0),
) -> np.ndarray:
    """Random crop of 224/s of the short side (s ~ U[short_side]), resized to `size` (bilinear).

    Equivalent to resizing the short side to s, cropping 224 x 224 at a uniform position and
    resizing that to `size`, but with a single resampling. A non-square `size` gets a crop of
    its aspect ratio whose longer side is that fraction of the image's short side.
    """
    height, width = image.shape[:2]
    out_h, out_w = size
    fraction = 224.0 / rng.uniform(*short_side)
    side = fraction * min(height, width) / max(out_h, out_w)
    crop_h, crop_w = side * out_h, side * out_w
    top = rng.uniform(0.0, height - crop_h)
    left = rng.uniform(0.0, width - crop_w)
    box = (left, top, left + crop_w, top + crop_h)
    cropped = Image.fromarray(image).resize(
        (out_w, out_h), resample=Image.Resampling.BILINEAR, box=box
    )
    return np.asarray(cropped)


def central_square(image: np.ndarray) -> np.ndarray:
    """The central square of an image, of side its short side (evaluation's centre crop)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top : top + side, left : left + side]


def pad_crop(image: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Reflect-pad `pad` pixels on each side, then crop the original size at a random offset."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    return padded[top : top + height, left : left + width]
