"""Pretraining end to end on the embedded digits: learning, exact resume, kills, errors,
several processes."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, config_from, flags
from PIL import Image

import igpt
from igpt.data import eval_dataset, open_source
from igpt.tokenizer import ColorTokenizer
from igpt.train.checkpoints import latest_step
from igpt.train.pretrain import pretrain

# A small, fast variant of the README main job.
SMALL = {
    "model.n_embd": "32",
    "model.n_layer": "2",
    "model.n_head": "2",
    "model.n_inner": "128",
    "batch_size": "16",
    "num_steps": "30",
    "log_every": "10",
    "eval_every": "0",
    "checkpoint_every": "10",
    "data.palette_pixels": "20000",
}


def _config(**overrides):
    return config_from("digits.py", SMALL | overrides)


def _cli(workdir, **overrides):
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config=configs/digits.py",
            f"--workdir={workdir}", *flags(SMALL | overrides)]  # fmt: skip


def _params(workdir):
    return jax.tree.leaves(igpt.load_model(workdir).params)


def _assert_identical(a, b):
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_digits_pretraining_beats_the_unigram_baseline(tmp_path):
    config = _config(**{"num_steps": "150", "eval_every": "150", "batch_size": "32"})
    metrics = pretrain(config, tmp_path)

    # Unigram baseline computed here independently: the entropy of the validation tokens'
    # colour frequencies.
    palette = np.load(tmp_path / "palette.npy")
    batches = eval_dataset(
        open_source(config.data.val), ColorTokenizer(palette), global_batch_size=32,
        image_size=8,
    )  # fmt: skip
    tokens = np.concatenate([b["tokens"][b["mask"]].ravel() for b in batches])
    freq = np.bincount(tokens, minlength=len(palette)) / tokens.size
    unigram = -np.sum(freq[freq > 0] * np.log(freq[freq > 0]))
    assert metrics["unigram_baseline"] == pytest.approx(unigram, rel=1e-5)
    assert metrics["uniform_baseline"] == pytest.approx(np.log(16))
    assert metrics["loss"] < unigram - 0.1 < np.log(len(palette))
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "tensorboard").is_dir()
    pictures = sorted((tmp_path / "samples").iterdir())
    assert [p.name for p in pictures] == ["completions_0000150.png", "samples_0000150.png"]
    with Image.open(pictures[0]) as completions:  # 4 images x (occluded, 4 samples, original)
        assert completions.width > completions.height > 0


def test_sigkill_then_restart_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    subprocess.run(_cli(tmp_path / "straight"), check=True, cwd=ROOT, capture_output=True)

    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_cli(workdir), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # kill right after the first checkpoint is complete
        if line.startswith("step 10/"):
            while latest_step(workdir) is None:
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert latest_step(workdir) in (10, 20)
    resumed = subprocess.run(_cli(workdir), check=True, cwd=ROOT, capture_output=True, text=True)
    assert "resumed from step" in resumed.stdout
    _assert_identical(tmp_path / "straight", workdir)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    proc = subprocess.Popen(
        _cli(tmp_path, num_steps="100000", checkpoint_every="100000", log_every="5"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    for line in proc.stdout:
        if line.startswith("step 5/"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75 and "SIGTERM: saved step" in out  # preempted, not done
    assert latest_step(tmp_path) >= 5


def test_kill_during_checkpoint_writes_leaves_a_restorable_checkpoint(tmp_path):
    # Saving every step, a SIGKILL at any moment lands mostly inside a write.
    cmd = _cli(tmp_path, num_steps="100000", checkpoint_every="1", log_every="1")
    for delay in (0.0, 0.13, 0.29):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            # A restart resumes past step 3 when that step's checkpoint was complete.
            logged = re.match(r"step (\d+)/", line)
            if logged and int(logged[1]) >= 3:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model = igpt.load_model(tmp_path)
        config, params = model.config, model.params
        assert config.n_embd == 32 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    # A learning rate of 1e30 overflows the parameters after the first update.
    result = subprocess.run(
        _cli(tmp_path, **{"optimizer.learning_rate": "1e30", "optimizer.warmup_epochs": "0",
                          "optimizer.grad_clip": "0", "checkpoint_every": "1"}),
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is not finite" in result.stderr
    assert "is finite and a restart resumes from it" in result.stderr
    igpt.load_model(tmp_path)  # the last good checkpoint restores


def test_init_from_a_mismatched_checkpoint_is_a_clear_error(tmp_path):
    other = igpt.ModelConfig(n_embd=64, n_layer=2, n_head=2, n_positions=64, vocab_size=17)
    igpt.save_model(tmp_path / "other", other, igpt.init_params(other, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"does not match config.model \(n_embd: checkpoint 64"):
        pretrain(_config(init_from=str(tmp_path / "other")), tmp_path / "run")


def test_init_from_a_workdir_starts_from_its_parameters(tmp_path):
    pretrain(_config(num_steps="10"), tmp_path / "a")
    config = _config(num_steps="0", init_from=str(tmp_path / "a"))
    pretrain(config, tmp_path / "b")
    _assert_identical(tmp_path / "a", tmp_path / "b")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_end_with_the_same_params_as_one(tmp_path):
    overrides = {"num_steps": "6", "checkpoint_every": "3"}
    # Without dropout: its masks are drawn per device layout, so only dropout-free runs can
    # match across process counts.
    overrides |= {f"model.{p}_pdrop": "0.0" for p in ("attn", "resid", "embd")}
    subprocess.run(_cli(tmp_path / "one", **overrides), check=True, cwd=ROOT, capture_output=True)
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cli(tmp_path / "two", **overrides),
            cwd=ROOT,
            env=os.environ
            | {
                "IGPT_COORDINATOR": f"127.0.0.1:{port}",
                "IGPT_NUM_PROCESSES": "2",
                "IGPT_PROCESS_ID": str(i),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-2000:] + outputs[1][-2000:]
    for x, y in zip(_params(tmp_path / "one"), _params(tmp_path / "two"), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
