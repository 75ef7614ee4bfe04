"""Probe features, the logistic-regression solvers (against scikit-learn) and the layer sweep."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flags, run_script
from PIL import Image

import igpt
from igpt.data import open_source
from igpt.features import FeatureExtractor
from igpt.figures import COLOURS
from igpt.probe import (
    ProbeSettings,
    c_to_l2,
    evaluate_features,
    fit_probe,
    l2_to_c,
    objective,
    pixel_features,
    standardizer,
    subsample_per_class,
)

# The shared fixture's architecture (conftest.digits_model_dir).
TINY = igpt.ModelConfig(n_embd=32, n_layer=3, n_head=2, n_positions=64, vocab_size=17)


@pytest.fixture(scope="module")
def digits_pixels(tmp_path_factory):
    """The digits splits' 8x8 pixels, read into memory."""
    directory = tmp_path_factory.mktemp("pixels")
    splits = {}
    for name, spec in [("train", "digits:train[:1100]"), ("val", "digits:train[1100:]"),
                       ("test", "digits:test")]:  # fmt: skip
        features, labels = pixel_features(spec, 8, directory)
        assert features.shape == (len(labels), 64)  # grey: one channel of three
        splits[name] = features[:], labels
    return splits


def _hand_features(config, params, palette, spec):
    """mean over positions of ln_1(h_l) (ln_f output for the last layer), in numpy from the
    model's hidden_states, with tokens from the tokenizer directly (no data pipeline)."""
    source = open_source(spec)
    images = np.stack([source[i]["image"] for i in range(len(source))])
    tokens = igpt.ColorTokenizer(palette, size=8).encode(images)
    ids = np.concatenate([np.full((len(tokens), 1), config.sos_id), tokens[:, :-1]], axis=1)
    hidden = igpt.ImageGPT(config).apply({"params": params}, jnp.asarray(ids)).hidden_states
    gains = np.asarray(params["h"]["ln_1"]["scale"])
    features = {}
    for layer, h in enumerate(hidden):
        h = np.asarray(h, np.float64)
        if layer < config.n_layer:
            h = h / np.sqrt(np.mean(h**2, axis=-1, keepdims=True) + 1e-5) * gains[layer]
        features[layer] = h.mean(axis=1)
    return features, np.asarray([source[i]["label"] for i in range(len(source))])


def test_features_equal_a_hand_computation_and_come_back_from_the_store(digits_model_dir, tmp_path):
    spec = "digits:test[:50]"  # 50 examples in batches of 32: the 14 padding rows are dropped
    extractor = FeatureExtractor(digits_model_dir, batch_size=32, features_dir=tmp_path)
    features, labels = extractor.features(spec)
    model = igpt.load_model(digits_model_dir)
    config, params, palette = model.config, dict(model.params), model.palette
    expected, expected_labels = _hand_features(config, params, palette, spec)
    assert sorted(features) == [0, 1, 2, 3]
    np.testing.assert_array_equal(labels, expected_labels)
    for layer, x in features.items():
        assert x.shape == (50, TINY.n_embd)
        np.testing.assert_allclose(x[:], expected[layer], rtol=1e-4, atol=1e-5)

    # A new extractor on the same checkpoint reads the store instead of running the model...
    again = FeatureExtractor(digits_model_dir, batch_size=32, features_dir=tmp_path)
    again._extract = None  # calling it would fail
    stored, stored_labels = again.features(spec, [1, 3])
    np.testing.assert_array_equal(stored[3][:], features[3][:])
    np.testing.assert_array_equal(stored_labels, labels)
    # ...while other splits, and other checkpoints, get their own stores.
    directory = again.store(spec).directory
    assert again.store("digits:test[50:]").directory != directory
    params["wte"]["embedding"] = params["wte"]["embedding"] + 1.0
    other = igpt.save_model(tmp_path / "other", config, params, palette)
    assert FeatureExtractor(other, features_dir=tmp_path).store(spec).directory != directory


def test_bad_layers_and_checkpoints_are_one_line_errors(digits_model_dir, tmp_path):
    extractor = FeatureExtractor(digits_model_dir, features_dir=tmp_path)
    with pytest.raises(ValueError, match=r"layer 4 is out of range .* valid layers are 0\.\.3"):
        extractor.features("digits:test[:8]", [1, 4])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureExtractor(tmp_path / "no_such_model", features_dir=tmp_path)
    model = igpt.load_model(digits_model_dir)
    bare = igpt.save_model(tmp_path / "bare", model.config, model.params)  # no palette.npy
    with pytest.raises(ValueError, match="has no colour palette"):
        FeatureExtractor(bare, features_dir=tmp_path)


@pytest.mark.parametrize("c", [0.1, 3.0])
def test_lbfgs_probe_matches_scikit_learn(digits_pixels, c):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    (x, y), (test_x, test_y) = digits_pixels["train"], digits_pixels["test"]
    l2 = c_to_l2(c, len(y))
    assert l2_to_c(l2, len(y)) == pytest.approx(c)
    probe, _ = fit_probe((x, y), digits_pixels["val"], ProbeSettings(l2_grid=(l2,)))

    mean, scale = standardizer(x)
    reference = LogisticRegression(C=c, max_iter=10_000, tol=1e-10)
    with threadpool_limits(1):  # BLAS threads fighting JAX's for 2 cores take 100x longer
        reference.fit((x - mean) / scale, y)
    ours = probe.accuracy(test_x, test_y)
    theirs = reference.score((test_x - mean) / scale, test_y)
    assert abs(ours - theirs) <= 0.005
    # The same optimum: the weights agree (sklearn's are (K, D)).
    np.testing.assert_allclose(
        probe.weights, reference.coef_.T, atol=5e-3 * np.abs(reference.coef_).max()
    )


def test_sgd_solver_reaches_the_lbfgs_optimum(digits_pixels):
    (x, y), val = digits_pixels["train"], digits_pixels["val"]
    l2 = 1e-2
    exact, _ = fit_probe((x, y), val, ProbeSettings(l2_grid=(l2,), solver="lbfgs"))
    # "auto" picks SGD when the features exceed full_batch_max.
    sgd_settings = ProbeSettings(l2_grid=(l2,), full_batch_max=1000, sgd_batch_size=100)
    sgd, _ = fit_probe((x, y), val, sgd_settings)

    def loss(probe):
        params = {"w": jnp.asarray(probe.weights), "b": jnp.asarray(probe.bias)}
        return float(objective(params, (x - probe.mean) / probe.scale, y, l2))

    assert loss(exact) <= loss(sgd) <= loss(exact) * 1.03
    assert abs(sgd.accuracy(*digits_pixels["test"]) - exact.accuracy(*digits_pixels["test"])) < 0.02


def test_the_sgd_probe_sweeps_its_learning_rate_on_validation(digits_pixels):
    """The paper's large-scale probe: each peak rate of the sweep is fitted and the one with
    the best validation accuracy kept, whatever its place in the list."""
    for rates in ((1e-6, 0.3), (0.3, 1e-6)):  # 1e-6 barely leaves the zero initialisation
        settings = ProbeSettings(
            l2_grid=(1e-2,), solver="sgd", sgd_learning_rates=rates, sgd_epochs=5,
            sgd_batch_size=100,
        )  # fmt: skip
        probe, accuracies = fit_probe(digits_pixels["train"], digits_pixels["val"], settings)
        assert probe.learning_rate == 0.3 and accuracies[1e-2] > 0.8
        assert probe.accuracy(*digits_pixels["val"]) == accuracies[1e-2]


def test_the_grid_keeps_the_l2_with_the_best_validation_accuracy(digits_pixels):
    grid = (1e1, 1e-3)  # 10 is far too strong for this data
    probe, accuracies = fit_probe(
        digits_pixels["train"], digits_pixels["val"], ProbeSettings(l2_grid=grid)
    )
    assert set(accuracies) == set(grid)
    assert probe.l2 == 1e-3 and accuracies[1e-3] > accuracies[1e1]
    assert probe.accuracy(*digits_pixels["val"]) == accuracies[1e-3]


def test_labels_per_class_subsample():
    labels = np.repeat(np.arange(10), 30)
    chosen = subsample_per_class(labels, 4, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [4] * 10
    np.testing.assert_array_equal(chosen, subsample_per_class(labels, 4, seed=0))
    assert not np.array_equal(chosen, subsample_per_class(labels, 4, seed=1))
    with pytest.raises(ValueError, match="class 0 has only 30"):
        subsample_per_class(labels, 31)


def test_probe_cli_sweeps_layers_and_writes_json_and_plot(digits_model_dir, tmp_path):
    out = tmp_path / "probe"
    overrides = {"init_from": digits_model_dir, "data.train": "digits:train[:400]",
                 "data.val": "digits:train[1100:1300]", "data.test": "digits:test[:200]",
                 "batch_size": 100, "probe.l2_grid": "(1e-2,1e-3)", "concat_layers": "(1,2)",
                 "baseline_sizes": "(4,)"}  # fmt: skip
    result = run_script("probe", "--config=configs/probe.py", f"--workdir={out}",
                        *flags(overrides))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "probe.json").read_text())
    rows = report["layers"]
    assert [row["layer"] for row in rows] == [0, 1, 2, 3] and report["headline"] == "test_acc_refit"
    for row in rows:
        assert row["l2"] in (1e-2, 1e-3) and row["C"] == pytest.approx(1 / (row["l2"] * 400))
        keys = ("train_acc", "val_acc", "test_acc", "test_acc_refit")
        assert all(0 <= row[k] <= 1 for k in keys)
    best = max(rows, key=lambda row: row["val_acc"])
    assert report["best_layer"] == best["layer"] and report["num_train"] == 400
    assert report["concat"]["layers"] == [1, 2]
    assert sorted(report["raw_pixels"]) == ["4", "8"]
    assert report["raw_pixels"]["8"]["test_acc_refit"] > 0.8  # pixels already separate digits
    assert f"best layer {best['layer']}" in result.stdout
    assert f"test accuracy {100 * best['test_acc_refit']:.2f}" in result.stdout

    with Image.open(out / "probe_accuracy.png") as image:
        assert image.size == (800, 500)
        colours = {c for _, c in image.convert("RGB").getcolors(1 << 20)}
    assert set(COLOURS[:2]) <= colours  # the validation and test lines were drawn
    # A store per split, of the model's features and of the pixels at each size.
    assert len(list((out / "features").glob("*/store.json"))) == 3
    assert len(list((out / "features/pixels").glob("*/store.json"))) == 6


def test_two_processes_write_the_stores_one_process_would(digits_model_dir, tmp_path):
    """Each process extracts and writes its own examples (the strided shard of evaluation)
    into the shared stores; the rows land in the split's order and the probes agree."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = {"init_from": digits_model_dir, "data.train": "digits:train[:301]",
                 "data.val": "digits:train[1100:1201]", "data.test": "digits:test[:101]",
                 "batch_size": 32, "probe.l2_grid": "(1e-2,)", "layers": "(2,)"}  # fmt: skip
    command = [sys.executable, str(ROOT / "scripts/probe.py"), "--config=configs/probe.py",
               f"--workdir={tmp_path / 'two'}", *flags(overrides)]  # fmt: skip
    env = {"IGPT_COORDINATOR": f"127.0.0.1:{port}", "IGPT_NUM_PROCESSES": "2"}
    procs = [
        subprocess.Popen(command, cwd=ROOT, env=os.environ | env | {"IGPT_PROCESS_ID": str(i)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-2000:] + outputs[1][-2000:]

    one = FeatureExtractor(digits_model_dir, batch_size=32, features_dir=tmp_path / "one")
    two = tmp_path / "two/features"
    for spec in ("digits:train[:301]", "digits:test[:101]"):  # odd sizes: uneven shards
        features, labels = one.features(spec, [2])
        name = one.store(spec).directory.name
        np.testing.assert_array_equal(np.load(two / name / "labels.npy"), labels)
        np.testing.assert_allclose(np.load(two / name / "layer_2.npy"), features[2][:], atol=1e-5)
        pixels = np.load(two / "pixels" / name.rsplit("_", 1)[0] / "pixels.npy")
        np.testing.assert_array_equal(pixels[:, ::3], pixel_features(spec, 8, tmp_path)[0][:])
    report = json.loads((tmp_path / "two/probe.json").read_text())
    assert report["num_train"] == 301 and report["layers"][0]["layer"] == 2


def test_refit_folds_validation_back_into_training(digits_pixels):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    train, val, test = digits_pixels["train"], digits_pixels["val"], digits_pixels["test"]
    settings = ProbeSettings(l2_grid=(1e-2, 1e-3))
    result = evaluate_features(train, val, test, settings)
    # The refit probe, independently: scikit-learn on train + val standardised by train + val.
    x = np.concatenate([train[0], val[0]])
    y = np.concatenate([train[1], val[1]])
    mean, scale = standardizer(x)
    reference = LogisticRegression(C=l2_to_c(result["l2"], len(y)), max_iter=10_000, tol=1e-10)
    with threadpool_limits(1):
        reference.fit((x - mean) / scale, y)
    assert (
        abs(result["test_acc_refit"] - reference.score((test[0] - mean) / scale, test[1])) <= 0.005
    )
    only_train, _ = fit_probe(train, val, ProbeSettings(l2_grid=(result["l2"],)))
    assert result["test_acc"] == only_train.accuracy(*test)


def test_the_standardiser_is_fitted_on_the_training_split_alone(digits_pixels):
    (x, y), (val_x, val_y) = digits_pixels["train"], digits_pixels["val"]
    probe, _ = fit_probe((x, y), (val_x + 5.0, val_y), ProbeSettings(l2_grid=(1e-2,)))
    np.testing.assert_allclose(probe.mean, x.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(probe.scale, np.where(x.std(0) > 1e-8, x.std(0), 1), rtol=1e-4)


def test_low_data_probes_average_five_subsets_with_matching_validation_sizes(
    digits_pixels, monkeypatch
):
    import igpt.probe as probe_module

    seen = []
    real = probe_module.fit_probe

    def recording(train, val, *args):
        seen.append((np.bincount(train[1], minlength=10), np.bincount(val[1], minlength=10)))
        return real(train, val, *args)

    monkeypatch.setattr(probe_module, "fit_probe", recording)
    train, val, test = digits_pixels["train"], digits_pixels["val"], digits_pixels["test"]
    result = evaluate_features(train, val, test, ProbeSettings(l2_grid=(1e-1, 1e-3)), 4, 5)
    assert len(seen) == 5
    for train_counts, val_counts in seen:
        assert train_counts.tolist() == [4] * 10 and val_counts.tolist() == [4] * 10
    accuracies = result["test_acc_by_subset"]
    assert len(accuracies) == 5 and len(set(accuracies)) > 1  # different subsets
    assert result["test_acc"] == pytest.approx(np.mean(accuracies))
    assert result["test_acc_std"] == pytest.approx(np.std(accuracies))


def test_probe_cli_errors_are_one_line(tmp_path):
    result = run_script(
        "probe",
        "--config=configs/probe.py",
        f"--workdir={tmp_path}",
        f"--config.init_from={tmp_path / 'missing'}",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr


def _probe_json(directory, accuracies):
    directory.mkdir(parents=True)
    rows = [{"layer": i, "test_acc_refit": a} for i, a in enumerate(accuracies)]
    result = {"layers": rows, "headline": "test_acc_refit",
              "raw_pixels": {"8": {"test_acc_refit": 0.9}}}  # fmt: skip
    (directory / "probe.json").write_text(json.dumps(result))
    return directory


def test_compare_probes_draws_several_runs_on_one_chart(tmp_path):
    ar = _probe_json(tmp_path / "ar", [0.5, 0.8, 0.7])
    bert = _probe_json(tmp_path / "bert", [0.4, 0.6, 0.65])
    out = tmp_path / "cmp.png"
    # A run dir, or its probe.json kept on its own (docs/fashion_bert_probe.json).
    result = run_script(
        "compare_probes", f"--probe=AR={ar}", f"--probe=BERT={bert / 'probe.json'}", f"--out={out}"
    )
    assert result.returncode == 0, result.stderr
    with Image.open(out) as chart:
        pixels = np.asarray(chart.convert("RGB"))
    for colour in COLOURS[:2]:  # one line per run
        assert np.all(np.abs(pixels.astype(int) - colour) < 8, axis=-1).sum() > 100

    short = _probe_json(tmp_path / "short", [0.5, 0.6])
    result = run_script("compare_probes", f"--probe=AR={ar}", f"--probe=S={short}", f"--out={out}")
    assert result.returncode != 0 and "different numbers of layers" in result.stderr
    result = run_script("compare_probes", f"--probe={ar}", f"--out={out}")
    assert "write NAME=DIR" in result.stderr and "Traceback" not in result.stderr
