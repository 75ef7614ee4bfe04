"""igpt's decoding kernels on CPUs (igpt/cpu_kernels.cc): the matrix-vector kernel, which dense
products of a few rows take, against float64 products, a dense layer's values and gradients
with it, concurrent calls; and a wide model's cached decoding, with it and the decode attention
kernel, against its full forward pass, and the sampler's loop updating its caches in place.
The decode attention kernel's own values are tested in test_attention_kernel.py."""

from __future__ import annotations

import concurrent.futures
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_models import random_igpt_params

import igpt
from benchmarks.profile import parse_hlo
from igpt import cpu_kernels, precision, sampling
from igpt.model import decode_step, init_cache, split_layers


# Rows 1-4; K past whole bands of 8 rows and tasks of 128 (so that both threads add sums), or
# below one band; N past whole vectors of 16 (and of 8), or below one. Weights in float32 or
# bfloat16 (read as they are, and widened in the kernel).
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k, n", [(517, 1536), (2048, 37), (5, 3), (130, 1)])
def test_kernel_equals_float64_products(rows, k, n, dtype):
    assert cpu_kernels.matvec_takes(rows), "the kernel must build on test machines"
    rng = np.random.default_rng(rows * k + n)
    x = rng.normal(size=(rows, k)).astype(np.float32)
    w = jnp.asarray(rng.normal(size=(k, n)), dtype)
    got = jax.jit(cpu_kernels.matvec)(x, w)
    expected = x.astype(np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.sqrt(k), rtol=0)


def test_five_rows_are_refused():
    assert not cpu_kernels.matvec_takes(5)
    with pytest.raises(ValueError, match="does not take 5 rows"):
        cpu_kernels.matvec(jnp.zeros((5, 8)), jnp.zeros((8, 16)))


def test_a_dense_layer_of_few_rows_takes_the_kernel_with_flaxs_values_and_gradients():
    # 1 MiB of weights: the smallest the kernel takes.
    layer = igpt.model.nn.Dense(512, dot_general=precision.dot_general(jnp.float32))
    plain = igpt.model.nn.Dense(512)
    x = np.random.default_rng(0).normal(size=(3, 512)).astype(np.float32)
    params = plain.init(jax.random.key(0), x)
    assert "igpt_matvec" in jax.jit(layer.apply).lower(params, x).as_text()
    assert "igpt_matvec" not in jax.jit(layer.apply).lower(params, np.tile(x, (2, 1))).as_text()

    def loss(module, p, x):
        return jnp.sum(jnp.sin(module.apply(p, x)))

    np.testing.assert_allclose(layer.apply(params, x), plain.apply(params, x), atol=1e-4)
    got = jax.grad(lambda p, x: loss(layer, p, x), argnums=(0, 1))(params, x)
    expected = jax.grad(lambda p, x: loss(plain, p, x), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


# d=512: every dense weight is at least 1 MiB (the logit head's too). d=128: none is.
WIDE = igpt.ModelConfig(n_embd=512, n_layer=2, n_head=8, n_positions=12)


# bfloat16: the products round their inputs, the kernel's and XLA's alike, and sum them in
# another order, so an input a rounding step away from the full pass's can flip (0.008-0.014
# off from the fourth token). The cache is float32, as the fused attention of the full pass
# reads keys and values; with a bfloat16 cache and XLA's products, 0.022-0.034 off.
@pytest.mark.parametrize("batch, dtype, atol", [(1, "float32", 1e-4), (3, "float32", 1e-4),
                                                (2, "bfloat16", 2e-2)])  # fmt: skip
def test_cached_decoding_of_a_wide_model_takes_the_kernels_and_matches_the_full_forward(
    batch, dtype, atol
):
    config = WIDE.replace(dtype=dtype)
    params = random_igpt_params(config, seed=batch, noise=0.05)
    ids = np.random.default_rng(batch).integers(0, 512, (batch, config.n_positions))
    ids[:, 0] = config.sos_id
    full = igpt.ImageGPT(config).apply({"params": params}, jnp.asarray(ids)).logits

    # As the sampler does: kernels rounded once, for the matvec to read as they are.
    rounded = precision.round_kernels(params, config.compute_dtype)
    layers = split_layers(rounded["h"], config.n_layer)
    step = jax.jit(lambda caches, x, t: decode_step(config, rounded, layers, caches, x, t))
    caches = split_layers(init_cache(config, batch)["h"], config.n_layer)
    assert all(c.dtype == jnp.float32 for c in jax.tree.leaves(caches))
    text = step.lower(caches, jnp.asarray(ids[:, :1]), jnp.int32(0)).as_text()
    # Per layer: the projections in and out of attention and the two MLP layers; the head.
    assert text.count("custom_call @igpt_matvec") == 4 * config.n_layer + 1
    assert text.count("custom_call @igpt_decode_attention") == config.n_layer
    for t in range(config.n_positions):
        logits, caches = step(caches, jnp.asarray(ids[:, t : t + 1]), jnp.int32(t))
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=atol, rtol=0)


def test_a_narrow_models_decoding_keeps_xlas_products():
    config = WIDE.replace(n_embd=128, n_head=4)
    params = igpt.init_params(config, jax.random.key(0))
    layers = split_layers(params["h"], config.n_layer)
    caches = split_layers(init_cache(config, 1)["h"], config.n_layer)
    step = jax.jit(lambda caches, x: decode_step(config, params, layers, caches, x, 0))
    assert "igpt_matvec" not in step.lower(caches, jnp.zeros((1, 1), jnp.int32)).as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_repeated_calls_give_the_same_bits(rows, dtype):
    # Sampling with one key must draw the same image every time: the sums of the row bands
    # that the threads share out must add up in one order whichever thread ran which. (With
    # sums kept per thread, 81 of 100 calls of this product gave distinct bits.)
    rng = np.random.default_rng(rows)
    x = rng.normal(size=(rows, 2048)).astype(np.float32)
    w = jnp.asarray(rng.normal(size=(2048, 512)), dtype)
    product = jax.jit(cpu_kernels.matvec)
    first = np.asarray(product(x, w))
    for _ in range(50):
        np.testing.assert_array_equal(product(x, w), first)


def test_concurrent_calls_each_get_their_own_product():
    # Calls from several threads at once share the kernel's spinning threads: each caller
    # must still get its own sums, complete.
    rng = np.random.default_rng(0)
    w = rng.normal(size=(1024, 512)).astype(np.float32)
    xs = rng.normal(size=(8, 2, 1024)).astype(np.float32)
    product = jax.jit(cpu_kernels.matvec)
    expected = [x.astype(np.float64) @ w for x in xs]

    def check(i):
        for _ in range(20):
            np.testing.assert_allclose(product(xs[i], w), expected[i], atol=1e-3, rtol=0)

    with concurrent.futures.ThreadPoolExecutor(len(xs)) as pool:
        list(pool.map(check, range(len(xs))))


@pytest.mark.parametrize("attention", ["auto", "xla"])
def test_the_samplers_loop_updates_every_cache_in_place(attention):
    # The caches are updated in place, by the decode attention kernel (into its aliased
    # buffers) or by XLA's dynamic_update_slice: a copy per layer and step would read and
    # write the whole cache for one position (at S, batch 16, 256 tokens, 16 MB a layer).
    # XLA:CPU's default copy insertion made such copies around its own attention's products.
    config = WIDE.replace(attention=attention)
    batch, caches = 2, init_cache(config, 2)["h"]
    program = sampling._compiled_sampler(config, batch, 0, config.n_positions, False, None, False)
    params = igpt.init_params(config, jax.random.key(0))
    prompt = jnp.zeros((batch, 0), jnp.int32)
    text = program.lower(params, jax.random.key(0), prompt, 1.0, 1.0).compile().as_text()
    instructions, computations = parse_hlo(text)

    def inside(loop):  # the instructions of a while loop's body and what it calls
        todo, reached = [re.search(r"body=%([\w.\-]+)", loop.attributes).group(1)], set()
        while todo:
            name = todo.pop()
            if name not in reached:
                reached.add(name)
                todo += [c for i in computations[name] for c in instructions[i].called]
        return [instructions[i] for name in reached for i in computations[name]]

    def attends(inst):
        return "igpt_decode_attention" in inst.attributes

    def updates(inst):
        return attends(inst) or "dynamic-update-slice" in inst.opcode + inst.attributes

    loops = [inside(i) for i in instructions.values() if i.opcode == "while"]
    (looped,) = [body for body in loops if any(updates(i) for i in body)]  # the token loop
    kernel_calls = sum(attends(i) for i in looped)
    assert kernel_calls == (config.n_layer if attention == "auto" else 0)
    cache_dims = {c.shape[1:] for c in jax.tree.leaves(caches)}  # a layer's
    copies = [i for i in looped if i.opcode == "copy" and i.dims in cache_dims]
    assert not copies, f"the loop copies {len(copies)} caches per step"
