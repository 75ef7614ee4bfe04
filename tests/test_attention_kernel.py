"""igpt's fused CPU attention kernel (igpt/cpu_kernels.cc): its values and gradients
against attention written out plainly here, the model with it against the model with XLA's
attention, and that the programs that should call it do."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_models import random_igpt_params
from test_train_step import sharded_steps_match_one_device

import igpt
from igpt import attention_kernel, cpu_kernels
from igpt.sharding import make_mesh
from igpt.train.step import make_eval_step


def _plain_attention(qkv, scale, causal):
    """softmax(scale q k^T + mask) v per head, in float64 numpy: no blocks, no kernels."""
    q, k, v = (np.moveaxis(qkv[:, :, i].astype(np.float64), 2, 1) for i in range(3))  # BxHxTxK
    scores = scale * q @ np.swapaxes(k, -1, -2)
    if causal:
        t = q.shape[2]
        scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.moveaxis(probs @ v, 1, 2)  # BxTxHxK


def _qkv(b, t, h, k, seed=0):
    return np.random.default_rng(seed).normal(size=(b, t, 3, h, k)).astype(np.float32) * 1.5


# Lengths that are not whole vectors or whole blocks of 32 queries; widths of 1, 2, 3, 4 and 8
# vectors of 16 floats (AVX-512), or 2, 4, 6, 8 and 16 of 8 (AVX2): the kernel's products take
# an even number of vectors two at a time, an odd one whole.
@pytest.mark.parametrize(
    "b, t, h, k, causal",
    [
        (2, 37, 3, 16, True),
        (1, 70, 2, 32, True),
        (2, 33, 2, 64, False),
        (1, 64, 1, 32, False),
        (1, 20, 2, 128, True),
        (1, 45, 2, 48, True),
    ],
)
def test_kernel_values_and_gradients_equal_plain_attention(b, t, h, k, causal):
    assert attention_kernel.available(k), "the kernel must build on test machines"
    qkv = _qkv(b, t, h, k)
    scale = np.float32(0.3)
    out = jax.jit(lambda x, s: attention_kernel.attention(x, s, causal=causal))(qkv, scale)
    np.testing.assert_allclose(out, _plain_attention(qkv, scale, causal), atol=2e-5, rtol=0)

    # Gradients by central differences of the plain float64 attention along random
    # directions: of qkv (every slot: queries, keys, values) and of the scale.
    weights = np.random.default_rng(1).normal(size=out.shape)

    def plain_loss(x, s):
        return np.sum(_plain_attention(x, s, causal) * weights)

    def loss(x, s):
        return jnp.sum(attention_kernel.attention(x, s, causal=causal) * weights)

    def numeric(direction, d_scale=0.0):
        """The plain loss's derivative along (direction, d_scale), central differences."""
        x, s, eps = qkv.astype(np.float64), np.float64(scale), 1e-4
        up = plain_loss(x + eps * direction, s + eps * d_scale)
        return (up - plain_loss(x - eps * direction, s - eps * d_scale)) / (2 * eps)

    d_qkv, d_scale = jax.jit(jax.grad(loss, argnums=(0, 1)))(qkv, scale)
    for seed in range(3):
        direction = np.random.default_rng(10 + seed).normal(size=qkv.shape)
        assert np.sum(d_qkv * direction) == pytest.approx(numeric(direction), rel=1e-4, abs=1e-3)
    d = numeric(np.zeros(qkv.shape), d_scale=1.0)
    assert float(d_scale) == pytest.approx(d, rel=1e-4, abs=1e-3)
    # Each slot alone: a swapped or dropped slot of the gradient shows here.
    for slot in range(3):
        direction = np.zeros(qkv.shape)
        direction[:, :, slot] = np.random.default_rng(20 + slot).normal(size=qkv[:, :, 0].shape)
        assert np.sum(d_qkv * direction) == pytest.approx(numeric(direction), rel=1e-4, abs=1e-3)


CONFIG = igpt.ModelConfig(n_embd=64, n_layer=2, n_head=4, n_positions=49, vocab_size=17)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"objective": "bert"}, {"scale_attn_by_inverse_layer_idx": True}],
    ids=["ar", "bert", "inverse-layer-scale"],
)
def test_the_model_with_the_kernel_equals_the_model_with_xla_attention(overrides):
    config = CONFIG.replace(**overrides)
    # Noise on every parameter: at initialisation the logit head and the blocks' output
    # projections are zero, which would hide attention from the logits and most gradients.
    params = random_igpt_params(config, noise=0.3)
    ids = np.random.default_rng(0).integers(0, config.palette_size, (3, config.n_positions))

    def loss(p, attention):
        out = igpt.ImageGPT(config.replace(attention=attention)).apply({"params": p}, ids)
        return jnp.mean(jax.nn.logsumexp(out.logits, -1) - out.logits[..., 0]), out.logits

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (loss_k, logits_k), grads_k = value_and_grad(params, "auto")
    (loss_x, logits_x), grads_x = value_and_grad(params, "xla")
    np.testing.assert_allclose(logits_k, logits_x, atol=2e-5, rtol=0)
    assert float(loss_k) == pytest.approx(float(loss_x), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_x), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def _lowered_eval_step(config, mesh_shape=(1, 1, 1)) -> str:
    """The eval step on a mesh of this shape, lowered for this CPU (StableHLO text: what XLA
    compiles, without the time compiling takes)."""
    mesh = make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    params = igpt.init_params(config, jax.random.key(0))
    batch = {
        "tokens": np.zeros((8, config.n_positions), np.int32),
        "label": np.zeros(8, np.int32),
        "mask": np.ones(8, bool),
    }
    step = make_eval_step(config, mesh)
    return step.lower(params, batch).as_text()


def test_programs_on_cpus_call_the_kernel_in_float32_and_bfloat16_and_xla_does_not():
    for dtype in ("float32", "bfloat16"):
        assert "custom_call @igpt_attention_forward" in _lowered_eval_step(
            CONFIG.replace(dtype=dtype)
        )
    assert "igpt_attention" not in _lowered_eval_step(CONFIG.replace(attention="xla"))


def test_a_bfloat16_model_with_the_kernel_is_as_close_to_float32_as_with_xla_attention():
    # In bfloat16 programs the kernel attends in float32 (q, k and v come from the projection
    # in float32), where XLA's attention rounds them to bfloat16; the dense products round in
    # both, and their rounding is most of the difference from float32.
    params = random_igpt_params(CONFIG, noise=0.3)
    ids = np.random.default_rng(0).integers(0, CONFIG.palette_size, (3, CONFIG.n_positions))

    def error(**overrides):
        model = igpt.ImageGPT(CONFIG.replace(**overrides))
        logits = jax.jit(lambda p: model.apply({"params": p}, ids).logits)(params)
        return float(np.abs(logits - want).mean())

    want = igpt.ImageGPT(CONFIG.replace(attention="xla")).apply({"params": params}, ids).logits
    kernel_error, xla_error = error(dtype="bfloat16"), error(dtype="bfloat16", attention="xla")
    assert 0 < kernel_error < 1.1 * xla_error, (kernel_error, xla_error)


def test_without_a_compiler_attention_runs_through_xla(monkeypatch, tmp_path):
    failing = tmp_path / "failing-c++"  # a compiler's error, then its pointer line
    errors = 'echo "kernel.cc:1:2: error: no such thing" >&2\necho "  | ^" >&2'
    failing.write_text(f"#!/bin/sh\n{errors}\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cases = [
        ("no-such-compiler", "no C\\+\\+ compiler 'no-such-compiler'"),
        (str(failing), "failed \\(kernel.cc:1:2: error: no such thing\\)"),
    ]
    try:
        for compiler, message in cases:
            monkeypatch.setenv("CXX", compiler)
            cpu_kernels.library.cache_clear()
            with pytest.warns(UserWarning, match=message):
                assert not attention_kernel.available(16)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert "igpt_attention" not in _lowered_eval_step(CONFIG)
    finally:
        cpu_kernels.library.cache_clear()


def test_a_sharded_step_with_the_kernel_matches_one_device():
    # Each device runs the kernel on its own rows of the batch and its own heads (shard_map).
    setup = (
        "from test_attention_kernel import CONFIG, _lowered_eval_step; "
        "assert 'igpt_attention_forward' in _lowered_eval_step(CONFIG, (2, 2, 2))"
    )
    sharded_steps_match_one_device("CONFIG", setup)


# Filled positions below one vector, past whole vectors, none, all; the last two cases read
# enough of the cache to run on several threads: the matvec kernel's (up to 4 sequences) and
# XLA's pool's.
@pytest.mark.parametrize(
    "b, h, k, s, start",
    [
        (2, 3, 16, 40, 5),
        (1, 2, 32, 40, 37),
        (2, 1, 64, 40, 0),
        (1, 3, 16, 40, 40),
        (2, 8, 64, 600, 530),
        (5, 2, 64, 300, 261),
    ],
)
def test_decode_attention_equals_plain_attention_over_the_filled_cache(b, h, k, s, start):
    assert attention_kernel.available(k), "the kernel must build on test machines"
    rng = np.random.default_rng(start)
    qkv = rng.normal(size=(b, 1, 3, h, k)).astype(np.float32)
    keys = rng.normal(size=(b, h, k, s)).astype(np.float32)
    values = rng.normal(size=(b, h, s, k)).astype(np.float32)
    keys[..., start:] = values[:, :, start:] = 1e6  # unfilled: must not count
    scale = np.float32(0.2)
    got, new_keys, new_values = jax.jit(attention_kernel.decode)(qkv, keys, values, start, scale)

    # The same attention over the filled positions and the token itself, as a sequence:
    # the last query of plain causal attention.
    seq = np.zeros((b, start + 1, 3, h, k), np.float32)
    seq[:, :start, 1] = np.moveaxis(keys[..., :start], 3, 1)
    seq[:, :start, 2] = np.moveaxis(values[:, :, :start], 2, 1)
    seq[:, start] = qkv[:, 0]
    expected = _plain_attention(seq, scale, causal=True)[:, -1:]
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
    # The new token's key and value are written where the model's dynamic_update_slice
    # would write them (at a full cache, its last position), the rest unchanged.
    k_new, v_new = np.moveaxis(qkv[:, :, 1], 1, -1), np.moveaxis(qkv[:, :, 2], 1, 2)
    update = jax.lax.dynamic_update_slice
    np.testing.assert_array_equal(new_keys, update(keys, k_new, (0, 0, 0, start)))
    np.testing.assert_array_equal(new_values, update(values, v_new, (0, 0, start, 0)))
