"""The entry points' process set-up (igpt/runtime.py)."""

import os
import subprocess
import sys

import pytest

from igpt import runtime
from igpt.runtime import TUNABLES

SCRIPT = """
import os, sys
from igpt.runtime import relaunch_with_malloc_tunables
print("start", flush=True)
relaunch_with_malloc_tunables()
print(os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
"""


def _without_tunables():
    return {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}


def _run(tmp_path, env):
    path = tmp_path / "entry.py"
    path.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, "-u", str(path), "a", "--b=c"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables exist on Linux only")
def test_entry_points_restart_once_with_the_tunables(tmp_path):
    lines = _run(tmp_path, _without_tunables())
    # Printed twice before the relaunch point (the first process, then its replacement).
    assert lines[:3] == ["start", "start", f"{TUNABLES} ['a', '--b=c']"]


STEPS = """
import resource
from igpt.runtime import relaunch_with_malloc_tunables
relaunch_with_malloc_tunables()
import jax, jax.numpy as jnp
a, b = jnp.ones((4096, 8)), jnp.ones((8, 4096))
step = jax.jit(lambda a, b: jnp.sum(jnp.sin(a @ b)))  # a 64 MiB temporary, a @ b
for call in range(50):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(a, b).block_until_ready()
    if call >= 10:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables exist on Linux only")
def test_an_entry_point_reuses_xlas_step_buffers_without_page_faults(tmp_path):
    """What the tunables are for: an XLA temporary freed after one call is reused by the next
    instead of being mapped and faulted in afresh. Without reuse every call faults the 64 MiB
    in again: 32 huge pages or more (with `glibc.malloc.hugetlb=1` alone; 16,000 4 KiB pages
    with glibc's defaults). With it, a few early calls still fault while the heap settles
    (0-3 of calls 10-20 in six runs), then none do."""
    path = tmp_path / "steps.py"
    path.write_text(STEPS)
    out = subprocess.run(
        [sys.executable, str(path)],
        env=_without_tunables(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    faults = [int(n) for n in out.split()]
    # Under a quarter of what faulting every call afresh costs: 15 runs summed to 1-144, and
    # with the heap trimmed (glibc's default) every other call faults, about 640.
    assert len(faults) == 40 and sum(faults) < 40 * 32 / 4, faults


def test_a_users_own_setting_is_kept(tmp_path):
    lines = _run(tmp_path, dict(os.environ, GLIBC_TUNABLES="glibc.malloc.check=0"))
    assert lines[:2] == ["start", "glibc.malloc.check=0 ['a', '--b=c']"]


CACHED = """
import jax, jax.numpy as jnp
from igpt.runtime import use_compilation_cache
use_compilation_cache()
jax.monitoring.register_event_listener(lambda event, **_: print(event))
print(jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).sum())
"""
HIT = "/jax/compilation_cache/cache_hits"


def _compile_in_a_process(tmp_path, **env):
    path = tmp_path / "compile.py"
    path.write_text(CACHED)
    base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    # Cache even this fast compilation (JAX keeps only those over a second by default).
    base |= {
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    run = subprocess.run(
        [sys.executable, str(path)], env=base | env, check=True, capture_output=True, text=True
    )
    cache = tmp_path / "xdg" / "igpt" / "xla"
    return sorted(p.name for p in cache.glob("*/*")), HIT in run.stdout.split("\n")


def test_entry_points_keep_compiled_programs_in_the_users_cache(tmp_path):
    first, hit = _compile_in_a_process(tmp_path)
    assert any(name.startswith("jit__lambda") and name.endswith("-cache") for name in first)
    assert not hit
    # A second process reads the program back instead of compiling it again.
    assert _compile_in_a_process(tmp_path) == (first, True)


def test_a_users_own_cache_setting_is_kept(tmp_path):
    assert _compile_in_a_process(tmp_path, JAX_COMPILATION_CACHE_DIR="") == ([], False)
    own = tmp_path / "own"
    _compile_in_a_process(tmp_path, JAX_COMPILATION_CACHE_DIR=str(own))
    assert any(p.name.endswith("-cache") for p in own.iterdir())
    assert not (tmp_path / "xdg").exists()


@pytest.mark.parametrize("topology, cached", [("v5e:2x2", False), ("cpu:4", True)])
def test_tpu_plans_keep_no_persistent_cache(monkeypatch, topology, cached):
    # JAX cannot read back a TPU program compiled without chips; CPU ones it can.
    environ = {"JAX_COMPILATION_CACHE_DIR": "/somewhere"}
    monkeypatch.setattr(runtime.os, "environ", environ)
    runtime.compile_ahead_environment([f"--topology={topology}"])
    assert environ["JAX_COMPILATION_CACHE_DIR"] == ("/somewhere" if cached else "")
