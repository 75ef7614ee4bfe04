"""The entry points' process set-up (igpt/runtime.py)."""

import os
import subprocess
import sys

import pytest

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
step(a, b).block_until_ready()
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(a, b).block_until_ready()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables exist on Linux only")
def test_an_entry_point_reuses_xlas_step_buffers_without_page_faults(tmp_path):
    """What the tunables are for: an XLA temporary freed after one call is reused by the next
    instead of being mapped and faulted in afresh (about 34 faults a call with huge pages
    alone, 16,000 with glibc's defaults; the first later calls may still grow the heap)."""
    path = tmp_path / "steps.py"
    path.write_text(STEPS)
    out = subprocess.run(
        [sys.executable, str(path)],
        env=_without_tunables(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    faults = sorted(int(n) for n in out.split())
    assert faults[len(faults) // 2] < 4, faults


def test_a_users_own_setting_is_kept(tmp_path):
    lines = _run(tmp_path, dict(os.environ, GLIBC_TUNABLES="glibc.malloc.check=0"))
    assert lines[:2] == ["start", "glibc.malloc.check=0 ['a', '--b=c']"]
