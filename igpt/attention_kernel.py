"""igpt's fused attention for CPUs (`cpu_kernels.cc`, XLA FFI custom calls), as a
differentiable JAX function. `igpt.cpu_kernels` builds and loads the kernels: where it cannot,
`available` is false and the model uses its XLA attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from igpt import cpu_kernels


def available(head_dim: int) -> bool:
    """Whether the kernel is built (building it if need be) and takes heads this wide: a
    multiple of the CPU's vector width (16 floats with AVX-512, else 8), up to 128."""
    lib = cpu_kernels.library()
    if lib is None:
        return False
    width = lib.igpt_attention_vector_width()
    return head_dim % width == 0 and head_dim <= lib.igpt_attention_max_width()


def _forward_call(qkv, scale, causal):
    b, t, _, h, k = qkv.shape
    out = jax.ShapeDtypeStruct((b, t, h, k), jnp.float32)
    lse = jax.ShapeDtypeStruct((b, h, t), jnp.float32)  # each query's log-sum-exp
    call = jax.ffi.ffi_call(cpu_kernels.ATTENTION_FORWARD, (out, lse), vmap_method="sequential")
    return call(qkv, scale, causal=np.int32(causal))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _attention(qkv, scale, causal):
    return _forward_call(qkv, scale, causal)[0]


def _attention_fwd(qkv, scale, causal):
    out, lse = _forward_call(qkv, scale, causal)
    return out, (qkv, scale, out, lse)


def _attention_bwd(causal, residuals, d_out):
    qkv, scale, out, lse = residuals
    d_qkv = jax.ffi.ffi_call(
        cpu_kernels.ATTENTION_BACKWARD,
        jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
        vmap_method="sequential",
    )(qkv, scale, out, lse, d_out, causal=np.int32(causal))
    # The scale's gradient is the sum over scores of their gradient times the scores
    # unscaled, which equals sum(dq * q) / scale (dq is the scaled scores' gradient times k).
    d_scale = jnp.sum(d_qkv[:, :, 0] * qkv[:, :, 0]) / scale
    return d_qkv, d_scale


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(qkv_BxTx3xHxK: jax.Array, scale: jax.Array | float, *, causal: bool) -> jax.Array:
    """softmax(scale * q k^T, masked causally if `causal`) v for every batch row and head, in
    float32, from the query-key-value projection's output (B, T, 3, H, K); returns (B, T, H, K).
    Call `available(K)` first. XLA cannot partition a custom call: under a device mesh, call
    it inside `jax.shard_map`."""
    if cpu_kernels.library() is None:
        raise RuntimeError("igpt's CPU attention kernel is not available; see the warning above")
    return _attention(qkv_BxTx3xHxK.astype(jnp.float32), jnp.asarray(scale, jnp.float32), causal)


def decode(
    qkv_Bx1x3xHxK: jax.Array,
    keys_BxHxKxS: jax.Array,
    values_BxHxSxK: jax.Array,
    start: jax.Array,
    scale: jax.Array | float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Causal attention of one new token per sequence, in float32, over the first `start`
    positions of a decoding cache (keys (B, H, K, S), values (B, H, S, K), the model's
    layouts) and itself, from the projection's output (B, 1, 3, H, K). Returns the attention
    (B, 1, H, K) and the caches with the new token's key and value written at `start` (where
    `jax.lax.dynamic_update_slice` would write them), in place where the old caches are not
    used again. Reads only the filled positions. Not differentiable; call `available(K)`
    first."""
    if cpu_kernels.library() is None:
        raise RuntimeError("igpt's CPU attention kernel is not available; see the warning above")
    b, _, _, h, k = qkv_Bx1x3xHxK.shape
    f32 = jnp.float32
    call = jax.ffi.ffi_call(
        cpu_kernels.DECODE_ATTENTION,
        (
            jax.ShapeDtypeStruct((b, 1, h, k), f32),
            jax.ShapeDtypeStruct(keys_BxHxKxS.shape, f32),
            jax.ShapeDtypeStruct(values_BxHxSxK.shape, f32),
        ),
        vmap_method="sequential",
        input_output_aliases={1: 1, 2: 2},
    )
    return call(
        qkv_Bx1x3xHxK.astype(f32),
        keys_BxHxKxS.astype(f32),
        values_BxHxSxK.astype(f32),
        jnp.asarray(start, jnp.int32),
        jnp.asarray(scale, f32),
    )
