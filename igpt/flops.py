"""FLOP counts and device peaks, for model FLOP utilisation (MFU) in logs and benchmarks."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from igpt.config import ModelConfig

# Dense bf16 matmul peak per chip (FLOP/s) of accelerators by `device_kind` prefix, from the
# vendors' data sheets; MFU on them is reported against this (as nanoGPT and maxtext do).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def forward_flops(config: ModelConfig, length: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward pass over input positions 0..length-1,
    one sequence, counting only what attention needs (for the "bert" objective every position
    reads all T, so the T(T+1)/2 below is T*T):

        per position p, per layer:  qkv 2*d*3d + out-proj 2*d*d + MLP 2*(2*d*f)
                                    + scores 2*d*(p+1) + values 2*d*(p+1)
        per position, head:         2*d*V
        total = T*(L*(8d^2 + 4df) + 2dV) + 4dL * T(T+1)/2

    (d = n_embd, f = mlp_dim, L = n_layer, V = palette_size, T = length). Embedding lookups,
    norms and softmax are not matmuls and are left out. A train step is 3x this (the backward
    pass costs two forwards). Sampling T tokens from SOS runs the model over T positions.
    No implementation computes exactly this: they compute masked scores beyond it
    (transformers the full T x T square, igpt blocks of 256 queries; igpt's sampler scores the
    whole static cache); this count is the work that counts, the same for all.
    """
    d, f, n_layer = config.n_embd, config.mlp_dim, config.n_layer
    t = length
    dense = t * (n_layer * (8 * d * d + 4 * d * f) + 2 * d * config.palette_size)
    visible = t * (t + 1) // 2 if config.causal else t * t  # (query, key) pairs scored
    return dense + 4 * d * n_layer * visible


def train_step_flops(config: ModelConfig, batch_size: int) -> int:
    """FLOPs of one train step over `batch_size` full-length sequences (3 forward passes)."""
    return 3 * batch_size * forward_flops(config, config.n_positions)


@functools.cache
def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype: jnp.dtype = jnp.float32) -> float:
    """Best FLOP/s of a jitted (n, n) @ (n, n) product on the default device, from `dtype`
    inputs to a float32 result (the products igpt.precision computes in)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best


def peak_flops(device: jax.Device, dtype: jnp.dtype = jnp.float32) -> float:
    """Matmul peak of one device: the data-sheet bf16 figure for known accelerators, else
    (CPUs) the rate of products in the compute `dtype` measured once in this process on all
    its cores (on CPUs with AVX-512 BF16, bfloat16 products run about twice as fast)."""
    for prefix, peak in PEAK_FLOPS.items():
        if device.device_kind.startswith(prefix):
            return peak
    return measure_matmul_peak(dtype=jnp.dtype(dtype)) / max(1, len(jax.local_devices()))
