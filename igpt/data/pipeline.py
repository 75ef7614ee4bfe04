"""grain pipelines from a data source to token batches.

Batches are dicts of numpy arrays for ONE process (b = global batch / process count):

    tokens  int32 (b, H*W)  colour-cluster ids in raster order, without the SOS token
    label   int32 (b,)      class, -1 for unlabelled or padding examples
    mask    bool  (b,)      False only for the padding that completes the last eval batches

Training reads a globally shuffled, endlessly repeated stream (a new order each epoch) and
gives process p the examples at stream positions p, p + P, p + 2P, ... (P processes). So the
processes' batches k together are exactly the global batch k of a one-process run, whatever P,
and augmentation, seeded by stream position, is the same too. Evaluation covers every example
once across processes, with the same number of batches on each.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence

import grain
import jax
import numpy as np
from absl import flags

from igpt.data.augment import Augment, central_square
from igpt.pixels import as_size, resize, to_rgb
from igpt.tokenizer import ColorTokenizer


def train_dataset(
    source,
    tokenizer: ColorTokenizer,
    *,
    global_batch_size: int,
    seed: int = 0,
    image_size: int | Sequence[int] | None = None,
    augment: str | Augment = "none",
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 2,
    prefetch_batches: int = 4,
) -> grain.IterDataset:
    """The training batches of this process, as a grain `IterDataset`.

    Args:
      source: a data source (`len`, `source[i] -> {"image", "label"}`), see `open_source`.
      tokenizer: maps the augmented images to ids.
      global_batch_size: examples per step over all processes; must divide by process_count.
      seed: seeds the shuffle (a different order each epoch) and the augmentation.
      image_size: model resolution, int or (height, width); default `tokenizer.size`.
      augment: an `Augment` or its spec ("none", "flip", "imagenet", "cifar", ...).
      num_epochs: None repeats forever; otherwise the stream ends after that many epochs,
        cut to whole global batches.
      process_index, process_count: this process and the number of processes; default
        `jax.process_index()` / `jax.process_count()`.
      worker_count: grain worker processes (0 reads in this process, with threads).
      read_threads, prefetch_batches: threads reading examples and batches read ahead.

    Iterate with `iter(...)`; the iterator's `get_state()` is a JSON-serialisable dict, and
    `set_state()` on a fresh iterator resumes exactly where it was taken.
    """
    size = as_size(tokenizer.size if image_size is None else image_size)
    if isinstance(augment, str):
        augment = Augment.parse(augment)
    index, count, batch = _process_batch(global_batch_size, process_index, process_count)
    if len(source) == 0:
        raise ValueError("the training source is empty")
    num_batches = sys.maxsize  # endless
    if num_epochs is not None:
        # Every process must run the same number of steps: the last partial global batch is
        # dropped.
        num_batches = len(source) * num_epochs // global_batch_size
        if num_batches == 0:
            raise ValueError(
                f"{num_epochs} epoch(s) of {len(source)} examples do not fill one global batch "
                f"of {global_batch_size}"
            )
    read = _TrainBatch(source, tokenizer, augment, size, seed, global_batch_size, index, count)
    dataset = (
        grain.MapDataset.range(num_batches)
        .map(read)
        .to_iter_dataset(
            grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
        )
    )
    if worker_count > 0:
        # grain reads an absl flag when it starts workers, which fails in programs that never
        # parse absl flags (argparse scripts, pytest); their defaults are what we want then.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return dataset


# The seed's two independent generator streams: the order of each epoch, and the augmentation
# of each stream position.
_ORDER, _AUGMENTATION = 0, 1


class _TrainBatch:
    """Global batch k of the training stream, this process's share of it, as a token batch.

    The stream is every example once per epoch in a new order; stream position s is example
    `order(epoch)[s % N]` with epoch = s // N, augmented with a generator seeded by s. Global
    batch k holds positions kG .. kG + G - 1, and process p takes those equal to p modulo P.

    The pipeline's unit of work is a whole batch, not an example: a chain of grain's
    per-example shuffle (computed per index), random map and read metrics took 12.3 ms of CPU
    per batch of 64 digits, on the cores the train step runs on; this takes 0.74 ms.
    """

    def __init__(self, source, tokenizer, augment, size, seed, global_batch, index, count):
        self.source, self.tokenizer, self.augment, self.size = source, tokenizer, augment, size
        self.seed, self.global_batch, self.index, self.count = seed, global_batch, index, count

    def __call__(self, k: int) -> dict:
        first = k * self.global_batch + self.index
        positions = range(first, (k + 1) * self.global_batch, self.count)
        n = len(self.source)
        images, labels = [], []
        for position in positions:
            epoch, slot = divmod(position, n)
            example = int(_epoch_order(self.seed, epoch, n)[slot])
            record = self.source[example]
            rng = None  # a generator only where the augmentation draws: one costs ~20 us
            if self.augment.random:
                rng = np.random.default_rng((self.seed, _AUGMENTATION, position))
            images.append(self.augment(record["image"], self.size, rng))
            labels.append(record["label"])
        return _tokenize_batch(
            {"image": np.stack(images), "label": np.asarray(labels, np.int32)},
            tokenizer=self.tokenizer,
        )


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the N examples in `epoch`: a permutation, a new one each epoch (cached:
    a batch spans one or two epochs unless the source is smaller than the batch)."""
    return np.random.default_rng((seed, _ORDER, epoch)).permutation(n)


def make_train_iterator(source, tokenizer: ColorTokenizer, **kwargs) -> grain.DatasetIterator:
    """`iter(train_dataset(source, tokenizer, **kwargs))`: next(it) is the next batch."""
    return iter(train_dataset(source, tokenizer, **kwargs))


def eval_dataset(
    source,
    tokenizer: ColorTokenizer,
    *,
    global_batch_size: int,
    image_size: int | Sequence[int] | None = None,
    center_crop: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """This process's evaluation batches: every example once over all processes, in order.

    Images are resized whole to the model resolution, as the transformers processor does, or
    with `center_crop` first cut to their central square (the paper's ImageNet evaluation:
    short side to 224, the centre 224 x 224, then down to the model resolution).
    Process p holds the examples p, p + P, p + 2P, ...; every process gets
    `num_eval_batches(len(source), global_batch_size)` batches, the last ones completed with
    padding (`mask` False, label -1); `index` is each example's index in the source (BERT
    models are evaluated with masks drawn from it). The result is a grain `MapDataset`:
    `len()` batches, iterable any number of times (`for batch in ds`), or
    `ds.to_iter_dataset(...)`.
    """
    size = as_size(tokenizer.size if image_size is None else image_size)
    index, count, batch = _process_batch(global_batch_size, process_index, process_count)
    num_batches = num_eval_batches(len(source), global_batch_size)
    shard = _PaddedShard(source, index, count, num_batches * batch)
    return (
        grain.MapDataset.source(shard)
        .map(functools.partial(_resize_example, size=size, crop=center_crop))
        .batch(batch)
        .map(functools.partial(_tokenize_batch, tokenizer=tokenizer))
    )


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Batches each process runs to cover `num_examples` (at least one)."""
    return max(1, math.ceil(num_examples / global_batch_size))


def _process_batch(global_batch_size, process_index, process_count) -> tuple[int, int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index must be in [0, {count}), got {index}")
    if global_batch_size < 1 or global_batch_size % count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the "
            f"process count {count}"
        )
    return index, count, global_batch_size // count


class _PaddedShard:
    """Slot j of process p is example j * P + p, or padding past the end of the source."""

    def __init__(self, source, index: int, count: int, length: int):
        self.source, self.index, self.count, self.length = source, index, count, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, slot: int) -> dict:
        example = slot * self.count + self.index
        if example < len(self.source):
            record = self.source[example]
            return {
                "image": record["image"],
                "label": record["label"],
                "mask": True,
                "index": example,
            }
        return {
            "image": np.zeros((1, 1, 3), np.uint8),
            "label": -1,
            "mask": False,
            "index": example,
        }


def _resize_example(record: dict, *, size, crop: bool) -> dict:
    image = to_rgb(record["image"])
    return {
        "image": resize(central_square(image) if crop else image, size),
        "label": np.int32(record["label"]),
        "mask": np.bool_(record["mask"]),
        "index": np.int32(record["index"]),
    }


def _tokenize_batch(batch: dict, *, tokenizer: ColorTokenizer) -> dict:
    images = batch["image"]  # (b, H, W, 3) uint8, already at the model resolution
    mask = batch.get("mask")
    out = {
        "tokens": tokenizer.encode_pixels(images).reshape(len(images), -1),
        "label": batch["label"].astype(np.int32),
        "mask": np.ones(len(images), bool) if mask is None else mask.astype(bool),
    }
    if "index" in batch:  # evaluation: each example's index in its split (igpt.losses.eval_masks)
        out["index"] = batch["index"].astype(np.int32)
    return out
