"""The colour tokenizer against transformers' ImageGPTImageProcessor and exact nearest search."""

import functools
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images
from transformers import ImageGPTImageProcessor

from igpt.pixels import PIXEL_LEVELS, pixel_values
from igpt.tokenizer import ColorTokenizer, nearest_colour_table

warnings.filterwarnings("ignore", message=".*requires torchvision.*")


@functools.lru_cache
def _photos():
    """scikit-learn's two sample photographs (china.jpg, flower.jpg), uint8 (427, 640, 3)."""
    return tuple(load_sample_images().images)


def _patches(seed, count=6, low=20, high=300):
    """Crops of random sizes and places from the real photographs."""
    rng = np.random.default_rng(seed)
    patches = []
    for photo in _photos():
        for _ in range(count // 2):
            h, w = rng.integers(low, high, 2)
            y, x = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
            patches.append(np.ascontiguousarray(photo[y : y + h, x : x + w]))
    return patches


def _uniform_palette(seed, k=512):
    return np.random.default_rng(seed).uniform(-1, 1, (k, 3)).astype(np.float32)


def _photo_palette(seed, k=512):
    """Clusters concentrated where photo colours are, like a real k-means palette."""
    rng = np.random.default_rng(seed)
    pixels = np.concatenate([p.reshape(-1, 3) for p in _photos()])
    chosen = pixel_values(pixels[rng.choice(len(pixels), k, replace=False)])
    return np.clip(chosen + rng.normal(0, 0.02, chosen.shape), -1, 1).astype(np.float32)


def _reference(palette, size, images, *, as_loaded=True, **kwargs):
    """transformers' ids and its scaled pixels (float32 (B, H*W, 3)) for the same images.

    `as_loaded`: pass the palette as a nested list, as `from_pretrained` does with a hub
    `preprocessor_config.json`; the processor then measures distances in float64. A float32
    array makes it measure them in float32.
    """
    palette = palette.tolist() if as_loaded else palette
    processor = ImageGPTImageProcessor(clusters=palette, size={"height": size[0], "width": size[1]})
    ids = np.stack(processor(images, return_tensors="np", **kwargs)["input_ids"])
    pixels = processor(images, return_tensors="np", do_color_quantize=False, **kwargs)
    pixels = np.moveaxis(pixels["pixel_values"], 1, -1).reshape(len(images), -1, 3)
    return ids, pixels


def _assert_same_up_to_ties(ours, theirs, pixels, palette, max_fraction=1e-4):
    """Ids may differ only where two palette colours are equidistant within float32 rounding, and
    on at most `max_fraction` of the pixels; ours must then be the (float64) nearer one."""
    differ = ours != theirs
    assert differ.mean() <= max_fraction, f"{differ.sum()} of {differ.size} ids differ"
    if differ.any():
        x = pixels[differ].astype(np.float64)
        c = palette.astype(np.float64)
        d_ours = ((x - c[ours[differ]]) ** 2).sum(-1)
        d_theirs = ((x - c[theirs[differ]]) ** 2).sum(-1)
        assert np.all(d_ours <= d_theirs)
        assert np.all(d_theirs - d_ours < 2e-6), "a differing id is not a float32 tie"


def test_pixel_levels_equal_processor_scaling():
    """`PIXEL_LEVELS` is the processor's x/127.5 - 1 with its float32 rounding, value by value."""
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (5, 256, 3)).copy()
    _, pixels = _reference(np.zeros((1, 3), np.float32), (5, 256), [ramp])
    np.testing.assert_array_equal(pixels[0, :256, 0], PIXEL_LEVELS)
    assert PIXEL_LEVELS.dtype == np.float32


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (48, 17), (64, 64)])
@pytest.mark.parametrize("make_palette", [_uniform_palette, _photo_palette])
def test_ids_match_processor_on_photo_crops(size, make_palette):
    """Same ids as the processor (resize, scaling, nearest cluster) on real photographs."""
    palette = make_palette(seed=size[0])
    patches = _patches(seed=size[1])
    theirs, pixels = _reference(palette, size, patches)
    ours = ColorTokenizer(palette).encode(patches, size=size)
    assert ours.shape == (len(patches), size[0] * size[1]) and ours.dtype == np.int32
    _assert_same_up_to_ties(ours, theirs, pixels, palette)


def test_float32_processor_differs_only_at_float32_ties():
    """Given a float32 palette the processor computes |a|^2 - 2ab + |b|^2 in float32; it then
    disagrees with the exact nearest cluster only on colours that are float32 ties. A tied
    colour that fills a patch of sky repeats, so the pixel fraction bound is looser here."""
    total = differing = 0
    for seed in range(4):
        palette = _photo_palette(seed=seed)
        patches = _patches(seed=seed + 10)
        theirs, pixels = _reference(palette, (24, 40), patches, as_loaded=False)
        ours = ColorTokenizer(palette).encode(patches, size=(24, 40))
        _assert_same_up_to_ties(ours, theirs, pixels, palette, max_fraction=5e-3)
        total, differing = total + ours.size, differing + (ours != theirs).sum()
    assert differing / total < 1e-3


def test_ids_match_processor_for_greyscale_and_transparent_inputs():
    """Greyscale is replicated and alpha composited on white, as `do_convert_rgb=True` does."""
    palette = _photo_palette(seed=3)
    tokenizer = ColorTokenizer(palette)
    rng = np.random.default_rng(0)
    photo = _patches(seed=4, count=2, low=60, high=120)[0]
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    alpha = rng.integers(0, 256, photo.shape[:2], dtype=np.uint8)
    rgba = np.dstack([photo, alpha])
    la = Image.fromarray(np.dstack([grey, alpha]), mode="LA")
    palette_image = Image.fromarray(photo).convert("P")
    palette_image.info["transparency"] = 0
    cases = [
        # (our input, the processor's input)
        (grey, grey[..., None]),  # the processor has no 2-D array form
        (grey[..., None], grey[..., None]),
        (Image.fromarray(grey), Image.fromarray(grey)),
        (rgba, rgba),
        (Image.fromarray(rgba), Image.fromarray(rgba)),
        (la, la),
        (palette_image, palette_image),
    ]
    for size in [(32, 32), (20, 28)]:
        for ours_in, theirs_in in cases:
            theirs, pixels = _reference(palette, size, [theirs_in], do_convert_rgb=True)
            ours = tokenizer.encode(ours_in, size=size)
            _assert_same_up_to_ties(ours, theirs, pixels, palette)


def test_batch_list_pil_and_path_inputs_agree(tmp_path):
    """A (N, H, W, 3) batch, a list of arrays, PIL images and file paths give the same ids."""
    tokenizer = ColorTokenizer(_uniform_palette(seed=5, k=64), size=(16, 16))
    patches = [p[:50, :60] for p in _patches(seed=6, count=4, low=60, high=100)]
    paths = []
    for i, patch in enumerate(patches):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(patch).save(paths[-1])
    expected = tokenizer.encode(np.stack(patches))
    np.testing.assert_array_equal(tokenizer.encode(patches), expected)
    np.testing.assert_array_equal(tokenizer.encode([Image.fromarray(p) for p in patches]), expected)
    np.testing.assert_array_equal(tokenizer.encode(paths), expected)
    np.testing.assert_array_equal(tokenizer.encode(str(paths[0])), expected[:1])
    # A batch already at the target size skips PIL; it must give the processor's ids.
    small = np.stack([np.asarray(Image.fromarray(p).resize((16, 16), 2)) for p in patches])
    theirs, pixels = _reference(tokenizer.palette, (16, 16), list(small))
    _assert_same_up_to_ties(tokenizer.encode(small), theirs, pixels, tokenizer.palette)
    np.testing.assert_array_equal(tokenizer.encode(small.astype(np.int64)), tokenizer.encode(small))


def test_nearest_cluster_table_is_exact():
    """The table equals a float64 brute-force argmin (lowest id on ties) for every colour tried,
    including palettes with duplicate palette and tiny palettes."""
    rng = np.random.default_rng(7)
    duplicated = _uniform_palette(seed=8, k=100)
    duplicated[50] = duplicated[10]  # exact tie: id 10 must win
    palettes = [_photo_palette(seed=9), duplicated, _uniform_palette(seed=10, k=1)]
    palettes.append(np.array([[-1, -1, -1], [1, 1, 1]], np.float32))
    # Colours on the faces of the 8x8x8 cells the table is built from are the likeliest to
    # expose a wrong candidate bound, so half of the colours tried lie there.
    cell_edges = rng.choice(np.r_[0:256:8, 7:256:8], (20_000, 3))
    colours = np.concatenate([rng.integers(0, 256, (20_000, 3)), cell_edges])
    x = PIXEL_LEVELS[colours].astype(np.float64)
    for palette in palettes:
        table = nearest_colour_table(palette)
        dist = ((x[:, None, :] - palette.astype(np.float64)[None]) ** 2).sum(-1)
        got = table[(colours[:, 0] << 16) | (colours[:, 1] << 8) | colours[:, 2]]
        np.testing.assert_array_equal(got, dist.argmin(1))
    assert not np.any(nearest_colour_table(duplicated) == 50)


def test_decode_returns_the_nearest_palette_colour():
    """decode(encode(x)) is within the palette's distance of x: each pixel is the colour of
    its nearest cluster, rint(127.5 * (c + 1))."""
    palette = _photo_palette(seed=11)
    tokenizer = ColorTokenizer(palette, size=(40, 40))
    patches = _patches(seed=12, count=4)
    images = np.stack([np.asarray(Image.fromarray(p).resize((40, 40), 2)) for p in patches])
    decoded = tokenizer.decode(tokenizer.encode(images))
    assert decoded.shape == images.shape and decoded.dtype == np.uint8
    x = PIXEL_LEVELS[images].reshape(-1, 3).astype(np.float64)
    nearest = np.sqrt(((x[:, None] - palette.astype(np.float64)[None]) ** 2).sum(-1).min(1))
    error = np.linalg.norm(decoded.reshape(-1, 3) / 127.5 - 1 - x, axis=-1)
    # The decoded colour is the cluster rounded to uint8: at most half a step per channel.
    assert np.all(error <= nearest + np.sqrt(3) * 0.5 / 127.5 + 1e-9)
    colours = tokenizer.decode(np.arange(512).reshape(1, 512), size=(16, 32)).reshape(-1, 3)
    assert np.all(np.abs(colours / 127.5 - 1 - palette) <= 0.5 / 127.5 + 1e-6)


def test_decode_shapes_and_errors():
    """decode accepts (B, H*W), (H*W,) and (B, H, W); rejects bad ids and sizes clearly."""
    tokenizer = ColorTokenizer(_uniform_palette(seed=13, k=8), size=(2, 3))
    ids = np.arange(6).reshape(1, 6)
    assert tokenizer.decode(ids).shape == (1, 2, 3, 3)
    assert tokenizer.decode(ids[0]).shape == (1, 2, 3, 3)
    np.testing.assert_array_equal(tokenizer.decode(ids.reshape(1, 2, 3)), tokenizer.decode(ids))
    with pytest.raises(ValueError, match=r"0\.\.7"):
        tokenizer.decode(np.full((1, 6), 8))
    with pytest.raises(ValueError, match="size"):
        tokenizer.decode(np.zeros((1, 7), int))


def test_from_pretrained_round_trip_with_transformers(tmp_path):
    """save_pretrained writes a preprocessor config that transformers loads and that gives the
    same ids; from_pretrained reads it (directory or file) and from_npy reads save()."""
    palette = _photo_palette(seed=14)
    tokenizer = ColorTokenizer(palette, size=(24, 24))
    file = tokenizer.save_pretrained(tmp_path)
    processor = ImageGPTImageProcessor.from_pretrained(tmp_path)
    patches = _patches(seed=15, count=2)
    theirs = np.stack(processor(patches, return_tensors="np")["input_ids"])
    for loaded in (ColorTokenizer.from_pretrained(tmp_path), ColorTokenizer.from_pretrained(file)):
        np.testing.assert_array_equal(loaded.palette, palette)
        assert loaded.size == (24, 24)
        np.testing.assert_array_equal(loaded.encode(patches), theirs)
    tokenizer.save(tmp_path / "palette.npy")
    np.testing.assert_array_equal(
        ColorTokenizer.from_npy(tmp_path / "palette.npy").palette, palette
    )


def test_bad_inputs_raise_clear_errors(tmp_path):
    """Wrong palettes, paths and pixel types fail with messages saying what to do."""
    with pytest.raises(ValueError, match=r"\(K, 3\)"):
        ColorTokenizer(np.zeros((512, 4)))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ColorTokenizer(np.full((4, 3), 200.0))
    with pytest.raises(ValueError, match="NaN"):
        ColorTokenizer(np.full((4, 3), np.nan))
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ColorTokenizer.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"size": {"height": 32}}')
    with pytest.raises(ValueError, match="palette"):
        ColorTokenizer.from_pretrained(tmp_path)
    tokenizer = ColorTokenizer(_uniform_palette(seed=16, k=4))
    with pytest.raises(TypeError, match="uint8"):
        tokenizer.encode(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="0..255"):
        tokenizer.encode(np.full((8, 8, 3), 300))
    with pytest.raises(ValueError, match=r"\(N, H, W, 1\)"):
        tokenizer.encode(np.zeros((2, 8, 8), np.uint8))


def test_pickle_drops_the_table():
    """Worker processes get the palette, not the 32 MiB table, and rebuild the same ids."""
    tokenizer = ColorTokenizer(_uniform_palette(seed=17))
    images = np.stack(_patches(seed=18, count=2, low=40, high=41))
    ids = tokenizer.encode(images)
    payload = pickle.dumps(tokenizer)
    assert len(payload) < 100_000
    np.testing.assert_array_equal(pickle.loads(payload).encode(images), ids)
