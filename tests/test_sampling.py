"""KV-cache sampling, completion and the sample CLI: against full forward passes (igpt's and
transformers'), the filters' definitions, the softmax distribution, and the PNG it writes."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image
from reference_models import random_hf_model, random_igpt_params

import igpt
from igpt import figures
from igpt.sampling import complete, draw, filter_logits, sample, sample_batched

ROOT = Path(__file__).resolve().parents[1]
CONFIG = igpt.ModelConfig(
    n_embd=32, n_layer=2, n_head=4, n_positions=64, scale_attn_by_inverse_layer_idx=True
)


@pytest.fixture(scope="module")
def params():
    return random_igpt_params(CONFIG, seed=3, noise=0.3)


def _full_logits(config, params, tokens_BxN):
    """Next-token logits (B, N, V) of the model run without a cache over SOS + tokens[:, :-1]:
    row t predicts token t. Causal, so each row only sees the tokens before it."""
    sos = np.full((len(tokens_BxN), 1), config.sos_id)
    ids = np.concatenate([sos, np.asarray(tokens_BxN)[:, :-1]], axis=1)
    return np.asarray(igpt.ImageGPT(config).apply({"params": params}, jnp.asarray(ids)).logits)


def _greedy_by_full_forward(config, params, prompt_BxP, length):
    """Greedy decoding by one uncached forward pass per new token (one compiled shape: the
    tokens not yet decided are zeros, which causality hides from the row that is read)."""
    tokens = np.zeros((len(prompt_BxP), length), np.int32)
    tokens[:, : prompt_BxP.shape[1]] = prompt_BxP
    forward = jax.jit(lambda ids: igpt.ImageGPT(config).apply({"params": params}, ids).logits)
    sos = np.full((len(tokens), 1), config.sos_id, np.int32)
    for t in range(prompt_BxP.shape[1], length):
        ids = np.concatenate([sos, tokens[:, :-1]], axis=1)
        tokens[:, t] = np.argmax(np.asarray(forward(jnp.asarray(ids)))[:, t], axis=-1)
    return tokens


def _hf_greedy_by_full_forward(hf, prompt_BxP, length):
    """Greedy decoding with transformers, one uncached forward pass per new token."""
    ids = torch.cat([torch.full((len(prompt_BxP), 1), 512), torch.tensor(prompt_BxP)], dim=1)
    with torch.no_grad():
        while ids.shape[1] < length + 1:
            logits = hf(ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, 1:].numpy()


def test_greedy_sampling_matches_transformers_full_forward(tmp_path):
    hf = random_hf_model(seed=5, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    hf.save_pretrained(tmp_path)
    config, params, _ = igpt.load_hf(tmp_path)
    prompt = np.random.default_rng(0).integers(0, 512, (2, 5))
    got = sample(config, params, jax.random.key(0), num_samples=2, prompt=prompt, temperature=0)
    np.testing.assert_array_equal(got, _hf_greedy_by_full_forward(hf, prompt, 64))


@pytest.mark.parametrize("query_block", [256, 64, 48])
def test_long_image_forward_matches_transformers(tmp_path, query_block):
    # Full-length logits past the first query block, where igpt skips masked key blocks; 48
    # does not divide the length, so the last block is short.
    n_positions = 2 * query_block + 40
    hf = random_hf_model(seed=6, n_embd=32, n_layer=2, n_head=2, n_positions=n_positions)
    hf.save_pretrained(tmp_path)
    config, params, _ = igpt.load_hf(tmp_path)
    config = config.replace(query_block=query_block)
    ids = np.random.default_rng(1).integers(0, 512, (1, n_positions))
    ids[:, 0] = 512
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    logits = igpt.ImageGPT(config).apply({"params": params}, jnp.asarray(ids)).logits
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_greedy_sampling_matches_igpt_full_forward(params):
    for prompt_len in (0, 7):
        prompt = np.random.default_rng(prompt_len).integers(0, 512, (3, prompt_len))
        got = sample(CONFIG, params, jax.random.key(1), num_samples=3, prompt=prompt, top_k=1)
        expected = _greedy_by_full_forward(CONFIG, params, prompt, CONFIG.n_positions)
        np.testing.assert_array_equal(got, expected)


def test_every_sampled_token_is_in_the_top_k(params):
    k = 5
    out = np.asarray(sample(CONFIG, params, jax.random.key(3), num_samples=3, top_k=k))
    assert out.shape == (3, CONFIG.n_positions) and out.dtype == np.int32
    logits = _full_logits(CONFIG, params, out)
    kth = np.sort(logits, axis=-1)[..., -k]
    chosen = np.take_along_axis(logits, out[..., None], axis=-1)[..., 0]
    assert np.all(chosen >= kth - 1e-4)
    # Sampling, not greedy decoding: some tokens are not the most likely one.
    assert np.any(chosen < logits.max(-1) - 1e-4)


def test_prompt_comes_back_unchanged_and_the_rest_is_in_the_nucleus(params):
    top_p = 0.3
    prompt = np.random.default_rng(2).integers(0, 512, (3, 7))
    out = np.asarray(
        sample(CONFIG, params, jax.random.key(4), num_samples=3, prompt=prompt, top_p=top_p)
    )
    np.testing.assert_array_equal(out[:, :7], prompt)
    logits = _full_logits(CONFIG, params, out)[:, 7:].astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.take_along_axis(logits, out[:, 7:, None], axis=-1)
    mass_of_more_likely = np.where(logits > chosen, probs, 0).sum(-1)
    assert np.all(mass_of_more_likely < top_p + 1e-4)
    assert np.any(mass_of_more_likely > 0)

    shared = sample(CONFIG, params, jax.random.key(4), num_samples=3, prompt=prompt[0], top_p=0.5)
    np.testing.assert_array_equal(np.asarray(shared)[:, :7], np.broadcast_to(prompt[0], (3, 7)))
    whole = np.random.default_rng(3).integers(0, 512, (2, CONFIG.n_positions))
    full = sample(CONFIG, params, jax.random.key(2), num_samples=2, prompt=whole)
    np.testing.assert_array_equal(full, whole)


def test_one_step_frequencies_match_the_softmax(params):
    # One sampled token after a fixed prompt, drawn 20,000 times (one batch), under top-k 20 and
    # temperature 0.8. Expected: the softmax of the top 20 logits / 0.8, from an uncached
    # forward pass in float64. Pearson's statistic over the 20 tokens has 19 degrees of
    # freedom; 50.8 is its 1 - 1e-4 quantile, so a correct sampler fails this fixed-seed test
    # with probability 1e-4, while a wrong temperature, filter or CDF gives values in the
    # hundreds (here: 9 as sampled; ~1200 against temperature 1, ~650 against 0.7).
    n, k, temperature = 20_000, 20, 0.8
    prompt = np.array([3, 141, 59], np.int32)
    out = sample(
        CONFIG,
        params,
        jax.random.key(5),
        num_samples=n,
        prompt=prompt,
        top_k=k,
        temperature=temperature,
        length=len(prompt) + 1,
    )
    drawn = np.asarray(out)[:, -1]
    logits = _full_logits(CONFIG, params, np.append(prompt, 0)[None])[0, -1].astype(np.float64)
    top = np.argsort(logits)[-k:]
    p = np.exp((logits[top] - logits[top].max()) / temperature)
    p /= p.sum()
    assert np.isin(drawn, top).all()
    observed = np.array([(drawn == token).sum() for token in top])
    chi2 = ((observed - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 50.8, chi2


def test_same_key_same_samples_and_new_key_new_samples(params):
    a = sample(CONFIG, params, jax.random.key(7), num_samples=3, top_k=5)
    b = sample(CONFIG, params, jax.random.key(7), num_samples=3, top_k=5)
    c = sample(CONFIG, params, jax.random.key(8), num_samples=3, top_k=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_compiles_once_per_shape(params):
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    options = dict(num_samples=3, prompt=np.arange(7), top_p=0.9)
    sample(CONFIG, params, jax.random.key(0), **options)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for seed, temperature, top_p in [(1, 1.0, 0.9), (2, 0.5, 0.7), (3, 2.0, 0.95)]:
            options.update(top_p=top_p)
            key = jax.random.key(seed)
            sample(CONFIG, params, key, temperature=temperature, **options)
        assert compiles == []
        sample(CONFIG, params, jax.random.key(0), **(options | {"num_samples": 4}))
        assert compiles  # a new batch size is a new program
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_filter_logits_is_exact_with_ties_and_masked_tokens():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 512)).astype(np.float32) * 3
    x[:, :200] = np.round(x[:, :200])  # many exact ties, and -0.0 next to +0.0
    x[1, 300:400] = -np.inf
    for k in (1, 7, 150, 511):
        kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(x), 1.0, top_k=k)))
        kth = -np.sort(-x, axis=-1)[:, k - 1 : k]
        np.testing.assert_array_equal(kept, (x >= kth) & np.isfinite(x))
    for top_p in (0.05, 0.5, 0.97):
        kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(x), 1.0, top_p=top_p)))
        probs = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        above = np.array([[probs[b][x[b] > v].sum() for v in x[b]] for b in range(4)])
        expected = (above < top_p) & np.isfinite(x)
        # float32 mass sums may disagree only for tokens right at the cut
        disagree = kept != expected
        assert np.all(np.abs(above[disagree] - top_p) < 1e-5)


def test_draw_inverts_the_cdf_and_never_draws_impossible_tokens():
    logits = jnp.log(jnp.array([[0.0, 0.25, 0.0, 0.5, 0.25, 0.0]] * 5))
    u = jnp.array([0.0, 0.2499, 0.25, 0.7501, np.nextafter(np.float32(1), 0)])
    np.testing.assert_array_equal(draw(logits, u), [1, 1, 3, 4, 4])


def test_complete_keeps_the_top_rows(params):
    side = CONFIG.image_side
    originals = np.random.default_rng(9).integers(0, 512, (2, CONFIG.n_positions))
    out = complete(CONFIG, params, jax.random.key(9), originals, rows_kept=0.25, num_completions=3)
    assert out.shape == (2, 3, CONFIG.n_positions)
    kept = 2 * side  # a quarter of 8 rows
    np.testing.assert_array_equal(out[:, :, :kept], np.repeat(originals[:, None, :kept], 3, 1))
    assert not np.array_equal(out[:, 0, kept:], out[:, 1, kept:])
    # In batches (padded last batch), the same result shapes and kept rows.
    batched = sample_batched(
        CONFIG, params, jax.random.key(9), num_samples=5, prompt=originals[0, :kept], batch_size=2
    )
    assert batched.shape == (5, CONFIG.n_positions)
    np.testing.assert_array_equal(
        batched[:, :kept], np.broadcast_to(originals[0, :kept], (5, kept))
    )


# ---------------------------------------------------------------------------------------------
# The CLI


def _cli(args):
    """Run scripts/sample.py; returns (exit status, stderr)."""
    result = run_script("sample", *args)
    return result.returncode, result.stderr


@pytest.fixture(scope="module")
def palette():
    return np.random.default_rng(4).uniform(-1, 1, (512, 3)).astype(np.float32)


def _tile(picture, row, col, size, pad=2):
    top, left = pad + row * (size + pad), pad + col * (size + pad)
    return picture[top : top + size, left : left + size]


def test_cli_writes_a_grid_from_a_transformers_directory(tmp_path, params, palette):
    igpt.save_hf(CONFIG, params, tmp_path / "hf", palette=palette)  # + preprocessor_config
    out = tmp_path / "grid.png"
    args = [f"--model={tmp_path / 'hf'}", f"--out={out}", "--num=5", "--scale=3"]
    assert _cli(args + ["--top_k=30", "--batch_size=2"])[0] == 0
    picture = np.asarray(Image.open(out))
    # 5 samples: a 3 x 2 grid of 8x8 images shown at 24x24 with 2-pixel gaps.
    assert picture.shape == (2 + 2 * 26, 2 + 3 * 26, 3)
    ids = np.load(tmp_path / "grid.npz")["ids"]
    assert ids.shape == (5, 64)
    colours = np.clip(np.rint(127.5 * (palette.astype(np.float64) + 1)), 0, 255)
    expected = colours[ids[4]].reshape(8, 8, 3).repeat(3, 0).repeat(3, 1)
    np.testing.assert_array_equal(_tile(picture, 1, 1, 24), expected)


def test_cli_completes_images_from_an_igpt_model_directory(tmp_path, params, palette):
    igpt.save_model(tmp_path / "model", CONFIG, params, palette)
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"in{i}.png")
    out = tmp_path / "completions.png"
    args = [f"--model={tmp_path / 'model'}", f"--out={out}", "--scale=2"]
    args += [f"--complete={tmp_path / 'in0.png'},{tmp_path / 'in1.png'}", "--num=3"]
    assert _cli(args)[0] == 0
    picture = np.asarray(Image.open(out))
    # One row per image: occluded input, 3 completions, original; 16x16 tiles.
    assert picture.shape == (2 + 2 * 18, 2 + 5 * 18, 3)
    saved = np.load(tmp_path / "completions.npz")
    assert saved["ids"].shape == (2, 3, 64) and saved["inputs"].shape == (2, 64)
    np.testing.assert_array_equal(
        saved["ids"][:, :, :32], np.repeat(saved["inputs"][:, None, :32], 3, 1)
    )
    occluded, original = _tile(picture, 0, 0, 16), _tile(picture, 0, 4, 16)
    np.testing.assert_array_equal(occluded[:8], original[:8])
    assert np.all(occluded[8:] == figures.GREY)
    np.testing.assert_array_equal(_tile(picture, 1, 2, 16)[:8], _tile(picture, 1, 4, 16)[:8])


def test_cli_reports_a_missing_palette_without_a_traceback(tmp_path, params, palette):
    igpt.save_model(tmp_path / "model", CONFIG, params)  # no palette
    args = [f"--model={tmp_path / 'model'}", f"--out={tmp_path / 'x.png'}"]
    status, error = _cli(args)
    assert status == 2 and "--palette=palette.npy" in error and "Traceback" not in error
    np.save(tmp_path / "palette.npy", palette)
    args += [f"--palette={tmp_path / 'palette.npy'}"]
    assert _cli(args + ["--num=3", "--top_k=5"])[0] == 0
    assert (tmp_path / "x.png").exists() and (tmp_path / "x.npz").exists()
    status, error = _cli(args + [f"--complete={tmp_path / 'none.png'}"])
    assert status == 2 and "does not exist" in error
