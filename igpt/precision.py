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

On CPUs the gradient products that contract the rows of both operands (a dense layer's weight
gradient, attention's key and value gradients) get their operands in the layout XLA's fast
kernels take (`_contract_rows`). Dense layers take this path in float32 too (no rounding
then); attention's float32 products stay the plain ones. A float32 or bfloat16 dense product
of a few rows (a decode step's) goes to igpt's matrix-vector kernel there
(`_forward_product`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from igpt import cpu_kernels

# The spec `_dense_product` gives `einsum`: (tokens, inputs) x (inputs, outputs).
_DENSE = "mk,kn->mn"
# The smallest weight (in elements: 1 MiB in float32) whose few-row products go to the matvec
# kernel.
_MATVEC_MIN_WEIGHTS = 1 << 18


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
    so that flax does not round them first.

    float32 layers take it too, for the weight gradient's layout on CPUs (`_contract_rows`):
    alternated in one process on a 2-core Intel Xeon, the float32 train step ran 1.05x as
    fast at tiny, 0.98-1.12x at S (three runs) and 0.98-1.01x at the Fashion-MNIST configs'
    shape. There XLA's own gradient hands the weight gradient to Eigen, whose product runs
    beside the next layer's products on the same two cores; and a (D, 3, H, K) kernel's
    gradient (c_attn's) came with a transpose of its (tokens, 3, H, K) cotangent.
    """
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
    as flax lays them out) as one matrix product, with `_rounded_einsum`'s gradient. XLA:CPU
    has no bfloat16-to-float32 kernel for some multi-axis forms, such as the gradient of a
    (D, 3, H, K) kernel from (N, D) inputs; as matrices every product has one."""
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
    lhs, rhs = lhs.reshape(math.prod(free), -1), rhs.reshape(-1, math.prod(out))
    y = _rounded_einsum(_DENSE, dtype, lhs.astype(jnp.float32), rhs.astype(jnp.float32))
    return y.reshape(free + out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rounded_einsum(spec, dtype, a, b):
    return _forward_product(spec, a.astype(dtype), b.astype(dtype))


def _rounded_einsum_fwd(spec, dtype, a, b):
    a, b = a.astype(dtype), b.astype(dtype)  # kept rounded: half the memory of float32
    return _forward_product(spec, a, b), (a, b)


def _forward_product(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`einsum(spec, a, b)` in float32. On CPUs, outside a device mesh, a float32 or bfloat16
    dense product of a few rows (a decode step's) whose weight would not stay in the caches
    goes to igpt's matrix-vector kernel (`cpu_kernels.matvec`).

    Decoding reads every weight once per token. In the S sampler on a 2-core Intel Xeon,
    XLA:CPU's products of one row read the weights at 16-22 GB/s (the (2048, 512) ones
    slowest) and the kernel at 20-24; of four rows, 11 and 20 (alone, in a chain of the S
    model's products). With weights that stay in the caches (the tiny model's, 64-256 KiB) the
    kernel's threads cost more than they save: the tiny sampler ran 10-15% slower with it.
    """
    if (
        spec == _DENSE
        and a.dtype == b.dtype
        and a.dtype in (jnp.float32, jnp.bfloat16)
        and b.size >= _MATVEC_MIN_WEIGHTS
        and jax.default_backend() == "cpu"
        and jax.sharding.get_abstract_mesh().empty
        and cpu_kernels.matvec_takes(a.shape[0])
    ):
        return cpu_kernels.matvec(a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _rounded_einsum_bwd(spec, dtype, residuals, g):
    a, b = residuals
    x, rest = spec.split(",")
    y, z = rest.split("->")
    g = g.astype(dtype)
    return _product(f"{z},{y}->{x}", g, b), _product(f"{x},{z}->{y}", a, g)


def _product(spec: str, p: jax.Array, q: jax.Array) -> jax.Array:
    """`einsum(spec, p, q)` returning float32, by `_contract_rows` where `spec` contracts the
    rows of both operands: a dense layer's weight gradient ("mk,mn->kn") and the gradients of
    attention's keys and values ("bhtk,bhts->bhsk", "bhts,bhtk->bhsk")."""
    (x, z), y = spec.split("->")[0].split(","), spec.split("->")[1]
    batch = x[:-2]
    if len(x) == len(z) == len(y) and z[:-2] == batch == y[:-2] and x[-2] == z[-2]:
        if y[-2:] == x[-1] + z[-1]:
            return _contract_rows(p, q)
        if y[-2:] == z[-1] + x[-1]:
            return _contract_rows(q, p)
    return jnp.einsum(spec, p, q, preferred_element_type=jnp.float32)


def _contract_rows(x_BxMxK: jax.Array, y_BxMxN: jax.Array) -> jax.Array:
    """x^T y over any leading batch axes: (..., M, K), (..., M, N) -> (..., K, N) in float32.

    XLA:CPU's fast (YNNPACK) products take the left operand with the contracted axis last and
    the right one with it first; here both have it first. For a dense layer's weight gradient
    XLA then runs a slower kernel: 84-126 GFLOP/s in bfloat16 on an AVX-512 BF16 CPU, against
    250-390 once one operand is transposed in memory (on an Intel Xeon with AMX, 123-178
    against 400-850). A batched product of this form it computes in float32 instead, through
    Eigen: at S, a third of the attention gradient's time. The narrower operand is
    transposed, the cheaper copy. The layout constraints make the transposes real ones:
    otherwise XLA relabels the operand's (or the result's) layout instead and is back where it
    started. Other platforms keep the plain product.
    """

    def transposed_first():
        if x_BxMxK.shape[-1] <= y_BxMxN.shape[-1]:
            return jnp.matmul(_transposed(x_BxMxK), y_BxMxN, preferred_element_type=jnp.float32)
        out_BxNxK = jnp.matmul(_transposed(y_BxMxN), x_BxMxK, preferred_element_type=jnp.float32)
        return jnp.swapaxes(_row_major(out_BxNxK), -1, -2)

    def plain():
        return jnp.einsum(
            "...mk,...mn->...kn", x_BxMxK, y_BxMxN, preferred_element_type=jnp.float32
        )

    return jax.lax.platform_dependent(cpu=transposed_first, default=plain)


def _transposed(x: jax.Array) -> jax.Array:
    """`x` with its last two axes swapped in memory (on CPUs, where it is called)."""
    return _row_major(jnp.swapaxes(x, -1, -2))


def _row_major(x: jax.Array) -> jax.Array:
    """`x` laid out in memory as its shape reads, for XLA:CPU; call it only where the program
    runs on CPUs (under `jax.lax.platform_dependent`)."""
    return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


def in_memory(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`x`, a transposed array that products in `dtype` will read, transposed in memory on
    CPUs when `dtype` is not float32.

    XLA folds a transpose into the layout in which the products that read it take their
    operand, and XLA:CPU has no bfloat16 kernel for some such layouts: it computes those
    products in float32. At S, the attention of the last block of queries (whose keys and
    values are not sliced, which would copy them) ran in float32 so, 40% of the attention's
    products; with the transpose in memory, the attention's forward and backward pass took
    35-40% less time. float32 products have no such fallback and are left as they are.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return x
    return jax.lax.platform_dependent(x, cpu=_row_major, default=lambda x: x)


_rounded_einsum.defvjp(_rounded_einsum_fwd, _rounded_einsum_bwd)
