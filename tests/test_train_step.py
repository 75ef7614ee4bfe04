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
    LossWeights,
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


def _run_steps(config, mesh_shape, batches, grad_accum_steps=1, devices=None, **step_args):
    opt = pretrain_defaults().optimizer
    schedule = learning_rate_schedule(opt, 2, 10)
    tx = make_optimizer(opt, schedule)
    mesh = make_mesh(mesh_shape, devices)
    state = create_train_state(config, tx, mesh, seed=0)
    step = make_train_step(
        config, tx, schedule, mesh, grad_accum_steps=grad_accum_steps, **step_args
    )
    losses, grad_norms = [], []
    for b in batches:
        state, metrics = step(state, global_batch(b, mesh))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    return losses, jax.device_get(state.params), grad_norms


def test_gradient_accumulation_equals_one_big_batch():
    batches = [_batch(8, TINY, seed) for seed in range(3)]
    losses, params, _ = _run_steps(TINY, (1, 1, 1), batches)
    losses_acc, params_acc, _ = _run_steps(TINY, (1, 1, 1), batches, grad_accum_steps=4)
    np.testing.assert_allclose(losses, losses_acc, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, params_acc)


def test_accumulation_weighs_every_real_example_alike_when_micro_batches_differ():
    # Fine-tuning's two losses, with padding examples (mask False) that fall unevenly on the
    # micro-batches: micro-batch 0 (examples 0, 2, 4, 6) holds two real examples, 1 holds
    # four. Each micro-batch's loss is over the whole batch's counts, so every real example
    # weighs the same as in one pass.
    config = TINY.replace(num_labels=10)
    batches = [_batch(8, config, seed) for seed in range(3)]
    for b in batches:
        b["mask"] = np.array([1, 1, 1, 1, 0, 1, 0, 1], bool)
    weights = LossWeights(generative=0.5, classification=1.0)
    losses, params, norms = _run_steps(config, (1, 1, 1), batches, weights=weights)
    losses_acc, params_acc, norms_acc = _run_steps(
        config, (1, 1, 1), batches, grad_accum_steps=2, weights=weights
    )
    np.testing.assert_allclose(losses, losses_acc, rtol=1e-5)
    np.testing.assert_allclose(norms, norms_acc, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, params_acc)


def test_training_lowers_the_loss_on_a_repeated_batch():
    batch = _batch(8, TINY)
    losses, _, _ = _run_steps(TINY, (1, 1, 1), [batch] * 10)
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_sharded_step_on_8_devices_matches_one_device(objective):
    # BERT masks are drawn per row from the step key, so sharding the batch cannot change them.
    sharded_steps_match_one_device(f"TINY.replace(objective={objective!r})")


def sharded_steps_match_one_device(config: str, setup: str = "") -> None:
    """Two train steps of the model `config` (an expression over this module's names, after
    `setup`) on data=2, fsdp=2, tensor=2 over 8 simulated CPU devices equal them on one."""
    script = textwrap.dedent(
        f"""
        import sys, numpy as np, jax
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_train_step import TINY, _batch, _run_steps
        assert jax.device_count() == 8
        {setup}
        config = {config}
        batches = [_batch(8, config, seed) for seed in range(2)]
        losses8, params8, _ = _run_steps(config, (2, 2, 2), batches)
        losses1, params1, _ = _run_steps(config, (1, 1, 1), batches, devices=jax.devices()[:1])
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


def test_train_and_eval_losses_equal_transformers_loss_on_unmasked_examples():
    """The objective against an independent reference: transformers' causal LM loss with
    labels = [SOS] + tokens, on the same converted weights, over the unmasked examples only."""
    import torch
    from reference_models import random_hf_model

    from igpt.convert import CAUSAL_LM, config_from_hf, params_from_hf
    from igpt.train.step import make_eval_step, summarize_eval

    # 17 positions: transformers reads SOS + all 16 tokens; igpt reads SOS + the first 15.
    hf = random_hf_model(seed=2, n_embd=32, n_layer=2, n_head=4, n_positions=17)
    config, _ = config_from_hf(hf.config.to_dict() | {"architectures": [CAUSAL_LM]})
    params = params_from_hf(config, {k: v.numpy() for k, v in hf.state_dict().items()}, CAUSAL_LM)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, config.palette_size, (6, 16)).astype(np.int32)
    mask = np.array([True, False, True, True, False, True])
    batch = {"tokens": tokens, "label": np.zeros(6, np.int32), "mask": mask}

    ids = np.concatenate([np.full((6, 1), config.sos_id), tokens], axis=1)[mask]
    with torch.no_grad():
        expected = hf(torch.as_tensor(ids).long(), labels=torch.as_tensor(ids).long()).loss.item()

    mesh = make_mesh((1, 1, 1))
    sums = make_eval_step(config, mesh)(params, global_batch(batch, mesh))
    assert float(sums["nll"] / sums["tokens"]) == pytest.approx(expected, rel=1e-5)
    freq = np.bincount(tokens[mask].ravel(), minlength=config.palette_size) / tokens[mask].size
    unigram = -np.sum(freq[freq > 0] * np.log(freq[freq > 0]))  # of the unmasked tokens alone
    assert summarize_eval(sums)["unigram_baseline"] == pytest.approx(unigram, rel=1e-6)

    opt = pretrain_defaults().optimizer
    schedule = learning_rate_schedule(opt, 2, 10)
    tx = make_optimizer(opt, schedule)
    state = create_train_state(config, tx, mesh, seed=0).replace(params=params)
    _, metrics = make_train_step(config, tx, schedule, mesh)(state, global_batch(batch, mesh))
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["bits_per_token"]) == pytest.approx(expected / np.log(2), rel=1e-5)


def test_the_model_reads_sos_then_all_tokens_but_the_last():
    from igpt.losses import model_inputs

    tokens = np.array([[5, 6, 7, 8], [1, 2, 3, 4]], np.int32)
    np.testing.assert_array_equal(model_inputs(tokens, 99), [[99, 5, 6, 7], [99, 1, 2, 3]])


def test_every_parameter_gets_the_partition_spec_of_the_rules():
    """A wrong but legal rule changes memory, not results, so equal results cannot catch it:
    pin each parameter's spec on a (data=2, fsdp=2, tensor=2) mesh."""
    from jax.sharding import AbstractMesh, AxisType
    from jax.sharding import PartitionSpec as P

    from igpt.sharding import param_shardings

    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    config = igpt.ModelConfig(n_embd=32, n_layer=2, n_head=4, n_positions=16, num_labels=10)
    specs = jax.tree.map(lambda s: s.spec, param_shardings(config, mesh))
    expected = {
        "wte": {"embedding": P(None, "fsdp")},  # vocab 513 replicated, embed over fsdp
        "wpe": {"embedding": P(None, "fsdp")},
        "ln_f": {"scale": P("fsdp")},
        "lm_head": {"kernel": P("fsdp", None)},
        "score": {"kernel": P("fsdp", None)},
        "h": {
            "ln_1": {"scale": P(None, "fsdp")},
            "ln_2": {"scale": P(None, "fsdp")},
            "attn": {
                "c_attn": {"kernel": P(None, "fsdp", None, "tensor", None)},
                "c_proj": {"kernel": P(None, "tensor", None, "fsdp")},
            },
            "mlp": {
                "c_fc": {"kernel": P(None, "fsdp", "tensor")},
                "c_proj": {"kernel": P(None, "tensor", "fsdp")},
            },
        },
    }
    assert jax.tree.map(lambda s: tuple(s), specs) == jax.tree.map(lambda s: tuple(s), expected)
