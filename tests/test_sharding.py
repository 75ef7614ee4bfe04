"""Sharding checks that catch real layout mistakes: on 8 simulated CPU devices, parameters and
Adam moments really live 1/N per device under fsdp, the tensor axis splits heads and MLP
width, and the compiled programs' per-device memory falls as the mesh grows (which it does not
if activations are gathered instead of weights); on a TPU topology the same through the real
TPU compiler, when libtpu is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout=600, env=None):
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=os.environ | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_fsdp_and_tensor_axes_hold_the_shards_the_rules_name():
    # Real arrays (create_train_state), read back shard by shard: nothing here asks the rules
    # what they meant, the expected shard shapes are written out from the model's structure.
    script = textwrap.dedent(
        """
        import jax, numpy as np, optax, igpt
        from igpt.sharding import make_mesh
        from igpt.train.step import create_train_state

        config = igpt.ModelConfig(n_embd=64, n_layer=2, n_head=4, n_positions=16,
                                  vocab_size=33)
        tx = optax.adam(1e-3)

        def shards(x):
            shapes = {s.data.shape for s in x.addressable_shards}
            assert len(shapes) == 1, shapes
            return shapes.pop()

        # fsdp=8: every matrix (embeddings, attention, MLP, in params and both Adam moments)
        # is split 8 ways along its embed axis; no device holds a whole one.
        state = create_train_state(config, tx, make_mesh((1, 8, 1)), seed=0)
        adam = state.opt_state[0]
        for tree in (state.params, adam.mu, adam.nu):
            flat = jax.tree_util.tree_flatten_with_path(tree)[0]
            matrices = [(p, x) for p, x in flat if x.ndim >= 2]
            assert len(matrices) >= 6, [jax.tree_util.keystr(p) for p, _ in flat]
            for path, x in matrices:
                assert np.prod(shards(x)) * 8 == x.size, (jax.tree_util.keystr(path), x.shape)

        # tensor=4 (data=2): heads and MLP width split 4 ways, the embed axis whole.
        state = create_train_state(config, tx, make_mesh((2, 1, 4)), seed=0)
        h = state.params["h"]
        expect = {
            "attn/c_attn/kernel": (2, 64, 3, 1, 16),   # (layers, embed, qkv, heads, kv)
            "attn/c_proj/kernel": (2, 1, 16, 64),      # (layers, heads, kv, embed)
            "mlp/c_fc/kernel": (2, 64, 64),            # (layers, embed, mlp)
            "mlp/c_proj/kernel": (2, 64, 64),          # (layers, mlp, embed)
        }
        for name, shape in expect.items():
            module, layer, leaf = name.split("/")
            assert shards(h[module][layer][leaf]) == shape, (name, shards(h[module][layer][leaf]))
            assert shards(state.opt_state[0].mu["h"][module][layer][leaf]) == shape, name
        print("ok")
        """
    )
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    assert _run(["-c", script], env=env).strip().endswith("ok")


def _plan(tmp_path, topology, mesh, programs="train,eval,features", overrides=()):
    out = tmp_path / f"{topology.replace(':', '_')}_{mesh.replace(',', '_')}.json"
    _run(
        [
            "-m", "benchmarks.aot", "--config=configs/digits.py", f"--topology={topology}",
            f"--config.mesh_shape=({mesh})", f"--programs={programs}", f"--json={out}",
            *overrides,
        ]
    )  # fmt: skip
    return json.loads(out.read_text())


def _assert_memory_falls(one, many, n):
    train1, trainn = one["programs"]["train"]["memory"], many["programs"]["train"]["memory"]
    # Parameters and Adam state are the step's arguments: split n ways (scalars aside).
    assert trainn["arguments"] < 1.5 * train1["arguments"] / n, (train1, trainn)
    # Activations scale with the per-device batch. Gathering the whole batch's activations
    # instead of the weights (a sharding-propagation failure igpt.model.keep_batch_sharded
    # prevents) leaves temporaries near the one-device figure.
    for name in one["programs"]:
        t1 = one["programs"][name]["memory"]["temporaries"]
        tn = many["programs"][name]["memory"]["temporaries"]
        assert tn < 2.5 * t1 / n, (name, t1, tn)


def test_plan_memory_per_device_falls_as_fsdp_grows(tmp_path):
    one = _plan(tmp_path, "cpu:1", "1,1,1")
    many = _plan(tmp_path, "cpu:8", "1,8,1", programs="train,eval,features,sample")
    assert many["chips"] == 8 and many["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    _assert_memory_falls(one, many, 8)
    wte = next(r for r in many["layout"] if r["name"] == "wte/embedding")
    assert wte["shape"] == [17, 64] and wte["shard"] == [17, 8], wte
    # digits: 4 layers of 64 wide, 64 tokens, batch 64: 12 * 4 * 64^2 * 64 * 64 * 3 + ...
    assert many["programs"]["train"]["flops"] > 3 * 2 * 64 * 64 * 12 * 4 * 64**2
    assert many["programs"]["sample"]["tokens"] == 36 * 64


HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed")
def test_a_tpu_topology_without_libtpu_is_a_one_line_error():
    args = [sys.executable, "-m", "benchmarks.aot", "--config=configs/digits.py"]
    result = subprocess.run(
        [*args, "--topology=v5e:2x2"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr  # a usage error
    assert "the TPU compiler is not installed (pip install 'igpt[tpu]')" in result.stderr


@pytest.mark.skipif(
    not HAS_LIBTPU,
    reason="the TPU compiler is not installed (pip install 'igpt[tpu]')",
)
def test_tpu_plan_memory_per_chip_falls_as_fsdp_grows(tmp_path):
    # One host's 2x2 chips is the smallest v5e slice libtpu describes. The digits model is
    # widened and lengthened: at 64 wide and 64 tokens the TPU's fixed costs (tiles padded to
    # 128 lanes) hide how activations scale. The layer scan is rolled, as on a TPU run: the
    # digits model's 4 layers are unrolled by default, and unrolled the TPU scheduler overlaps
    # layers differently at each size (eval temporaries went 0 -> 4 MiB from 4 to 16 chips).
    wider = ("--config.model.n_embd=256", "--config.data.image_size=16",
             "--config.model.n_positions=256", "--config.model.scan_unroll=1")  # fmt: skip
    few = _plan(tmp_path, "v5e:2x2", "1,4,1", "train,eval", wider)
    many = _plan(tmp_path, "v5e:4x4", "1,16,1", "train,eval", wider)
    assert many["chips"] == 16 and many["device_kind"].startswith("TPU v5")
    assert many["hbm_per_chip"] == 16 * 2**30 and many["programs"]["train"]["fits"]
    _assert_memory_falls(few, many, 4)
    # A plan that cannot fit is an answer with the compiler's figure, not a crash.
    huge = ("--config.model.n_embd=1024", "--config.batch_size=65536")
    plan = _plan(tmp_path, "v5e:2x2", "1,4,1", "train", huge)
    train = plan["programs"]["train"]
    assert train["fits"] is False and train["memory"] is None
    assert "exceeds available HBM" in train["compiler"], train
