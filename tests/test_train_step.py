"""The sharded train step (igpt/train/step.py) and gradient accumulation."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import ROOT

import igpt
from igpt.sharding import global_batch, make_mesh
from igpt.train.config import pretrain_defaults
from igpt.train.step import (
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
)

TINY = igpt.ModelConfig(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=33)


def _batch(batch_size, config, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, config.palette_size, (batch_size, config.n_positions), np.int32),
        "label": rng.integers(0, 10, (batch_size,), np.int32),
        "mask": np.ones((batch_size,), bool),
    }


def _run_steps(config, mesh_shape, batches, grad_accum_steps=1, devices=None):
    opt = pretrain_defaults().optimizer
    schedule = learning_rate_schedule(opt, 2, 10)
    tx = make_optimizer(opt, schedule)
    mesh = make_mesh(mesh_shape, devices)
    state = create_train_state(config, tx, mesh, seed=0)
    step = make_train_step(config, tx, schedule, mesh, grad_accum_steps=grad_accum_steps)
    losses = []
    for b in batches:
        state, metrics = step(state, global_batch(b, mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


def test_gradient_accumulation_equals_one_big_batch():
    batches = [_batch(8, TINY, seed) for seed in range(3)]
    losses, params = _run_steps(TINY, (1, 1, 1), batches)
    losses_acc, params_acc = _run_steps(TINY, (1, 1, 1), batches, grad_accum_steps=4)
    np.testing.assert_allclose(losses, losses_acc, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, params_acc)


def test_training_lowers_the_loss_on_a_repeated_batch():
    batch = _batch(8, TINY)
    losses, _ = _run_steps(TINY, (1, 1, 1), [batch] * 10)
    assert losses[-1] < losses[0] - 0.1


def test_sharded_step_on_8_devices_matches_one_device(tmp_path):
    # data=2, fsdp=2, tensor=2 over 8 simulated CPU devices, against one device.
    script = textwrap.dedent(
        f"""
        import sys, numpy as np, jax
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_train_step import TINY, _batch, _run_steps
        assert jax.device_count() == 8
        batches = [_batch(8, TINY, seed) for seed in range(2)]
        losses8, params8 = _run_steps(TINY, (2, 2, 2), batches)
        losses1, params1 = _run_steps(TINY, (1, 1, 1), batches, devices=jax.devices()[:1])
        np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        """
    )
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_mesh_shape_errors_are_clear():
    with pytest.raises(ValueError, match="needs 8 devices but 1 are available"):
        make_mesh((2, 2, 2))
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        make_mesh((-1, -1, 1))
