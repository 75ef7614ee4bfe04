"""igpt's CPU kernels (`cpu_kernels.cc`, XLA FFI custom calls): building and loading them, and
the decode step's matrix-vector product. The attention kernels (the differentiable fused
attention, decode attention) are called through `igpt.attention_kernel`.

The C++ source is compiled on first use with the host's C++ compiler (`$CXX`, else `c++`),
against the headers of the jaxlib that will load it and for the host CPU (`-march=native`),
and cached under `$XDG_CACHE_HOME/igpt/kernels/<cpu>` (else `~/.cache/...`), keyed by the
source, the compiler, the flags and the jaxlib version: a build at install time could know
neither the jaxlib it runs with nor the CPU it runs on. Where no compiler is found or the
build fails, `library` says so once, with the reason, and the model uses XLA's operations.
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

from igpt import runtime

_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
ATTENTION_FORWARD, ATTENTION_BACKWARD = "igpt_attention_forward", "igpt_attention_backward"
DECODE_ATTENTION, MATVEC = "igpt_decode_attention", "igpt_matvec"


def _build(compiler: str) -> Path:
    """The compiled library, built now unless the cache has it. Concurrent builds (several
    processes starting at once) each write their own file and rename it into place."""
    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), compiler, *_FLAGS, jaxlib.__version__]).encode()
    ).hexdigest()[:16]
    path = Path(runtime.cache_dir("kernels")) / f"cpu-kernels-{key}.so"
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
def library() -> ctypes.CDLL | None:
    """The loaded library with its FFI targets registered, or None (with a warning)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        warnings.warn(
            f"igpt: no C++ compiler {compiler!r} found (set $CXX), so igpt's CPU kernels "
            "(attention, decoding) run as XLA's slower operations",
            stacklevel=3,
        )
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    except subprocess.CalledProcessError as e:
        lines = (e.stderr or "").strip().splitlines() or ["(no output)"]
        first_error = next((line for line in lines if "error" in line), lines[-1])
        warnings.warn(
            f"igpt: building igpt's CPU kernels failed ({first_error.strip()}), so attention "
            "and decoding run as XLA's operations",
            stacklevel=3,
        )
        return None
    for target, handler in [
        (ATTENTION_FORWARD, lib.IgptAttentionForward),
        (ATTENTION_BACKWARD, lib.IgptAttentionBackward),
        (DECODE_ATTENTION, lib.IgptDecodeAttention),
        (MATVEC, lib.IgptMatvec),
    ]:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), "cpu")
    return lib


def matvec_takes(rows: int) -> bool:
    """Whether `matvec` takes an x of this many rows (building the library if need be)."""
    lib = library()
    return lib is not None and 1 <= rows <= lib.igpt_matvec_max_rows()


def matvec(x_MxK: jax.Array, w_KxN: jax.Array) -> jax.Array:
    """x w in float32 for an x of few rows (`matvec_takes`), reading w once, in memory order,
    on up to 8 threads (the kernel's own, which spin between calls): a decode step's dense
    products. w is read as it is if bfloat16 (half the bytes to stream), else as float32. Not
    differentiable; CPUs only, outside a device mesh (XLA cannot partition a custom call)."""
    if not matvec_takes(x_MxK.shape[0]):
        raise ValueError(f"igpt's matvec kernel does not take {x_MxK.shape[0]} rows here")
    out = jax.ShapeDtypeStruct((x_MxK.shape[0], w_KxN.shape[1]), jnp.float32)
    call = jax.ffi.ffi_call(MATVEC, out, vmap_method="sequential")
    w_dtype = jnp.bfloat16 if w_KxN.dtype == jnp.bfloat16 else jnp.float32
    return call(x_MxK.astype(jnp.float32), w_KxN.astype(w_dtype))
