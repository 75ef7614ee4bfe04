"""Process set-up that must happen before JAX (or anything else) allocates.

glibc serves the large buffers XLA allocates and frees every train step as fresh mappings of
4 KiB pages, so every step faults them in again: on 2 CPU cores half of a small model's
training time was kernel time (7-8% with the setting below). glibc reads its tunables only at
process start, so the entry points restart themselves once with transparent huge pages
enabled for malloc (`glibc.malloc.hugetlb=1`), which cuts the faults about 500-fold.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = "glibc.malloc.hugetlb=1"


def relaunch_with_huge_pages() -> None:
    """Re-execute this process with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, once.

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
    if platform == "cpu" and count.isdigit():
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
