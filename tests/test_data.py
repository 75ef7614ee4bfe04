"""Data sources, augmentation and the grain pipelines."""

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits
from transformers import ImageGPTImageProcessor

from igpt.data import (
    ArraySource,
    Augment,
    UnreadableImageError,
    eval_dataset,
    make_train_iterator,
    num_eval_batches,
    open_source,
)
from igpt.data.augment import pad_crop, random_resized_crop
from igpt.tokenizer import ColorTokenizer

warnings.filterwarnings("ignore", message=".*requires torchvision.*")


@pytest.fixture(scope="module")
def tokenizer():
    """A small random palette at 8x8, so tokens stay cheap."""
    palette = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
    return ColorTokenizer(palette, size=(8, 8))


def _numbered_source(n, size=8, seed=0):
    """n random images whose labels are their indices, so batches show which examples came."""
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ArraySource(images, np.arange(n))


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_batches_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


# ----------------------------------------------------------------------------------------------
# Sources


def test_embedded_digits_equal_scikit_learn():
    """digits.npz holds load_digits' images and labels; the fixed split is 1,297 / 500,
    disjoint and complete; grey levels 0..16 become rint(v * 255 / 16) on all three channels."""
    reference = load_digits()
    train, test = open_source("digits:train"), open_source("digits")
    assert (len(train), len(open_source("digits:test"))) == (1297, 500)
    assert len(test) == len(train)  # "digits" alone is the train split
    data = np.load(Path(__file__).resolve().parents[1] / "igpt" / "data" / "digits.npz")
    np.testing.assert_array_equal(data["levels"], reference.images)
    np.testing.assert_array_equal(data["labels"], reference.target)
    test_split = open_source("digits:test")
    in_test = np.zeros(1797, bool)
    in_test[data["test_index"]] = True
    for split, rows in ((train, np.flatnonzero(~in_test)), (test_split, data["test_index"])):
        images = np.stack([split[i]["image"] for i in range(len(split))])
        labels = [split[i]["label"] for i in range(len(split))]
        assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 3)
        np.testing.assert_array_equal(labels, reference.target[rows])
        assert np.all(images == images[..., :1])  # grey on all channels
        grey = reference.images[rows]
        assert np.all(images[..., 0][grey == 0] == 0) and np.all(images[..., 0][grey == 16] == 255)
        np.testing.assert_array_equal(images[..., 0], np.rint(grey * 255 / 16))
    assert train.label_names == [str(d) for d in range(10)]


def test_slices_partition_a_split():
    """[:90%] and [90%:] split the examples between them; counts, negatives and bad slices."""
    whole = open_source("digits:train")
    head, tail = open_source("digits:train[:90%]"), open_source("digits:train[90%:]")
    assert (len(head), len(tail)) == (1167, 130)  # 0.9 * 1297 = 1167.3
    np.testing.assert_array_equal(head[0]["image"], whole[0]["image"])
    np.testing.assert_array_equal(tail[0]["image"], whole[1167]["image"])
    np.testing.assert_array_equal(tail[-1]["image"], whole[1296]["image"])
    assert len(open_source("digits:test[:100]")) == 100
    assert len(open_source("digits:test[10:-10]")) == 480
    assert open_source("digits:test[10:-10]").describe(0) == "digits:test example 10"
    with pytest.raises(ValueError, match="integers or percentages"):
        open_source("digits:train[a:b]")
    with pytest.raises(ValueError, match="selects none"):
        open_source("digits:train[50%:50%]")


@pytest.mark.parametrize("spec", ["imagenet:train", "tfds:", "folder:", "digits:validation"])
def test_bad_spec_names_the_spec_and_the_valid_forms(spec):
    """A spec that is not one of the forms is refused with the forms listed."""
    with pytest.raises(ValueError, match="tfds:NAME|train' and 'test"):
        open_source(spec)


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_source_with_classes_and_flat(tmp_path):
    """Subfolders are classes in sorted order (nested files included); a flat folder is
    unlabelled; greyscale and RGBA files come out RGB; non-images are ignored."""
    rng = np.random.default_rng(1)
    pictures = {
        "cat/a.png": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
        "cat/deeper/b.png": rng.integers(0, 256, (6, 6, 3), dtype=np.uint8),
        "ant/c.png": rng.integers(0, 256, (4, 4), dtype=np.uint8),
    }
    for name, array in pictures.items():
        _write_png(tmp_path / "classes" / name, array)
    (tmp_path / "classes" / "cat" / "notes.txt").write_text("not an image")
    source = open_source(f"folder:{tmp_path / 'classes'}")
    assert len(source) == 3 and source.label_names == ["ant", "cat"]
    assert [source[i]["label"] for i in range(3)] == [0, 1, 1]
    grey = source[0]["image"]
    assert grey.shape == (4, 4, 3) and np.all(grey == pictures["ant/c.png"][..., None])
    np.testing.assert_array_equal(source[1]["image"], pictures["cat/a.png"])
    np.testing.assert_array_equal(source[2]["image"], pictures["cat/deeper/b.png"])

    rgba = np.dstack([pictures["cat/a.png"], np.full((5, 7), 0, np.uint8)])
    _write_png(tmp_path / "flat" / "1.png", pictures["cat/a.png"])
    _write_png(tmp_path / "flat" / "2.png", rgba)  # fully transparent: white
    flat = open_source(f"folder:{tmp_path / 'flat'}")
    assert [flat[i]["label"] for i in range(2)] == [-1, -1] and flat.label_names is None
    assert np.all(flat[1]["image"] == 255)

    _write_png(tmp_path / "classes" / "loose.png", pictures["cat/a.png"])
    with pytest.raises(ValueError, match="loose"):
        open_source(f"folder:{tmp_path / 'classes'}")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        open_source(f"folder:{tmp_path / 'missing'}")


def test_corrupt_files_name_the_file_or_are_skipped(tmp_path):
    """An unreadable image raises naming the file; skip_corrupt drops it, counts it in a
    warning and keeps indices dense and in order."""
    rng = np.random.default_rng(2)
    good = [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for _ in range(3)]
    for i, array in enumerate(good):
        _write_png(tmp_path / f"{2 * i}.png", array)
    (tmp_path / "1.png").write_bytes(b"this is not a png")
    Image.fromarray(good[0]).save(tmp_path / "3.jpg", quality=90)
    data = (tmp_path / "3.jpg").read_bytes()
    (tmp_path / "3.jpg").write_bytes(data[: len(data) // 2])  # truncated

    source = open_source(f"folder:{tmp_path}")
    assert len(source) == 5
    with pytest.raises(UnreadableImageError, match="1.png"):
        source[1]
    with pytest.raises(UnreadableImageError, match="3.jpg"):
        source[3]
    with pytest.warns(UserWarning, match="skipped 2 unreadable of 5") as caught:
        skipping = open_source(f"folder:{tmp_path}", skip_corrupt=True)
    assert "1.png" in str(caught[0].message)
    assert len(skipping) == 3 and len(skipping.skipped) == 2
    for i in range(3):
        np.testing.assert_array_equal(skipping[i]["image"], good[i])


def test_npz_source(tmp_path):
    """npz files with and without labels; a file without images is refused with the format."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "l.npz", images=images, labels=np.array([3, 1, 4, 1]))
    np.savez(tmp_path / "u.npz", images=images)
    labelled = open_source(f"npz:{tmp_path / 'l.npz'}")
    assert [labelled[i]["label"] for i in range(4)] == [3, 1, 4, 1]
    np.testing.assert_array_equal(labelled[2]["image"], images[2])
    assert open_source(f"npz:{tmp_path / 'u.npz'}[1:]")[0]["label"] == -1
    np.savez(tmp_path / "bad.npz", pixels=images)
    with pytest.raises(ValueError, match="no 'images' array"):
        open_source(f"npz:{tmp_path / 'bad.npz'}")
    np.savez(tmp_path / "float.npz", images=images / 255.0)
    with pytest.raises(ValueError, match="uint8"):
        open_source(f"npz:{tmp_path / 'float.npz'}")
    (tmp_path / "broken.npz").write_bytes(b"garbage")
    with pytest.raises(UnreadableImageError, match="broken.npz"):
        open_source(f"npz:{tmp_path / 'broken.npz'}")
    np.save(tmp_path / "single.npy", images)
    with pytest.raises(ValueError, match="not an .npz archive"):
        open_source(f"npz:{tmp_path / 'single.npy'}")


# ----------------------------------------------------------------------------------------------
# tensorflow_datasets (mocked; no TensorFlow installed)


def test_tfds_cifar10_mock_through_sources_and_eval_pipeline():
    """tfds:cifar10 reads through tfds.data_source without TensorFlow; our slices work on the
    mock (which ignores tfds slicing); eval batches hold the processor's ids for each record."""
    palette = np.random.default_rng(4).uniform(-1, 1, (512, 3)).astype(np.float32)
    tokenizer = ColorTokenizer(palette)
    with tfds.testing.mock_data(num_examples=20):
        raw = tfds.data_source("cifar10", split="train")
        source = open_source("tfds:cifar10:train")
        assert len(source) == 20 and source.describe(3) == "tfds:cifar10:train record 3"
        assert len(open_source("tfds:cifar10:train[:25%]")) == 5
        assert len(open_source("tfds:cifar10:test[-3:]")) == 3
        record = source[7]
        np.testing.assert_array_equal(record["image"], raw[7]["image"])
        assert record["label"] == int(raw[7]["label"]) and record["image"].shape == (32, 32, 3)
        batches = list(eval_dataset(source, tokenizer, global_batch_size=8, process_count=1))
        images = [raw[i]["image"] for i in range(20)]
    processor = ImageGPTImageProcessor(clusters=palette.tolist(), size={"height": 32, "width": 32})
    expected = np.stack(processor(images, return_tensors="np")["input_ids"])
    tokens = np.concatenate([b["tokens"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert len(batches) == 3 and mask.sum() == 20 and not mask[20:].any()
    np.testing.assert_array_equal(tokens[:20], expected)


def test_tfds_imagenet32_mock_through_train_pipeline():
    """The same pipeline code runs over imagenet_resized/32x32 with the ImageNet crop, at a
    smaller model resolution, deterministically."""
    palette = np.random.default_rng(5).uniform(-1, 1, (32, 3)).astype(np.float32)
    tokenizer = ColorTokenizer(palette, size=(16, 16))
    with tfds.testing.mock_data(num_examples=24):
        source = open_source("tfds:imagenet_resized/32x32:train")
        assert source[0]["image"].shape == (32, 32, 3)
        runs = []
        kwargs = dict(global_batch_size=6, seed=3, augment="imagenet+flip", process_count=1)
        for _ in range(2):
            runs.append(_take(make_train_iterator(source, tokenizer, **kwargs), 5))
    _assert_batches_equal(*runs)
    batch = runs[0][0]
    assert batch["tokens"].shape == (6, 256) and batch["tokens"].dtype == np.int32
    assert batch["label"].dtype == np.int32 and batch["mask"].all()
    assert batch["tokens"].max() < 32


# ----------------------------------------------------------------------------------------------
# Training pipeline


def test_train_is_deterministic_and_reshuffles_each_epoch(tokenizer):
    """Same seed, same batches; another seed, another order; each epoch visits every example
    once, in a new order."""
    source = _numbered_source(40)
    kwargs = dict(global_batch_size=8, augment="cifar", process_count=1, num_epochs=2)
    first = list(make_train_iterator(source, tokenizer, seed=0, **kwargs))
    _assert_batches_equal(first, list(make_train_iterator(source, tokenizer, seed=0, **kwargs)))
    other = list(make_train_iterator(source, tokenizer, seed=1, **kwargs))
    order = np.concatenate([b["label"] for b in first])
    assert not np.array_equal(order, np.concatenate([b["label"] for b in other]))
    assert len(first) == 10
    epoch_1, epoch_2 = order[:40], order[40:]
    assert sorted(epoch_1) == list(range(40)) and sorted(epoch_2) == list(range(40))
    assert not np.array_equal(epoch_1, epoch_2)


def test_train_augmentation_differs_per_epoch_and_example(tokenizer):
    """Augmentation is seeded per stream position: the same image is cropped differently in
    two epochs, and 'none' leaves the tokens equal to the plain encoding."""
    source = _numbered_source(8)
    kwargs = dict(global_batch_size=8, process_count=1, seed=0, num_epochs=2)
    plain = list(make_train_iterator(source, tokenizer, augment="none", **kwargs))
    for batch in plain:
        expected = tokenizer.encode(source.images[batch["label"]])
        np.testing.assert_array_equal(batch["tokens"], expected)
    augmented = list(make_train_iterator(source, tokenizer, augment="cifar", **kwargs))
    by_epoch = [dict(zip(b["label"], b["tokens"], strict=True)) for b in augmented]
    changed = [not np.array_equal(by_epoch[0][i], by_epoch[1][i]) for i in range(8)]
    assert sum(changed) >= 6


def test_train_resumes_from_saved_state(tokenizer):
    """A fresh iterator given the JSON-round-tripped state of another continues with exactly
    the batches the uninterrupted one produces."""
    source = _numbered_source(30)
    kwargs = dict(global_batch_size=4, seed=7, augment="cifar", process_count=1)
    uninterrupted = _take(make_train_iterator(source, tokenizer, **kwargs), 20)
    interrupted = make_train_iterator(source, tokenizer, **kwargs)
    _take(interrupted, 12)
    state = json.loads(json.dumps(interrupted.get_state()))
    resumed = make_train_iterator(source, tokenizer, **kwargs)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 8), uninterrupted[12:])


@pytest.mark.parametrize("count", [2, 3, 4])
def test_process_shards_are_disjoint_complete_and_match_one_process(tokenizer, count):
    """With P processes each sees its own examples, together all of them (but the last
    partial global batch), the same number of batches each, and their batches k together
    are the global batch k of a single-process run, augmentation included."""
    source = _numbered_source(50)
    kwargs = dict(global_batch_size=12, seed=5, augment="cifar", num_epochs=1)
    single = list(make_train_iterator(source, tokenizer, process_count=1, **kwargs))
    shards = [
        list(make_train_iterator(source, tokenizer, process_index=p, process_count=count, **kwargs))
        for p in range(count)
    ]
    assert {len(s) for s in shards} == {len(single)} == {4}
    seen = [np.concatenate([b["label"] for b in shard]).tolist() for shard in shards]
    assert all(set(a).isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert len(set(sum(seen, []))) == 48 == sum(len(s) for s in seen)
    for k, global_batch in enumerate(single):
        assert all(len(shard[k]["label"]) == 12 // count for shard in shards)
        parts = {label: tokens for shard in shards for label, tokens in _rows(shard[k])}
        assert parts.keys() == set(global_batch["label"].tolist())
        for label, tokens in _rows(global_batch):
            np.testing.assert_array_equal(parts[label], tokens)


def _rows(batch, only_real=False):
    """(label, tokens) per example of a batch; with only_real, padding is left out."""
    keep = batch["mask"] if only_real else slice(None)
    return zip(batch["label"][keep].tolist(), batch["tokens"][keep], strict=True)


def test_batch_size_must_divide_over_processes(tokenizer):
    """The global batch must split evenly over processes; the message says so."""
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        make_train_iterator(_numbered_source(10), tokenizer, global_batch_size=8, process_count=3)


def test_worker_processes_give_the_same_batches(tokenizer):
    """grain worker processes change nothing about the batches, and the state stays JSON."""
    source = _numbered_source(40)
    kwargs = dict(global_batch_size=8, seed=2, augment="cifar", process_count=1)
    expected = _take(make_train_iterator(source, tokenizer, **kwargs), 6)
    iterator = make_train_iterator(source, tokenizer, worker_count=2, **kwargs)
    try:
        got = _take(iterator, 6)
        json.dumps(iterator.get_state())
    finally:
        iterator.close()
    _assert_batches_equal(got, expected)


# ----------------------------------------------------------------------------------------------
# Evaluation pipeline


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_eval_covers_every_example_once_with_masks(tokenizer, count):
    """Across processes every example appears exactly once with mask True; padding has mask
    False and label -1; every process runs the same number of full-size batches."""
    source = _numbered_source(50)
    kwargs = dict(global_batch_size=12, process_count=count)
    shards = [
        list(eval_dataset(source, tokenizer, process_index=p, **kwargs)) for p in range(count)
    ]
    assert {len(s) for s in shards} == {num_eval_batches(50, 12)} == {5}
    real = Counter()
    for shard in shards:
        for batch in shard:
            assert batch["tokens"].shape == (12 // count, 64) and batch["mask"].dtype == bool
            assert np.all(batch["label"][~batch["mask"]] == -1)
            for label, tokens in _rows(batch, only_real=True):
                np.testing.assert_array_equal(tokens, tokenizer.encode(source.images[label])[0])
                real[label] += 1
    assert real == Counter(range(50))


def test_center_crop_evaluates_the_central_square(tokenizer):
    """The paper's ImageNet evaluation: the central square of a wide or tall image, resized;
    without center_crop the whole image is resized, as the transformers processor does."""
    rng = np.random.default_rng(1)
    wide, tall = rng.integers(0, 256, (2, 16, 40, 3), dtype=np.uint8)
    tall = tall.transpose(1, 0, 2)
    for image, square in ((wide, wide[:, 12:28]), (tall, tall[12:28])):
        source = ArraySource(image[None], np.zeros(1, int))
        (cropped,) = eval_dataset(source, tokenizer, global_batch_size=1, center_crop=True)
        (whole,) = eval_dataset(source, tokenizer, global_batch_size=1)
        np.testing.assert_array_equal(cropped["tokens"], tokenizer.encode(square))
        np.testing.assert_array_equal(whole["tokens"], tokenizer.encode(image))
        assert not np.array_equal(cropped["tokens"], whole["tokens"])


# ----------------------------------------------------------------------------------------------
# Augmentation


def test_augment_specs():
    """Aliases and '+'-joined parts parse; unknown parts and two crops are refused."""
    assert Augment.parse("cifar") == Augment(pad_crop=True, flip=True)
    assert Augment.parse("imagenet") == Augment(resized_crop=True)
    assert Augment.parse("resized_crop+flip") == Augment(resized_crop=True, flip=True)
    assert Augment.parse("none") == Augment()
    with pytest.raises(ValueError, match="unknown augmentation"):
        Augment.parse("rotate")
    with pytest.raises(ValueError, match="choose one crop"):
        Augment.parse("resized_crop+pad_crop")


def test_random_resized_crop_takes_224_of_256_to_384():
    """The crop spans 224/s of the short side, s in [256, 384], wherever it lands."""
    columns = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (200, 256, 3))
    spans = []
    for seed in range(50):
        out = random_resized_crop(
            np.ascontiguousarray(columns), (16, 16), np.random.default_rng(seed)
        )
        assert out.shape == (16, 16, 3)
        # Column i of the output samples the source column at the centre of its sixteenth.
        spans.append((int(out[0, -1, 0]) - int(out[0, 0, 0])) * 16 / 15)
    assert 200 * 224 / 384 - 3 <= min(spans) and max(spans) <= 200 * 224 / 256 + 3
    assert max(spans) - min(spans) > 20  # the scale does vary


def test_pad_crop_is_a_window_of_the_reflected_image():
    """CIFAR crop: a same-size window of the 4-pixel reflect-padded image; flips mirror."""
    image = np.random.default_rng(6).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    offsets = set()
    for seed in range(40):
        out = pad_crop(image, np.random.default_rng(seed))
        matches = [
            (y, x)
            for y in range(9)
            for x in range(9)
            if np.array_equal(padded[y : y + 8, x : x + 8], out)
        ]
        assert matches
        offsets.update(matches)
    assert len(offsets) > 10
    flips = {
        Augment(flip=True)(image, (8, 8), np.random.default_rng(s))[0, 0, 0] for s in range(20)
    }
    assert flips == {image[0, 0, 0], image[0, -1, 0]}
