"""Matrix products for a low-precision compute dtype: inputs rounded to it, results in float32,
in the forward pass and in both gradient products.

XLA:CPU's bfloat16 products are fast only when they return float32: on a 2-core AMD EPYC with
AVX-512 BF16, a (2048, 512) x (512, 128) product ran at 353 GFLOP/s from bfloat16 to float32,
199 in float32 and 164 from bfloat16 to bfloat16 (the attention scores: 164, 74 and 53).
JAX's transpose rules give each gradient product the dtype of its primal input, so a layer
that returns float32 from bfloat16 inputs gets float32 gradient products (its cotangent is
float32), and one that returns bfloat16 gets the slow bfloat16 ones. Here the gradients are
written out instead: the cotangent is rounded to the compute dtype, as PyTorch's autocast
does, and each gradient product returns float32.

On CPUs a dense layer's weight gradient also gets its operands in the layout XLA's fast
kernels take (`_weight_gradient`).

In float32 these are the plain products, so float32 programs are unchanged.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

# The spec `_dense_product` gives `einsum`: (tokens, inputs) x (inputs, outputs).
_DENSE = "mk,kn->mn"


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`jnp.einsum(spec, a, b)` with `a` and `b` rounded to `dtype`, returning float32. `spec`
    is a two-operand product "X,Y->Z" in which every index of X and Y is in the other
    operand or in Z (a batched matrix product)."""
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    # float32 in and out of the custom gradient, so that its cotangents are float32 (a
    # bfloat16 input's upcast and the rounding inside cancel).
    return _rounded_einsum(spec, jnp.dtype(dtype), a.astype(jnp.float32), b.astype(jnp.float32))


def dot_general(dtype: jnp.dtype):
    """A `jax.lax.dot_general` for flax's `nn.Dense` and `nn.DenseGeneral` (`dot_general=`)
    that rounds its inputs to `dtype` and returns float32; give the layer `dtype=jnp.float32`,
    so that flax does not round them first."""
    if jnp.dtype(dtype) == jnp.float32:
        return jax.lax.dot_general
    return functools.partial(_dense_product, dtype=jnp.dtype(dtype))


def round_kernels(params: dict, dtype: jnp.dtype) -> dict:
    """`params` with every dense kernel rounded to `dtype`, as each product rounds it anyway
    (the results are the same bits), for loops that read the weights every step: a bfloat16
    sampler then streams half the bytes of float32 weights, and rounds them once, not per
    token. Embeddings, norm gains and biases are not products' inputs and stay as they are."""
    if jnp.dtype(dtype) == jnp.float32:
        return params

    def rounded(path, x):
        return x.astype(dtype) if getattr(path[-1], "key", None) == "kernel" else x

    return jax.tree_util.tree_map_with_path(rounded, params)


def _dense_product(lhs, rhs, dimension_numbers, precision=None, *, dtype):
    """A dense layer's product (the trailing axes of `lhs` against the leading axes of `rhs`,
    as flax lays them out) as one matrix product. XLA:CPU has no bfloat16-to-float32 kernel
    for some multi-axis forms, such as the gradient of a (D, 3, H, K) kernel from (N, D)
    inputs; as matrices every product has one."""
    del precision  # the default: one rounding to `dtype`, float32 accumulation
    (lhs_contract, rhs_contract), batch = dimension_numbers
    n = len(lhs_contract)
    if (
        tuple(lhs_contract) != tuple(range(lhs.ndim - n, lhs.ndim))
        or tuple(rhs_contract) != tuple(range(n))
        or any(batch)
    ):
        raise ValueError(f"not a dense layer's product: {dimension_numbers}")
    free, out = lhs.shape[: lhs.ndim - n], rhs.shape[n:]
    y = einsum(_DENSE, lhs.reshape(math.prod(free), -1), rhs.reshape(-1, math.prod(out)), dtype)
    return y.reshape(free + out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rounded_einsum(spec, dtype, a, b):
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _rounded_einsum_fwd(spec, dtype, a, b):
    a, b = a.astype(dtype), b.astype(dtype)  # kept rounded: half the memory of float32
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32), (a, b)


def _rounded_einsum_bwd(spec, dtype, residuals, g):
    a, b = residuals
    x, rest = spec.split(",")
    y, z = rest.split("->")
    g = g.astype(dtype)
    da = jnp.einsum(f"{z},{y}->{x}", g, b, preferred_element_type=jnp.float32)
    if spec == _DENSE:
        return da, _weight_gradient(a, g)
    db = jnp.einsum(f"{x},{z}->{y}", a, g, preferred_element_type=jnp.float32)
    return da, db


def _weight_gradient(a_MxK: jax.Array, g_MxN: jax.Array) -> jax.Array:
    """A dense layer's weight gradient, a^T g, which contracts the tokens (M).

    XLA:CPU's fast (YNNPACK) products take the left operand with the contracted axis last and
    the right one with it first; here both have it first, and XLA runs a slower kernel: 84-126
    GFLOP/s in bfloat16 on an AVX-512 BF16 CPU, against 250-390 once one operand is
    transposed in memory. The narrower one is transposed, the cheaper copy. The layout
    constraints make the transposes real ones: otherwise XLA relabels the operand's (or the
    result's) layout instead and is back where it started. Other platforms keep the plain
    product.
    """

    def transposed_first():
        row_major = Layout((0, 1))
        if a_MxK.shape[1] <= g_MxN.shape[1]:
            a_KxM = with_layout_constraint(a_MxK.T, row_major)
            return jnp.dot(a_KxM, g_MxN, preferred_element_type=jnp.float32)
        g_NxM = with_layout_constraint(g_MxN.T, row_major)
        out_NxK = with_layout_constraint(
            jnp.dot(g_NxM, a_MxK, preferred_element_type=jnp.float32), row_major
        )
        return out_NxK.T

    def plain():
        return jnp.einsum("mk,mn->kn", a_MxK, g_MxN, preferred_element_type=jnp.float32)

    return jax.lax.platform_dependent(cpu=transposed_first, default=plain)


_rounded_einsum.defvjp(_rounded_einsum_fwd, _rounded_einsum_bwd)
