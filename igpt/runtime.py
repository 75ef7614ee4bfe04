"""Process set-up that must happen before JAX (or anything else) allocates.

XLA:CPU allocates the temporaries of every execution as one buffer and frees it afterwards: at
the S shape, 5.6 GB per train step. glibc serves a request that large with a fresh mapping (a
thread's arena cannot hold it), so every step faults and zeroes all of it again, and on a
virtual machine that hands free memory back to its host (free page reporting) each fault can
also wait on the host: 6-16 s of system time per 6 s S step once the buffer sat free for a
few seconds, for instance while transformers ran beside it in the benchmark. glibc reads its
tunables only at process start, so the entry points restart themselves once with malloc set to
keep and reuse such buffers, as PyTorch's caching allocator does on GPUs:

- `hugetlb=1`: transparent huge pages for malloc, 512 times fewer faults on what is new;
- `arena_max=1`: every thread allocates from the main heap, which can hold buffers of any size;
- `mmap_max=0`: large requests come from that heap instead of fresh mappings;
- `trim_threshold`: the heap is never shrunk, so a freed buffer is there for the next step.

The price is that a process keeps its peak heap until it exits.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys

TUNABLES = ":".join(
    [
        "glibc.malloc.hugetlb=1",
        "glibc.malloc.arena_max=1",
        "glibc.malloc.mmap_max=0",
        f"glibc.malloc.trim_threshold={1 << 40}",
    ]
)


def relaunch_with_malloc_tunables() -> None:
    """Re-execute this process with `GLIBC_TUNABLES` set to `TUNABLES`, once.

    Call it first thing in an entry point. It does nothing off glibc Linux or when
    GLIBC_TUNABLES is already set (set it yourself, even to nothing, to opt out).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    if "GLIBC_TUNABLES" in os.environ:
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    # orig_argv keeps the interpreter's own options (-m, -X, -u ...), argv would lose them.
    os.execv(sys.executable, sys.orig_argv)


def compile_ahead_environment(argv: list[str]) -> None:
    """Settings for compiling ahead of time for `--topology=` in `argv` (benchmarks/aot.py),
    before JAX is imported: the host's CPU backend only (the TPU compiler is a library, no TPU
    is attached: libtpu must not look for one or ask a metadata server about it), and for
    `cpu:N` that many simulated CPU devices."""
    topology = next((a.split("=", 1)[1] for a in argv if a.startswith("--topology=")), "")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # else libtpu logs errors
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
    # libtpu's one-process-per-host lockfile guards attached chips; compiling needs none, and
    # without this a second plan run beside the first fails.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    platform, _, count = topology.partition(":")
    if topology and platform != "cpu":
        # No persistent cache: a TPU program compiled without attached chips cannot be read
        # back ("PjRtCompiler must be constructed with a Client"), so every later plan of
        # the same program would warn and compile again anyway.
        os.environ["JAX_COMPILATION_CACHE_DIR"] = ""
    if platform == "cpu" and count.isdigit():
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


# Most of a short run's start-up is XLA compiling the same programs as last time (a resumed
# run, another probe of the same model, the next `make demo`). JAX's persistent cache keeps
# them on disk; this is its size limit, past which the least recently used are evicted.
COMPILATION_CACHE_BYTES = 2 << 30


def _host_cpu() -> str:
    """The host's architecture and a digest of its CPU flags. JAX's cache keys leave the CPU
    out, and XLA refuses (and recompiles) a CPU program built with instructions the host lacks,
    so machines that share a home directory but not a CPU keep separate caches (of programs,
    and of igpt's kernels built for the host CPU)."""
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def cache_dir(kind: str) -> str:
    """`$XDG_CACHE_HOME/igpt/<kind>/<cpu>` (default `~/.cache/...`): where igpt keeps what it
    builds for this host's CPU."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "igpt", kind, _host_cpu())


def use_compilation_cache() -> None:
    """Keep compiled programs in `$XDG_CACHE_HOME/igpt/xla/<cpu>` (default `~/.cache/...`).

    Call it before the first compilation. It does nothing when `JAX_COMPILATION_CACHE_DIR` is
    set, which JAX reads itself: set it to choose the directory, or to nothing to turn the
    cache off.
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir("xla"))
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
