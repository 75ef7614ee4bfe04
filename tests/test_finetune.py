"""Fine-tuning end to end on the embedded digits: learning, the best model, exact resume,
early stopping, the transformers export, clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GREYS, config_from, flags, run_script

import igpt
from igpt.data import open_source
from igpt.loading import read_model_config
from igpt.train.checkpoints import latest_step
from igpt.train.finetune import finetune
from igpt.train.loop import load_init_params, setup

TINY = igpt.ModelConfig(n_embd=32, n_layer=2, n_head=2, n_inner=128, n_positions=64, vocab_size=17)
SMALL = {
    "data.val": "digits:train[1100:]",
    "data.test": "digits:test[:200]",
    "batch_size": "32",
    "num_steps": "80",
    "eval_every": "20",
    "checkpoint_every": "20",
    "log_every": "20",
    "optimizer.learning_rate": "5e-3",
    "optimizer.warmup_epochs": "0.1",
    "finetune.patience": "0",
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny digits-sized model (random init, no classifier) with a 16-grey palette."""
    params = igpt.init_params(TINY, jax.random.key(0))
    return igpt.save_model(tmp_path_factory.mktemp("pretrained") / "m", TINY, params, GREYS)


def _overrides(pretrained, **changes):
    return SMALL | {"init_from": str(pretrained)} | changes


def _config(pretrained, **changes):
    return config_from("finetune.py", _overrides(pretrained, **changes))


def _val_examples(count=None):
    source = open_source("digits:train[1100:]")
    count = len(source) if count is None else count
    images = np.stack([source[i]["image"] for i in range(count)])
    labels = np.asarray([source[i]["label"] for i in range(count)])
    return images, labels


def _igpt_class_logits(model_dir, images):
    """Class logits of an igpt model dir computed directly (no data pipeline, no trainer): the
    classifier reads the image's ids as they are, no SOS (transformers' convention)."""
    model = igpt.load_model(model_dir)
    ids = igpt.ColorTokenizer(model.palette, size=8).encode(images)
    out = igpt.ImageGPT(model.config).apply({"params": model.params}, jnp.asarray(ids))
    return np.asarray(out.class_logits)


@pytest.fixture(scope="module")
def straight_run(pretrained, tmp_path_factory):
    """80 steps through the command line, evaluating every 20."""
    workdir = tmp_path_factory.mktemp("straight")
    result = run_script("finetune", "--config=configs/finetune.py", f"--workdir={workdir}",
                        *flags(_overrides(pretrained)))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stdout


def test_finetuning_beats_chance_and_keeps_the_best_model(straight_run):
    workdir, stdout = straight_run
    results = json.loads((workdir / "results.json").read_text())
    history = json.loads((workdir / "validation.json").read_text())
    assert [h["step"] for h in history] == [20, 40, 60, 80]
    assert results["val_accuracy"] == max(h["accuracy"] for h in history) > 0.3  # chance: 0.1
    assert results["test_accuracy"] > 0.3
    assert f"test accuracy {100 * results['test_accuracy']:.2f}" in stdout

    # The saved best model has exactly the best validation accuracy, computed independently.
    images, labels = _val_examples()
    logits = _igpt_class_logits(workdir / "best", images)
    assert np.mean(np.argmax(logits, -1) == labels) == pytest.approx(results["val_accuracy"])
    assert (workdir / "finetune_accuracy.png").exists()


def test_resume_after_a_crash_equals_one_run(pretrained, straight_run, tmp_path):
    finetune(_config(pretrained, num_steps="60", **{"data.test": ""}), tmp_path)
    # As if killed after the validation pass at step 60 but before its checkpoint: the
    # history has a step-60 record the checkpoints do not cover.
    shutil.rmtree(tmp_path / "checkpoints" / "60")
    results = finetune(_config(pretrained), tmp_path)

    workdir, _ = straight_run
    assert json.loads((tmp_path / "validation.json").read_text()) == json.loads(
        (workdir / "validation.json").read_text()
    )
    assert results == json.loads((workdir / "results.json").read_text()) | {
        "best_model": str(tmp_path / "best")
    }
    last = (igpt.load_model(tmp_path).params, igpt.load_model(workdir).params)
    best = (igpt.load_model(tmp_path / "best").params, igpt.load_model(workdir / "best").params)
    for ours, theirs in (last, best):
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_array_equal(a, b)


def test_early_stopping_stops_and_stays_stopped(pretrained, tmp_path, capsys):
    # A zero learning rate never improves on the first validation accuracy.
    config = _config(
        pretrained,
        eval_every="10",
        checkpoint_every="10",
        **{"optimizer.learning_rate": "0.0", "finetune.patience": "2", "data.test": ""},
    )
    results = finetune(config, tmp_path)
    history = json.loads((tmp_path / "validation.json").read_text())
    assert [h["step"] for h in history] == [10, 20, 30]
    assert results["stopped_early"] and results["best_step"] == 10
    assert latest_step(tmp_path) == 30

    finetune(config, tmp_path)
    assert "early stopping already reached" in capsys.readouterr().out
    assert latest_step(tmp_path) == 30


def test_the_sweep_chooses_the_rate_on_validation_then_refits_on_train_and_val(
    pretrained, tmp_path
):
    """The paper's fine-tuning search: one run per rate in its own directory, the rate and step
    with the best validation accuracy kept, then a refit on train + val for that many steps
    whose test accuracy (checked here by an independent forward pass) is the one reported."""
    changes = {"finetune.learning_rates": "(0.0,5e-3)", "finetune.refit_on": "digits:train",
               "num_steps": "40", "data.test": "digits:test[:100]"}  # fmt: skip
    summary = finetune(_config(pretrained, **changes), tmp_path)
    assert sorted(summary["runs"]) == ["0", "0.005"]
    assert (tmp_path / "lr_0" / "results.json").exists()
    assert summary["learning_rate"] == 0.005  # a zero rate never improves on chance
    assert summary["best_step"] == summary["runs"]["0.005"]["best_step"]
    assert json.loads((tmp_path / "sweep.json").read_text()) == summary

    refit = tmp_path / "refit"
    assert json.loads((refit / "config.json").read_text())["data"]["train"] == "digits:train"
    assert latest_step(refit) == summary["best_step"]
    assert summary["tested_model"] == str(refit / "best")
    source = open_source("digits:test[:100]")
    images = np.stack([source[i]["image"] for i in range(len(source))])
    labels = np.asarray([source[i]["label"] for i in range(len(source))])
    predicted = np.argmax(_igpt_class_logits(refit / "best", images), -1)
    assert summary["test_accuracy"] == pytest.approx(np.mean(predicted == labels))


def test_transformers_export_predicts_the_same_classes(straight_run, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import ImageGPTForImageClassification, ImageGPTImageProcessor

    workdir, _ = straight_run
    best = igpt.load_model(workdir / "best")
    params = best.params
    igpt.save_hf(best.config, params, tmp_path / "hf", best.palette)
    model = ImageGPTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    processor = ImageGPTImageProcessor.from_pretrained(tmp_path / "hf")

    # End to end as a transformers user would: real digits -> their processor -> their model.
    images, _ = _val_examples(64)
    ours = _igpt_class_logits(workdir / "best", images)
    ids = processor(list(images), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = model(ids).logits.numpy()
    np.testing.assert_array_equal(np.argmax(theirs, -1), np.argmax(ours, -1))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    assert len(set(np.argmax(ours, -1))) > 2  # a trained head, not a constant prediction

    # The export is itself a valid init_from for a run config, which stores the MLP width
    # explicitly where transformers' config says n_inner=None.
    config = _config(tmp_path / "hf")
    with setup(config, tmp_path / "run", base_model=read_model_config(tmp_path / "hf")) as run:
        loaded = load_init_params(run)
    np.testing.assert_array_equal(loaded["score"]["kernel"], params["score"]["kernel"])


def test_bad_fine_tuning_setups_are_clear_errors(pretrained, tmp_path):
    with pytest.raises(ValueError, match="set --config.init_from"):
        finetune(_config(pretrained, init_from=""), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        finetune(_config(pretrained, init_from=str(tmp_path / "missing")), tmp_path / "b")
    with pytest.raises(ValueError, match="set --config.model.num_labels"):
        finetune(_config(pretrained, **{"model.num_labels": "0"}), tmp_path / "c")
