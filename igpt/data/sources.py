"""Random-access image datasets behind one interface.

Every source has `len(source)`, `source[i] -> {"image": uint8 (H, W, 3), "label": int}` (label
-1 when unlabelled), `source.describe(i)` naming the file or record behind example i, and
`source.label_names` (class names, or None). `open_source` builds one from a spec string:

    tfds:NAME[:SPLIT]   a tensorflow_datasets dataset prepared in array_record format, read
                        with `tfds.data_source` (no TensorFlow needed); SPLIT defaults to train.
                        NAME may carry a config and version: imagenet_resized/32x32:validation
    digits[:SPLIT]      scikit-learn's 1,797 real 8x8 handwritten digits, embedded in igpt;
                        SPLIT is train (1,297 examples) or test (500)
    folder:PATH         image files; one subfolder per class (labels follow the sorted
                        subfolder names) or a flat folder (unlabelled)
    npz:PATH            an .npz with `images` (N, H, W, 3) or grey (N, H, W) uint8 and
                        optional `labels` (N,)
    idx:DIR[:SPLIT]     the IDX files of MNIST-style datasets in DIR (see igpt.data.idx);
                        SPLIT is train (default) or test; grey images become RGB

Any spec may end in a slice, as in tfds: `tfds:cifar10:train[:90%]`, `digits:train[90%:]`,
`folder:/data/pets[:1000]`, `npz:x.npz[100:-100]`. Slices are taken here, on top of random
access, for every source (so a validation split can be carved out of a training split).
Percent boundaries round to the nearest example.
"""

from __future__ import annotations

import math
import os
import re
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from igpt.data import idx
from igpt.pixels import load_image, to_rgb

SPEC_FORMS = (
    "tfds:NAME[:SPLIT] (e.g. tfds:cifar10:train, tfds:imagenet_resized/32x32:validation), "
    "digits[:SPLIT] (SPLIT train or test), folder:PATH, npz:PATH, idx:DIR[:SPLIT] (SPLIT "
    "train or test); any of them may end in a "
    "slice such as [:90%], [90%:] or [:1000]"
)


class UnreadableImageError(ValueError):
    """An image file or dataset record that cannot be decoded; the message names it."""


def _check_index(index: int, length: int) -> int:
    index = int(index)
    if not -length <= index < length:
        raise IndexError(f"index {index} out of range for a source of {length} examples")
    return index % length


class ArraySource:
    """Examples held in memory: uint8 images, RGB (N, H, W, 3) or grey (N, H, W) or
    (N, H, W, 1), and optional integer labels (N,). Grey images are stored as they are and
    returned as RGB."""

    def __init__(self, images, labels=None, *, name: str = "arrays", label_names=None):
        images = np.asarray(images)
        grey = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 1)
        if images.dtype != np.uint8 or not (grey or images.ndim == 4 and images.shape[-1] == 3):
            raise ValueError(
                f"{name}: images must be a uint8 array (N, H, W, 3) or grey (N, H, W), got "
                f"{images.dtype} {images.shape}"
            )
        if labels is None:
            labels = np.full(len(images), -1, np.int64)
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{name}: labels must be integers of shape ({len(images)},) to match the "
                f"images, got {labels.dtype} {labels.shape}"
            )
        self.images, self.labels = images, labels
        self.name, self.label_names = name, label_names

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        index = _check_index(index, len(self))
        return {"image": to_rgb(self.images[index]), "label": int(self.labels[index])}

    def describe(self, index: int) -> str:
        """Where example `index` comes from, for messages."""
        return f"{self.name} example {index}"


class FolderSource:
    """Image files under `root`, read with PIL and converted to RGB.

    With subfolders, each subfolder is a class (label = position of its name in sorted order)
    and holds that class's images at any depth; without subfolders, the folder's images are
    unlabelled (-1). Files are ordered by path. Files PIL does not know by extension are
    ignored, so stray text files do no harm.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder source: {self.root} is not a directory")
        known = set(Image.registered_extensions())
        subfolders = sorted(p for p in self.root.iterdir() if p.is_dir() and _visible(p))
        loose = sorted(p for p in self.root.iterdir() if _is_image(p, known))
        if subfolders and loose:
            raise ValueError(
                f"folder source {self.root} mixes class subfolders with {len(loose)} loose "
                f"image(s) (e.g. {loose[0].name}); move them into a class folder, or point at "
                "a folder of images only for an unlabelled source"
            )
        files, labels = loose, [-1] * len(loose)
        for label, folder in enumerate(subfolders):
            found = sorted(p for p in folder.rglob("*") if _is_image(p, known))
            files += found
            labels += [label] * len(found)
        if not files:
            raise ValueError(
                f"folder source {self.root} holds no image files (extensions PIL can open, "
                "such as .png or .jpg)"
            )
        self.files = files
        self.labels = np.asarray(labels, np.int64)
        self.label_names = [p.name for p in subfolders] or None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        index = _check_index(index, len(self))
        path = self.files[index]
        try:
            image = to_rgb(load_image(path))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise UnreadableImageError(f"cannot read image {path}: {error}") from error
        return {"image": image, "label": int(self.labels[index])}

    def describe(self, index: int) -> str:
        """The file behind example `index`."""
        return str(self.files[index])


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_image(path: Path, known: set[str]) -> bool:
    return path.is_file() and _visible(path) and path.suffix.lower() in known


class TfdsSource:
    """A tensorflow_datasets split prepared in array_record format, via `tfds.data_source`.

    Reading needs no TensorFlow. `image_key` / `label_key` name the record's features
    (cifar10, cifar100 and imagenet_resized use "image" and "label"); a record without the
    label key is unlabelled (-1). Greyscale or RGBA images are converted to RGB.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        *,
        data_dir: str | os.PathLike | None = None,
        image_key: str = "image",
        label_key: str = "label",
    ):
        import tensorflow_datasets as tfds  # slow to import; only tfds sources need it

        try:
            self._data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as error:  # tfds raises many types here; all mean "not available"
            raise ValueError(
                f"cannot open tfds dataset {name!r} split {split!r} ({type(error).__name__}: "
                f"{error}). Prepare it once in array_record format, e.g. `tfds build {name} "
                "--file_format=array_record`, and point TFDS_DATA_DIR (or data_dir) at it"
            ) from error
        self.name, self.split = name, split
        self.image_key, self.label_key = image_key, label_key
        features = self._data.dataset_info.features
        feature = features[label_key] if label_key in features else None
        self.label_names = list(feature.names) if hasattr(feature, "names") else None

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict:
        index = _check_index(index, len(self))
        try:
            record = self._data[index]
            image = to_rgb(np.asarray(record[self.image_key]))
        except Exception as error:  # a decoder failure of any kind: name the record
            raise UnreadableImageError(f"cannot read {self.describe(index)}: {error}") from error
        label = record.get(self.label_key, -1) if self.label_key else -1
        return {"image": image, "label": int(label)}

    def describe(self, index: int) -> str:
        """The dataset record behind example `index`."""
        return f"tfds:{self.name}:{self.split} record {index}"


class SubsetSource:
    """The examples `indices` of `parent`, in that order (slices, skipped unreadable files)."""

    def __init__(self, parent, indices, skipped: list[str] | None = None):
        self.parent = parent
        self.indices = np.asarray(indices, np.int64)
        self.label_names = getattr(parent, "label_names", None)
        self.skipped = skipped or []  # descriptions of examples left out as unreadable

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.parent[int(self.indices[_check_index(index, len(self))])]

    def describe(self, index: int) -> str:
        """Where example `index` comes from, in the parent's terms."""
        return self.parent.describe(int(self.indices[index]))


# ----------------------------------------------------------------------------------------------
# The embedded digits


DIGITS_FILE = "digits.npz"


def digits_source(split: str = "train") -> ArraySource:
    """scikit-learn's `load_digits`: 1,797 labelled 8x8 digits, as RGB uint8 images.

    Grey levels 0..16 map to `rint(v * 255 / 16)`, replicated to three channels. The split is
    fixed: `test` is the 500 examples `np.sort(np.random.default_rng(0).permutation(1797)[:500])`
    and `train` the other 1,297, both in the original order. `digits.npz` stores the raw levels
    and labels exactly as `sklearn.datasets.load_digits()` returns them, plus `test_index`, so
    the split never changes with numpy's random streams and sklearn is not needed at runtime.
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits has the splits 'train' and 'test', got {split!r}")
    with resources.files("igpt.data").joinpath(DIGITS_FILE).open("rb") as file:
        data = np.load(file)
        levels, labels, test_index = data["levels"], data["labels"], data["test_index"]
    in_test = np.zeros(len(levels), bool)
    in_test[test_index] = True
    keep = in_test if split == "test" else ~in_test
    grey = np.rint(levels[keep] * (255 / 16)).astype(np.uint8)
    return ArraySource(
        np.repeat(grey[..., None], 3, axis=-1),
        labels[keep].astype(np.int64),
        name=f"digits:{split}",
        label_names=[str(d) for d in range(10)],
    )


def npz_source(path: str | os.PathLike) -> ArraySource:
    """An .npz file with `images` (N, H, W, 3) uint8 and optional integer `labels` (N,)."""
    try:
        with open(path, "rb") as file:
            magic = file.read(6)
    except OSError as error:
        raise UnreadableImageError(f"cannot read npz file {path}: {error}") from error
    if magic == b"\x93NUMPY":
        raise ValueError(f"{path} is a single array, not an .npz archive; save with np.savez")
    if not magic.startswith(b"PK"):  # an .npz is a zip archive
        raise UnreadableImageError(
            f"{path} is not an .npz archive (a zip of arrays); save it with "
            "np.savez(path, images=..., labels=...)"
        )
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as error:
        raise UnreadableImageError(f"cannot read npz file {path}: {error}") from error
    try:
        with data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise UnreadableImageError(f"cannot read npz file {path}: {error}") from error
    if "images" not in arrays:
        raise ValueError(
            f"npz source {path} has no 'images' array (found {sorted(arrays)}); save with "
            "np.savez(path, images=uint8 (N, H, W, 3), labels=int (N,))"
        )
    images, labels = arrays["images"], arrays.get("labels")
    return ArraySource(images, labels, name=f"npz:{path}")


# ----------------------------------------------------------------------------------------------
# Spec strings

_TRAILING_SLICE = re.compile(r"^(?P<base>.*?)\[(?P<slice>[^\[\]]*)\]$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def open_source(
    spec: str, *, skip_corrupt: bool = False, data_dir: str | os.PathLike | None = None
):
    """Open a data source from a spec string (forms in this module's docstring).

    With `skip_corrupt`, every example is read once up front and unreadable ones are dropped
    (a warning gives the count and names), so indices stay dense and deterministic; otherwise
    an unreadable example raises `UnreadableImageError` naming it when it is read. `data_dir`
    is the tensorflow_datasets data directory (default: TFDS_DATA_DIR or ~/tensorflow_datasets).
    """
    match = _TRAILING_SLICE.match(spec)
    base, selection = (match["base"], match["slice"]) if match else (spec, None)
    kind, _, rest = base.partition(":")
    if kind == "tfds" and rest:
        name, split = rest, "train"
        head, _, tail = rest.rpartition(":")
        if head and not _VERSION.match(tail):
            name, split = head, tail
        source = TfdsSource(name, split, data_dir=data_dir)
    elif kind == "digits":
        source = digits_source(rest or "train")
    elif kind == "folder" and rest:
        source = FolderSource(rest)
    elif kind == "npz" and rest:
        source = npz_source(rest)
    elif kind == "idx" and rest:
        directory, _, split = rest.rpartition(":")
        if not directory or split not in idx.SPLIT_NAMES:
            directory, split = rest, "train"
        images, labels = idx.read_split(directory, split)
        source = ArraySource(images, labels, name=f"idx:{directory}:{split}")
    else:
        raise ValueError(f"unknown data spec {spec!r}; valid forms: {SPEC_FORMS}")
    if selection is not None:
        source = SubsetSource(source, slice_indices(len(source), selection, spec))
    if skip_corrupt:
        source = drop_unreadable(source, spec)
    return source


def slice_indices(length: int, selection: str, spec: str = "") -> np.ndarray:
    """Indices selected by a tfds-style slice `START:STOP` over `length` examples.

    START and STOP are optional integers or percentages (`90%`), negative ones counting from
    the end, as in Python slicing; percentages round to the nearest example (halves up).
    """

    def bound(text: str) -> int | None:
        text = text.strip()
        if not text:
            return None
        try:
            if text.endswith("%"):
                percent = float(text[:-1])
                if not -100 <= percent <= 100:
                    raise ValueError
                return int(math.copysign(math.floor(abs(percent) * length / 100 + 0.5), percent))
            return int(text)
        except ValueError:
            raise ValueError(
                f"bad slice [{selection}] in {spec!r}: bounds must be integers or percentages "
                "in [-100%, 100%], as in [:90%], [90%:], [:1000], [10:-10]"
            ) from None

    parts = selection.split(":")
    if len(parts) != 2:
        raise ValueError(f"bad slice [{selection}] in {spec!r}: expected [START:STOP]")
    indices = np.arange(length)[slice(bound(parts[0]), bound(parts[1]))]
    if len(indices) == 0:
        raise ValueError(f"slice [{selection}] of {spec!r} selects none of its {length} examples")
    return indices


def drop_unreadable(source, spec: str = "", num_threads: int = 8) -> SubsetSource:
    """Read every example of `source` once; return the readable ones as a dense source.

    Skipped examples are counted in a warning (with the first few names) and listed in the
    result's `skipped` attribute.
    """

    def readable(index: int) -> bool:
        try:
            source[index]
        except UnreadableImageError:
            return False
        return True

    with ThreadPoolExecutor(num_threads) as pool:  # PIL decodes without holding the GIL
        ok = list(
            tqdm(
                pool.map(readable, range(len(source))),
                total=len(source),
                desc=f"checking {spec or 'images'}",
                disable=len(source) < 1000,
                leave=False,
            )
        )
    ok = np.asarray(ok, bool)
    skipped = [source.describe(int(i)) for i in np.flatnonzero(~ok)]
    if not ok.any():
        raise UnreadableImageError(
            f"{spec or 'source'}: none of its {len(source)} examples is readable, e.g. {skipped[0]}"
        )
    if skipped:
        more = " ..." if len(skipped) > 5 else ""
        warnings.warn(
            f"{spec or 'source'}: skipped {len(skipped)} unreadable of {len(source)} examples: "
            f"{', '.join(skipped[:5])}{more}",
            stacklevel=2,
        )
    return SubsetSource(source, np.flatnonzero(ok), skipped)
