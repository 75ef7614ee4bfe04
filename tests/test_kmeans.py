"""k-means palette fitting: known centres, determinism, scikit-learn's inertia, pixel sampling."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script
from sklearn.cluster import KMeans
from sklearn.datasets import load_sample_images
from transformers import ImageGPTImageProcessor

from igpt.data import ArraySource, open_source
from igpt.kmeans import fit_palette, sample_pixels
from igpt.pixels import PIXEL_LEVELS, pixel_values
from igpt.tokenizer import ColorTokenizer

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache
def _photo_pixels(count=20_000, seed=0):
    """Pixels of scikit-learn's china.jpg photograph, in [-1, 1]."""
    photo = load_sample_images().images[0].reshape(-1, 3)
    rng = np.random.default_rng(seed)
    return pixel_values(photo[rng.choice(len(photo), count, replace=False)])


def _true_inertia(pixels, palette):
    d = ((pixels[:, None].astype(np.float64) - palette[None].astype(np.float64)) ** 2).sum(-1)
    return d.min(1).sum()


def test_recovers_known_centres():
    """Blobs drawn around 12 separated centres give back those centres."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(-0.8, 0.8, (200, 3))
    keep = [0]  # greedy pick of centres at least 0.3 apart
    for i in range(1, len(centres)):
        if len(keep) < 12 and np.linalg.norm(centres[keep] - centres[i], axis=1).min() > 0.3:
            keep.append(i)
    centres = centres[keep]
    pixels = (np.repeat(centres, 400, 0) + rng.normal(0, 0.02, (12 * 400, 3))).astype(np.float32)
    palette, inertia = fit_palette(pixels, 12, seed=1, verbose=False)
    assert palette.shape == (12, 3) and palette.dtype == np.float32
    gap = np.linalg.norm(centres[:, None] - palette[None], axis=-1)
    assert gap.min(1).max() < 0.01  # every true centre has a fitted one next to it
    assert gap.min(0).max() < 0.01  # and every fitted centre sits on a true one
    # 4,800 points with 3 * 0.02^2 expected squared distance each
    assert inertia == pytest.approx(4800 * 3 * 0.02**2, rel=0.1)


def test_deterministic_for_a_seed():
    """Same seed: identical palette and inertia; another seed: a different palette."""
    pixels = _photo_pixels()
    first = fit_palette(pixels, 16, seed=3, verbose=False)
    second = fit_palette(pixels, 16, seed=3, verbose=False)
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]
    assert not np.array_equal(first[0], fit_palette(pixels, 16, seed=4, verbose=False)[0])


@pytest.mark.parametrize("k", [8, 48])
def test_inertia_close_to_scikit_learn(k, capsys):
    """On photo pixels the inertia is within 5% of scikit-learn's KMeans (k-means++, Lloyd),
    and the reported inertia is the true one of the returned palette."""
    pixels = _photo_pixels()
    palette, inertia = fit_palette(pixels, k, seed=0, chunk_size=3000)
    reference = KMeans(k, n_init=1, random_state=0).fit(pixels).inertia_
    assert inertia <= 1.05 * reference
    assert inertia == pytest.approx(_true_inertia(pixels, palette), rel=1e-4)
    assert np.all(np.abs(palette) <= 1)
    assert f"inertia {inertia:.6g}" in capsys.readouterr().out


def test_few_distinct_colours_warn():
    """Asking for more palette than there are colours warns; every colour becomes a cluster."""
    colours = np.array([[-1, -1, -1], [1, 1, 1], [0, 0, 0], [0.5, -0.5, 0]], np.float32)
    pixels = np.repeat(colours, 50, 0)
    with pytest.warns(UserWarning, match="4 distinct colours"):
        palette, inertia = fit_palette(pixels, 6, seed=0, verbose=False)
    assert inertia == 0
    assert {tuple(c) for c in palette} == {tuple(c) for c in colours}


def test_bad_arguments_raise():
    """Pixels outside [-1, 1] (e.g. uint8 values) and k > N are refused with the fix."""
    with pytest.raises(ValueError, match="pixel_values"):
        fit_palette(np.full((10, 3), 200.0), 2, verbose=False)
    with pytest.raises(ValueError, match="between 1 and"):
        fit_palette(np.zeros((3, 3)), 5, verbose=False)


def test_sample_pixels_from_a_source():
    """Pixels come spread over the images, scaled like the tokenizer, deterministically; a
    request larger than the source returns every pixel once, with a warning."""
    source = open_source("digits:test")  # 500 images of 8x8
    pixels = sample_pixels(source, 1000, seed=0)
    assert pixels.shape == (1000, 3) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, sample_pixels(source, 1000, seed=0))
    assert not np.array_equal(pixels, sample_pixels(source, 1000, seed=1))
    assert np.isin(pixels, PIXEL_LEVELS).all()
    with pytest.warns(UserWarning, match="32,000 of the 40,000"):
        everything = sample_pixels(source, 40_000, seed=0)
    expected = pixel_values(np.stack([source[i]["image"] for i in range(500)]).reshape(-1, 3))
    np.testing.assert_array_equal(np.sort(everything, 0), np.sort(expected, 0))
    # With size, pixels are drawn from the resized images.
    ramp = np.broadcast_to(np.arange(0, 256, 4, dtype=np.uint8)[None, :, None], (64, 64, 3))
    resized = sample_pixels(ArraySource(ramp[None].copy()), 16, size=4, seed=0)
    assert len(np.unique(resized[:, 0])) <= 4


def test_script_writes_a_loadable_palette(tmp_path):
    """scripts/fit_palette.py writes an .npy palette and a preprocessor config that both the
    tokenizer and transformers read."""
    out = tmp_path / "palette.npy"
    result = run_script(
        "fit_palette", "--data=digits", "--k=6", "--num_pixels=3000", "--size=8",
        f"--out={out}", f"--preprocessor_config={tmp_path / 'hf'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tokenizer = ColorTokenizer.from_npy(out)
    assert tokenizer.palette_size == 6
    config = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    np.testing.assert_array_equal(np.asarray(config["clusters"], np.float32), tokenizer.palette)
    assert config["size"] == {"height": 8, "width": 8}
    processor = ImageGPTImageProcessor.from_pretrained(tmp_path / "hf")
    np.testing.assert_array_equal(np.asarray(processor.clusters, np.float32), tokenizer.palette)
