"""igpt.precision: products of bfloat16-rounded inputs with float32 results, forward and in
both gradient products."""

import functools
import re

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from igpt import precision

BF16 = jnp.bfloat16
SHAPES = [
    ("mk,kn->mn", (6, 5), (5, 7)),  # a dense layer, fewer inputs than outputs
    ("mk,kn->mn", (6, 7), (7, 5)),  # and more: the other operand is transposed on CPUs
    ("bhtk,bhsk->bhts", (2, 3, 4, 8), (2, 3, 6, 8)),  # attention scores
    ("bhts,bhsk->bhtk", (2, 3, 4, 6), (2, 3, 6, 8)),  # attention values
]


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _rounded(tree):
    return jax.tree.map(lambda x: x.astype(BF16).astype(jnp.float32), tree)


def _reference_vjp(fn, args, g):
    """JAX's own float32 gradient at the rounded inputs, for the rounded cotangent: exactly the
    products a bfloat16 product with float32 accumulation computes (bf16 x bf16 is exact in
    float32), summed in another order."""
    out, vjp = jax.vjp(fn, *(_rounded(x) for x in args))
    return out, vjp(_rounded(g))


@pytest.mark.parametrize("spec, a_shape, b_shape", SHAPES)
def test_einsum_and_its_gradients_are_products_of_rounded_values(spec, a_shape, b_shape):
    a, b = _normal(0, a_shape), _normal(1, b_shape)
    out, vjp = jax.vjp(lambda a, b: precision.einsum(spec, a, b, BF16), a, b)
    g = _normal(2, out.shape)
    want_out, want_grads = _reference_vjp(lambda a, b: jnp.einsum(spec, a, b), (a, b), g)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(g), want_grads, strict=True):
        assert got.dtype == jnp.float32
        # An unrounded cotangent would be off by ~1e-2 here.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec, a_shape, b_shape", SHAPES)
def test_every_product_of_the_gradient_reads_bfloat16_and_returns_float32(spec, a_shape, b_shape):
    # What makes it fast on CPUs: JAX's own rules would give these products float32 or mixed
    # inputs (the cotangent is float32) and bfloat16 results.
    def loss(a, b):
        return jnp.sum(jnp.square(precision.einsum(spec, a, b, BF16)))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(_normal(0, a_shape), _normal(1, b_shape))
    products = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    # The forward product and the two gradient products; the one that contracts the rows of
    # both operands (a weight gradient, attention's key and value gradients) has a CPU form and
    # the other platforms' one.
    assert len(products) == 4
    for e in products:
        assert [v.aval.dtype for v in e.invars] == [BF16, BF16], e
        assert e.outvars[0].aval.dtype == jnp.float32, e


# Large enough for XLA:CPU's fast kernels; each product transposes either operand.
KERNEL_SHAPES = [
    ("mk,kn->mn", (64, 16), (16, 32)),
    ("mk,kn->mn", (64, 32), (32, 16)),
    ("bhtk,bhsk->bhts", (2, 3, 32, 16), (2, 3, 48, 16)),
    ("bhtk,bhsk->bhts", (2, 3, 32, 64), (2, 3, 48, 64)),
    ("bhts,bhsk->bhtk", (2, 3, 32, 48), (2, 3, 48, 16)),
    ("bhts,bhsk->bhtk", (2, 3, 32, 48), (2, 3, 48, 64)),
]


@pytest.mark.parametrize("spec, a_shape, b_shape", KERNEL_SHAPES)
def test_on_cpu_every_gradient_product_contracts_rows_with_columns(spec, a_shape, b_shape):
    # XLA:CPU's fast bfloat16 kernels take the left operand with its contracted axis last. A
    # weight gradient contracts the tokens, which both operands have first, and so do the key
    # and value gradients of attention: one of the operands must be transposed in memory
    # (2.5-4x faster weight gradients; batched products XLA would otherwise compute in
    # float32). Without the layout constraint, XLA relabels the transposed operand's layout
    # instead and contracts its first axis.
    def loss(a, b):
        return jnp.sum(jnp.square(precision.einsum(spec, a, b, BF16)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    hlo = grad.lower(_normal(0, a_shape), _normal(1, b_shape)).compile().as_text()
    contracted = re.findall(r" dot\(.*?lhs_contracting_dims=\{(\d+)\}", hlo)
    assert len(contracted) == 3, hlo
    assert contracted == [str(len(a_shape) - 1)] * 3, hlo


def _dot_operand_types(hlo: str) -> list[tuple[str, ...]]:
    """The element types of the operands of every dot in a compiled module's text."""
    types = []
    for computation in hlo.split("\n\n"):
        defined = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", computation))
        for lhs, rhs in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", computation):
            types.append((defined[lhs], defined[rhs]))
    return types


def test_on_cpu_a_bfloat16_train_step_computes_every_product_in_bfloat16():
    # XLA folds the transpose of the heads next to the batch into the layout in which the
    # attention products read an unsliced operand (a block's keys and values reach back to the
    # first position), and XLA:CPU had no bfloat16 kernel for that layout: it computed those
    # products in float32, up to half of the attention's products in the research models. The
    # second of this model's two blocks of queries reads every key and value, unsliced.
    from reference_models import random_igpt_params

    import igpt
    from igpt.losses import next_token_loss

    config = igpt.ModelConfig(
        n_embd=32, n_layer=2, n_head=4, n_positions=64, query_block=32, dtype="bfloat16",
        attention="xla",  # XLA's attention products, not igpt's float32 kernel
    )  # fmt: skip
    model = igpt.ImageGPT(config)
    ids = jnp.zeros((2, config.n_positions), jnp.int32)

    def loss(params):
        return next_token_loss(model.apply({"params": params}, ids).logits, ids)

    hlo = jax.jit(jax.grad(loss)).lower(random_igpt_params(config)).compile().as_text()
    types = _dot_operand_types(hlo)
    assert len(types) >= 3 * 2 * 4 * 2, hlo  # 3 products per matrix product, 4 attention ones
    assert set(types) == {("bf16", "bf16")}, types


def _equations(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from _equations(sub)


def test_a_dense_general_kernel_trains_in_bfloat16():
    # A (D, 3, H, K) kernel like c_attn's: XLA:CPU has no bfloat16-to-float32 kernel for its
    # gradient as a multi-axis product ("UNIMPLEMENTED ... DotThunk"), only as a matrix one.
    # No bias: its gradient is the unrounded cotangent's sum, not a product.
    bf16 = dict(dtype=jnp.float32, dot_general=precision.dot_general(BF16))
    layer = nn.DenseGeneral((3, 2, 4), use_bias=False, **bf16)
    x = _normal(0, (10, 8))
    params = layer.init(jax.random.key(1), x)
    g = _normal(2, (10, 3, 2, 4))
    out, vjp = jax.vjp(jax.jit(lambda p, x: layer.apply(p, x)), params, x)
    plain = nn.DenseGeneral((3, 2, 4), use_bias=False, dtype=jnp.float32)
    want_out, (want_params, want_x) = _reference_vjp(plain.apply, (params, x), g)
    got_params, got_x = vjp(g)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("features", [(3, 2, 4), 5, 16])
def test_float32_dense_layers_are_flaxs_with_weight_gradients_that_contract_rows_on_cpu(features):
    # Float32 dense layers take the same path as bfloat16 ones for the weight gradient's layout
    # (XLA's own gradient gives it to Eigen, slower within a train step); their values and
    # gradients stay flax's own. Widths 5 and 16 transpose the other operand of the two.
    f32 = dict(use_bias=True, dtype=jnp.float32)
    layer = nn.DenseGeneral(features, dot_general=precision.dot_general(jnp.float32), **f32)
    plain = nn.DenseGeneral(features, **f32)
    x = _normal(0, (10, 8))
    params = jax.tree.map(lambda p: p + 0.1, plain.init(jax.random.key(1), x))  # bias non-zero

    def loss(layer, p, x):
        return jnp.sum(jnp.sin(layer.apply(p, x)))

    got = jax.jit(jax.value_and_grad(functools.partial(loss, layer), argnums=(0, 1)))
    want = jax.value_and_grad(functools.partial(loss, plain), argnums=(0, 1))(params, x)
    for g, w in zip(jax.tree.leaves(got(params, x)), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    hlo = got.lower(params, x).compile().as_text()
    contracted = re.findall(r" dot\(.*?lhs_contracting_dims=\{(\d+)\}", hlo)
    assert contracted == ["1"] * 3, hlo  # forward, input gradient, weight gradient


def test_float32_einsum_is_the_plain_product():
    a, b = _normal(0, (6, 5)), _normal(1, (5, 7))
    jaxpr = jax.make_jaxpr(lambda a, b: precision.einsum("mk,kn->mn", a, b, jnp.float32))(a, b)
    assert [e.primitive.name for e in jaxpr.eqns] == ["dot_general"]


def test_a_product_that_is_not_a_dense_layers_is_refused():
    dense = precision.dot_general(BF16)
    a, b = _normal(0, (5, 6)), _normal(1, (5, 7))
    with pytest.raises(ValueError, match="not a dense layer's product"):
        dense(a, b, (((0,), (0,)), ((), ())))


def test_rounding_the_kernels_first_gives_the_same_bits():
    # What the bfloat16 sampler relies on: it rounds the kernels once, before its loop.
    from reference_models import random_igpt_params

    import igpt

    config = igpt.ModelConfig(n_embd=32, n_layer=2, n_head=4, n_positions=16, dtype="bfloat16")
    params = random_igpt_params(config)
    rounded = precision.round_kernels(params, BF16)
    dtypes = jax.tree_util.tree_map_with_path(lambda p, x: (p[-1].key, x.dtype), rounded)
    for name, dtype in jax.tree.leaves(dtypes, is_leaf=lambda x: isinstance(x, tuple)):
        assert dtype == (BF16 if name == "kernel" else jnp.float32), name
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 16)), jnp.int32)
    model = igpt.ImageGPT(config)
    np.testing.assert_array_equal(
        model.apply({"params": rounded}, ids).logits, model.apply({"params": params}, ids).logits
    )
