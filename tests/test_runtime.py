"""The entry points' process set-up (igpt/runtime.py)."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import os, sys
from igpt.runtime import relaunch_with_huge_pages
print("start", flush=True)
relaunch_with_huge_pages()
print(os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
"""


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
def test_entry_points_restart_once_with_huge_pages(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    lines = _run(tmp_path, env)
    # Printed twice before the relaunch point (the first process, then its replacement).
    assert lines[:3] == ["start", "start", "glibc.malloc.hugetlb=1 ['a', '--b=c']"]


def test_a_users_own_setting_is_kept(tmp_path):
    lines = _run(tmp_path, dict(os.environ, GLIBC_TUNABLES="glibc.malloc.check=0"))
    assert lines[:2] == ["start", "glibc.malloc.check=0 ['a', '--b=c']"]
