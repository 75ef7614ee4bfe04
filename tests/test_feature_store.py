"""Feature stores: rows written by index and read back in bounded blocks, resumed passes, SGD
probes fitted from disk, and a probe whose features exceed its memory bound staying under it."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from igpt.feature_store import FeatureStore, StoredFeatures, concatenate
from igpt.probe import ProbeSettings, evaluate_features, fit_probe, objective, pixel_features


def _producer(truth: dict[str, np.ndarray], labels, batch: int, order=None, fail_after=None):
    """`batches(start)` over examples in `order` (a permutation: rows arrive out of order),
    raising after `fail_after` batches as a killed process would stop; records the starts."""
    n = len(labels)
    order = np.arange(n) if order is None else order
    starts = []

    def batches(start):
        starts.append(start)
        for k in range(start, -(-n // batch)):
            if fail_after is not None and k == fail_after:
                raise KeyboardInterrupt("killed")
            index = order[k * batch : (k + 1) * batch]
            yield index, labels[index], {name: rows[index] for name, rows in truth.items()}

    return batches, starts


def test_stored_rows_read_back_as_the_array_they_hold(tmp_path):
    rng = np.random.default_rng(0)
    n = 103
    truth = {"a": rng.normal(size=(n, 6)).astype(np.float32), "b": rng.normal(size=(n, 3))}
    labels = rng.integers(0, 5, n).astype(np.int32)
    store = FeatureStore(tmp_path / "s")
    batches, _ = _producer(truth, labels, batch=10, order=rng.permutation(n))
    store.fill({"a": 6, "b": 3}, n, 11, batches)
    assert store.names() == {"a", "b"}
    np.testing.assert_array_equal(store.labels(), labels)
    # Plain .npy files, in the split's order whatever order the rows were written in.
    np.testing.assert_array_equal(np.load(tmp_path / "s/a.npy", mmap_mode="r"), truth["a"])

    a = store.features("a", max_bytes=8 * 6 * 4 * 4)  # blocks of 4 rows
    b = store.features("b", max_bytes=1 << 20)
    assert a.shape == (n, 6) and a.nbytes == n * 6 * 4
    np.testing.assert_array_equal(a[:], truth["a"])
    np.testing.assert_array_equal(a[7:50], truth["a"][7:50])
    index = np.array([5, 6, 7, 0, 99, 100, 3])  # runs and jumps, out of order
    np.testing.assert_array_equal(a[index], truth["a"][index])
    assert [len(block) for block in a.blocks()] == [4] * 25 + [3]
    np.testing.assert_array_equal(np.concatenate(list(a.blocks())), truth["a"])

    side = concatenate([a, b], axis=1)  # nothing is read until asked
    assert isinstance(side, StoredFeatures) and side.shape == (n, 9)
    both = np.concatenate([truth["a"], truth["b"].astype(np.float32)], axis=1)
    np.testing.assert_array_equal(side[index], both[index])
    below = concatenate([side, side], axis=0)
    np.testing.assert_array_equal(below[np.array([102, 103, 104])], both[[102, 0, 1]])
    every_other = store.features("a", 1 << 20, columns=slice(0, None, 2))
    np.testing.assert_array_equal(every_other[:], truth["a"][:, ::2])
    with pytest.raises(IndexError, match=r"in \[0, 103\)"):
        a[np.array([103])]
    with pytest.raises(KeyError, match="no complete feature set 'c'"):
        store.features("c", 1 << 20)


def test_a_killed_pass_resumes_from_its_last_durable_batch(tmp_path):
    rng = np.random.default_rng(1)
    n, batch = 50, 8
    truth = {"x": rng.normal(size=(n, 4)).astype(np.float32)}
    labels = np.arange(n, dtype=np.int32) % 3
    store = FeatureStore(tmp_path / "s")
    batches, starts = _producer(truth, labels, batch, fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        store.fill({"x": 4}, n, 7, batches, sync_seconds=0)
    assert store.names() == set()  # an unfinished pass is not a feature set
    assert json.loads((tmp_path / "s/progress-0.json").read_text()) == {"batches": 3}

    batches, starts = _producer(truth, labels, batch)
    store.fill({"x": 4}, n, 7, batches, sync_seconds=0)
    assert starts == [3]  # batches 0-2 were not computed again
    np.testing.assert_array_equal(store.features("x", 1 << 20)[:], truth["x"])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "labels.npy", "store.json", "x.npy"
    ]  # fmt: skip

    # A different pass (another feature set) after a killed one starts from its beginning,
    # and leaves the complete sets as they were.
    truth["y"] = rng.normal(size=(n, 2)).astype(np.float32)
    batches, starts = _producer({"y": truth["y"]}, labels, batch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        store.fill({"y": 2}, n, 7, batches, sync_seconds=0)
    batches, starts = _producer({"z": truth["x"]}, labels, batch, fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        store.fill({"z": 4}, n, 7, batches, sync_seconds=0)
    batches, starts = _producer({"y": truth["y"]}, labels, batch)
    store.fill({"y": 2}, n, 7, batches, sync_seconds=0)
    assert starts == [0] and store.names() == {"x", "y"}
    assert not (tmp_path / "s/z.npy").exists()  # the abandoned pass's file is gone
    np.testing.assert_array_equal(store.features("y", 1 << 20)[:], truth["y"])
    np.testing.assert_array_equal(store.features("x", 1 << 20)[:], truth["x"])


@pytest.fixture(scope="module")
def stored_digits(tmp_path_factory):
    """The digits splits' 8x8 pixels (256 bytes per example, 450 KiB in all) as stored
    features bound to 512 KiB: blocks of 256 rows, SGD chunks of 1,000 rows at batches of
    100, the probe's streaming path."""
    directory = tmp_path_factory.mktemp("pixels")
    specs = {"train": "digits:train[:1100]", "val": "digits:train[1100:]", "test": "digits:test"}
    return {
        name: pixel_features(spec, 8, directory, max_bytes=512 << 10)
        for name, spec in specs.items()
    }


def test_sgd_from_disk_reaches_the_optimum_of_the_features_in_memory(stored_digits):
    (x, y), val = stored_digits["train"], stored_digits["val"]
    l2 = 1e-2
    in_memory = (x[:], y)
    exact, _ = fit_probe(in_memory, (val[0][:], val[1]), ProbeSettings(l2_grid=(l2,)))
    # Stored features too large for their bound can only be streamed: "auto" picks SGD.
    settings = ProbeSettings(l2_grid=(l2,), sgd_batch_size=100, sgd_learning_rates=(0.3,))
    streamed, _ = fit_probe((x, y), val, settings)
    assert streamed.learning_rate == 0.3  # the SGD solver ran

    def loss(probe):
        params = {"w": probe.weights, "b": probe.bias}
        return float(objective(params, (x[:] - probe.mean) / probe.scale, y, l2))

    assert loss(exact) <= loss(streamed) <= loss(exact) * 1.03
    test = stored_digits["test"]
    assert abs(streamed.accuracy(*test) - exact.accuracy(test[0][:], test[1])) < 0.02
    # The standardiser merged from 16 KB blocks is the one of the whole split.
    np.testing.assert_allclose(streamed.mean, x[:].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(streamed.scale, np.where(x[:].std(0) > 1e-8, x[:].std(0), 1), 1e-5)


def test_the_protocol_reads_splits_into_memory_only_when_they_fit(stored_digits, monkeypatch):
    import igpt.probe

    solvers = []
    real = igpt.probe.choose_solver
    monkeypatch.setattr(
        igpt.probe, "choose_solver", lambda x, s: solvers.append(real(x, s)) or solvers[-1]
    )
    settings = ProbeSettings(l2_grid=(1e-2,), sgd_batch_size=100, sgd_learning_rates=(0.3,))
    streamed = evaluate_features(*stored_digits.values(), settings)
    assert set(solvers) == {"sgd"}
    roomy = {
        name: (StoredFeatures(x._segments, max_bytes=1 << 24), y)
        for name, (x, y) in stored_digits.items()
    }
    solvers.clear()
    in_memory = evaluate_features(*roomy.values(), settings)
    assert set(solvers) == {"lbfgs"}
    assert abs(streamed["test_acc_refit"] - in_memory["test_acc_refit"]) < 0.02
    assert in_memory["test_acc_refit"] > 0.9


def test_lbfgs_on_features_beyond_the_bound_is_a_one_line_error(stored_digits):
    with pytest.raises(ValueError, match="needs the features in memory.*raise host_memory_mb"):
        fit_probe(stored_digits["train"], stored_digits["val"], ProbeSettings(solver="lbfgs"))


# Run in a fresh process: the baseline on a small split first (everything it compiles and
# imports is then in place; its features, 4x theirs, already exceed the bound, so it streams
# too), the peak resident set reset, then the baseline of a split 10x larger.
_BOUNDED_BASELINE = """
import json, sys
from igpt.probe import ProbeSettings, pixel_baseline

def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

directory, bound = sys.argv[1], int(sys.argv[2])
settings = ProbeSettings(l2_grid=(1e-3,), sgd_epochs=2, sgd_batch_size=128,
                         sgd_learning_rates=(0.1,))
def baseline(name):
    specs = [f"npz:{directory}/{name}-{split}.npz" for split in ("train", "val", "test")]
    return pixel_baseline(*specs, 64, directory, settings, max_bytes=bound)

baseline("small")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := the current resident set
before = status("VmRSS")
result = baseline("large")
print(json.dumps({"growth": status("VmHWM") - before, "result": result}))
"""


def test_a_probe_of_features_larger_than_its_memory_bound_stays_under_it(tmp_path):
    """The raw-pixel baseline at 64x64 of 8x8 synthetic images (48 KiB of features per
    example) on 11,000 examples: 516 MiB of features against a bound of 128 MiB. The peak
    resident set grows by less than the bound."""
    rng = np.random.default_rng(0)
    for name, sizes in [("small", (800, 100, 100)), ("large", (9000, 1000, 1000))]:
        for split, n in zip(("train", "val", "test"), sizes, strict=True):
            images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
            labels = images[:, :4].mean((1, 2, 3)) > images[:, 4:].mean((1, 2, 3))
            np.savez(tmp_path / f"{name}-{split}.npz", images=images, labels=labels.astype(int))
    bound = 128 * 2**20
    run = subprocess.run(
        [sys.executable, "-c", _BOUNDED_BASELINE, str(tmp_path), str(bound)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    stored = [p for p in (tmp_path / "pixels").glob("*/pixels.npy") if "_large-" in p.parent.name]
    assert len(stored) == 3 and sum(p.stat().st_size for p in stored) > 4 * bound
    assert report["growth"] < bound, f"the peak grew by {report['growth'] / 2**20:.0f} MiB"
    assert report["result"]["learning_rate"] == 0.1  # fitted by SGD, streaming
    assert report["result"]["test_acc_refit"] > 0.9  # the label is a function of the pixels
