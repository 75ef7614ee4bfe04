"""igpt's fused attention for CPUs (`attention_kernel.cc`, an XLA FFI custom call), as a
differentiable JAX function.

The C++ source is compiled on first use with the host's C++ compiler (`$CXX`, else `c++`),
against the headers of the jaxlib that will load it and for the host CPU (`-march=native`),
and cached under `$XDG_CACHE_HOME/igpt/kernels/<cpu>` (else `~/.cache/...`), keyed by the
source, the compiler, the flags and the jaxlib version: a build at install time could know
neither the jaxlib it runs with nor the CPU it runs on. Where no compiler is found or the
build fails, `available` says so once, with the reason, and the model uses its XLA attention.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from igpt import runtime

_SOURCE = Path(__file__).with_name("attention_kernel.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_FORWARD, _BACKWARD = "igpt_attention_forward", "igpt_attention_backward"


def _build(compiler: str) -> Path:
    """The compiled library, built now unless the cache has it. Concurrent builds (several
    processes starting at once) each write their own file and rename it into place."""
    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), compiler, *_FLAGS, jaxlib.__version__]).encode()
    ).hexdigest()[:16]
    path = Path(runtime.cache_dir("kernels")) / f"attention-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded library with its two FFI targets registered, or None (with a warning)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        warnings.warn(
            f"igpt: no C++ compiler {compiler!r} found (set $CXX), so attention on CPUs runs "
            "through XLA, which is slower",
            stacklevel=3,
        )
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    except subprocess.CalledProcessError as e:
        lines = (e.stderr or "").strip().splitlines() or ["(no output)"]
        first_error = next((line for line in lines if "error" in line), lines[-1])
        warnings.warn(
            f"igpt: building the CPU attention kernel failed ({first_error.strip()}), so "
            "attention on CPUs runs through XLA",
            stacklevel=3,
        )
        return None
    jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.IgptAttentionForward), "cpu")
    jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.IgptAttentionBackward), "cpu")
    return lib


def available(head_dim: int) -> bool:
    """Whether the kernel is built (building it if need be) and takes heads this wide: a
    multiple of the CPU's vector width (16 floats with AVX-512, else 8), up to 128."""
    lib = _library()
    if lib is None:
        return False
    width = lib.igpt_attention_vector_width()
    return head_dim % width == 0 and head_dim <= lib.igpt_attention_max_width()


def _forward_call(qkv, scale, causal):
    b, t, _, h, k = qkv.shape
    out = jax.ShapeDtypeStruct((b, t, h, k), jnp.float32)
    lse = jax.ShapeDtypeStruct((b, h, t), jnp.float32)  # each query's log-sum-exp
    call = jax.ffi.ffi_call(_FORWARD, (out, lse), vmap_method="sequential")
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
        _BACKWARD, jax.ShapeDtypeStruct(qkv.shape, jnp.float32), vmap_method="sequential"
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
    if _library() is None:
        raise RuntimeError("igpt's CPU attention kernel is not available; see the warning above")
    return _attention(qkv_BxTx3xHxK.astype(jnp.float32), jnp.asarray(scale, jnp.float32), causal)
