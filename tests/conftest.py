"""Fixtures and helpers shared by the test modules."""

from __future__ import annotations

import ast
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# One XLA compilation cache for the session and the scripts it runs, set before jax is
# imported: the tests compile the same small programs again and again (every script run, every
# new jitted closure), and reading them back takes a third off the subprocess-heavy tests.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="igpt-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import numpy as np
import pytest

import igpt
from igpt.cli import load_config

ROOT = Path(__file__).resolve().parents[1]
# 16 grey levels: the palette of 8x8 digits models.
GREYS = np.repeat(np.linspace(-1, 1, 16, dtype=np.float32)[:, None], 3, axis=1)


def _value(text):
    """A test's override as the command line would parse it: a literal, else a string."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def config_from(file: str, overrides: dict) -> object:
    """`configs/FILE` with dotted `overrides` ({"model.n_embd": "32", ...}) applied."""
    config = load_config(str(ROOT / "configs" / file))
    with config.unlocked():
        config.update_from_flattened_dict({k: _value(v) for k, v in overrides.items()})
    return config


def flags(overrides: dict) -> list[str]:
    """`--config.KEY=VALUE` flags of `overrides`."""
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def run_script(script: str, *args, env: dict | None = None, timeout: float = 900, **kwargs):
    """Run `scripts/SCRIPT.py ARGS` from the repository root; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{script}.py"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else os.environ | env,
        **kwargs,
    )


@pytest.fixture(scope="session")
def digits_model_dir(tmp_path_factory):
    """A random 3-layer 8x8 model with the 16-grey palette, whose ln_1 gains differ by layer
    and channel (so a feature that used the wrong gain, or none, would differ)."""
    config = igpt.ModelConfig(n_embd=32, n_layer=3, n_head=2, n_positions=64, vocab_size=17)
    params = igpt.init_params(config, jax.random.key(0))
    gains = jax.random.uniform(jax.random.key(1), params["h"]["ln_1"]["scale"].shape, minval=0.5)
    params["h"]["ln_1"]["scale"] = gains * 2
    params["ln_f"]["scale"] = jax.random.uniform(jax.random.key(2), (config.n_embd,), minval=0.5)
    return igpt.save_model(tmp_path_factory.mktemp("model") / "m", config, params, GREYS)
