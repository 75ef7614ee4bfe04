"""Linear probes: L2-regularised multinomial logistic regression on frozen features, and the
paper's sweep over layers.

The objective, over standardised features x (training-set mean and standard deviation):

    mean_i CE(x_i W + b, y_i) + l2 / 2 * ||W||^2        (the bias is not penalised)

scikit-learn's `LogisticRegression(C=C)` minimises `C * sum_i CE_i + ||W||^2 / 2`, the same
objective divided by C * n, so `l2 = 1 / (C * n)` (`l2_to_c` / `c_to_l2`). It is solved
full-batch with L-BFGS (optax's, zoom line search) when the features fit in host memory and
the training features on the device, else by mini-batch SGD with momentum and a cosine
learning-rate schedule (the paper's ImageNet probe), streaming features too large for memory
from their stores on disk (igpt.feature_store). `l2` is chosen per layer on a validation split
from a grid.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from igpt import data as data_lib
from igpt import files
from igpt.data.augment import central_square
from igpt.feature_store import FeatureStore, StoredFeatures, blocks, concatenate, in_memory
from igpt.features import FeatureExtractor, check_layers, store_name
from igpt.figures import line_chart
from igpt.lock import DirectoryLock
from igpt.pixels import pixel_values, resize, to_rgb

PROBE_JSON = "probe.json"
PROBE_PLOT = "probe_accuracy.png"
PIXELS = "pixels"  # the feature set of raw pixels in a FeatureStore
_PIXEL_BATCH = 256  # images resized per batch written


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """How probes are fitted (the `probe` group of configs/probe.py, same names).

    Attributes:
      l2_grid: L2 strengths tried; the one with the best validation accuracy is kept.
      solver: "lbfgs" (full batch), "sgd" (mini-batch), or "auto": lbfgs when the training
        features have at most `full_batch_max` entries.
      full_batch_max: size limit (examples x features) of the full-batch solver under "auto".
      max_iter, tol: L-BFGS stops after max_iter iterations or when the gradient norm < tol.
      sgd_epochs, sgd_batch_size, sgd_learning_rates, sgd_momentum: the SGD solver (the paper's
        ImageNet probe): momentum, a cosine decay from the peak rate to 0 over all steps, and
        each peak rate of `sgd_learning_rates` tried with each L2 strength, the best pair kept
        by validation accuracy.
      seed: shuffles the SGD batches; the low-data subsets are drawn from seed, seed + 1, ...
    """

    l2_grid: tuple[float, ...] = (1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
    solver: str = "auto"
    full_batch_max: int = 1 << 28
    max_iter: int = 1000
    tol: float = 1e-5
    sgd_epochs: int = 30
    sgd_batch_size: int = 1024
    sgd_learning_rates: tuple[float, ...] = (1.0, 0.3, 0.1, 0.03)
    sgd_momentum: float = 0.9
    seed: int = 0

    def __post_init__(self):
        if self.solver not in ("auto", "lbfgs", "sgd"):
            raise ValueError(f"probe.solver={self.solver!r}: choose 'auto', 'lbfgs' or 'sgd'")
        if not self.l2_grid or min(self.l2_grid) < 0:
            raise ValueError(f"probe.l2_grid={self.l2_grid} must be non-empty and non-negative")
        if not self.sgd_learning_rates or min(self.sgd_learning_rates) <= 0:
            raise ValueError(f"probe.sgd_learning_rates={self.sgd_learning_rates} must be > 0")


def l2_to_c(l2: float, num_examples: int) -> float:
    """scikit-learn's C for our L2 strength on `num_examples` training examples."""
    return 1.0 / (l2 * num_examples)


def c_to_l2(c: float, num_examples: int) -> float:
    """Our L2 strength for scikit-learn's C on `num_examples` training examples."""
    return 1.0 / (c * num_examples)


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: standardisation (mean, scale) then logits = x W + b."""

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    weights: np.ndarray  # (D, K)
    bias: np.ndarray  # (K,)
    l2: float
    learning_rate: float | None = None  # the SGD solver's peak rate; None for L-BFGS

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(N, D) raw features -> (N, K) class logits."""
        return ((features - self.mean) / self.scale) @ self.weights + self.bias

    def accuracy(self, features, labels: np.ndarray) -> float:
        """Fraction of examples (an array or stored features, read block by block) whose
        highest logit is their label."""
        predictions = [np.argmax(self.logits(block), axis=-1) for block in blocks(features)]
        return float(np.mean(np.concatenate(predictions) == labels))


def standardizer(features) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (1 where a feature is constant), of an array
    or of stored features block by block: each block's mean and squared deviations, in
    float64, merged as in Chan et al.'s parallel variance (exact for a single block)."""
    count, mean, squares = 0, 0.0, 0.0
    for block in blocks(features):
        block = np.array(block, np.float64)  # a copy, squared in place below
        block_mean = block.mean(axis=0)
        block -= block_mean
        block_squares = np.square(block, out=block).sum(axis=0)
        total = count + len(block)
        delta = block_mean - mean
        mean = mean + delta * (len(block) / total)
        squares = squares + block_squares + np.square(delta) * (count * len(block) / total)
        count = total
    std = np.sqrt(squares / count)
    return mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32)


def objective(params: dict, x: jax.Array, y: jax.Array, l2, weight=None) -> jax.Array:
    """Mean cross-entropy of logits x W + b (weighted by `weight` if given) plus l2/2 ||W||^2."""
    logits = x @ params["w"] + params["b"]
    ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
    mean_ce = jnp.mean(ce) if weight is None else jnp.sum(ce * weight) / jnp.sum(weight)
    return mean_ce + 0.5 * l2 * jnp.sum(jnp.square(params["w"]))


@functools.partial(jax.jit, static_argnames="max_iter")
def _lbfgs(x, y, l2, init, tol, *, max_iter):
    def loss(params):
        return objective(params, x, y, l2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(params, updates), state

    def not_done(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
        return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

    params, _ = jax.lax.while_loop(not_done, body, (init, opt.init(init)))
    return params


def fit_lbfgs(x: np.ndarray, y: np.ndarray, l2: float, init: dict, settings: ProbeSettings) -> dict:
    """Minimise `objective` over standardised features x, full batch, from `init`."""
    return _lbfgs(
        jnp.asarray(x), jnp.asarray(y), l2, init, settings.tol, max_iter=settings.max_iter
    )


def fit_sgd(
    features,
    y: np.ndarray,
    l2: float,
    init: dict,
    settings: ProbeSettings,
    mean: np.ndarray,
    scale: np.ndarray,
    learning_rate: float,
) -> dict:
    """Minimise `objective` by mini-batch SGD with momentum and a cosine schedule from
    `learning_rate` to 0.

    Raw features (an array, or stored features) stay on the host; each batch is
    standardised on the device, so the full set is never copied there. Stored features are
    read again every epoch, into one buffer (`_epoch_chunks`) of half their memory bound.
    The other half is the batches': 8 of them, since two steps are alive at once (the one
    running and the next being gathered), each with its batch on the host and the device,
    standardised, and the gradient's temporaries.
    """
    n = len(features)
    batch = min(settings.sgd_batch_size, n)
    chunk_rows, buffer = n, None  # stored features: chunks, read into one buffer
    if isinstance(features, StoredFeatures):
        half, batch_bytes = features.max_bytes // 2, batch * features.row_bytes
        if 8 * batch_bytes > half:
            raise ValueError(
                f"host_memory_mb={features.max_bytes / 2**20:g} is too small for SGD batches "
                f"of {batch} x {features.shape[1]} features (at least "
                f"{16 * batch_bytes / 2**20:.3g} MiB): raise it or lower probe.sgd_batch_size"
            )
        chunk_rows = max(batch, half // features.row_bytes // batch * batch)  # whole batches
        buffer = np.empty((min(chunk_rows, n), features.shape[1]), np.float32)
    steps_per_epoch = (n // chunk_rows) * math.ceil(chunk_rows / batch) + math.ceil(
        (n % chunk_rows) / batch
    )
    total = settings.sgd_epochs * steps_per_epoch
    schedule = optax.cosine_decay_schedule(learning_rate, total)
    rates = np.asarray(jax.vmap(schedule)(jnp.arange(total)), np.float32)
    mean, scale, momentum = jnp.asarray(mean), jnp.asarray(scale), settings.sgd_momentum
    params, velocity = init, jax.tree.map(jnp.zeros_like, init)
    rng = np.random.default_rng(settings.seed)
    t = 0
    for _ in range(settings.sgd_epochs):
        for x_chunk, y_chunk, order in _epoch_chunks(features, y, chunk_rows, rng, buffer):
            for i in range(math.ceil(len(order) / batch)):
                # The last batch is padded to full size with weight 0: one compiled shape.
                index = order[i * batch : (i + 1) * batch]
                weight = np.zeros(batch, np.float32)
                weight[: len(index)] = 1.0
                index = np.resize(index, batch)
                previous = params
                xb, yb = x_chunk[index], y_chunk[index]
                params, velocity = _sgd_step(
                    params, velocity, xb, yb, weight, mean, scale, l2, rates[t], momentum
                )
                t += 1
                # At most one step in flight: queued steps would each hold their batch.
                jax.block_until_ready(previous)
    return params


@jax.jit
def _sgd_step(params, velocity, xb, yb, weight, mean, scale, l2, learning_rate, momentum):
    """One step of SGD with momentum (optax.sgd's: velocity = grad + momentum * velocity,
    params -= rate * velocity) on a batch standardised here. Everything that varies is an
    argument, so each batch shape compiles once per process, not once per fit."""
    grads = jax.grad(objective)(params, (xb - mean) / scale, yb, l2, weight)
    velocity = jax.tree.map(lambda v, g: g + momentum * v, velocity, grads)
    params = jax.tree.map(lambda p, v: p - learning_rate * v, params, velocity)
    return params, velocity


def _epoch_chunks(features, y, chunk_rows, rng, buffer):
    """One epoch of training examples in random order: (features, labels, order) chunks of
    at most `chunk_rows`, whose batches are the rows `order[i * B : (i + 1) * B]`.

    An array is one chunk, in a random permutation. Stored features are shuffled as well as
    streaming allows: the split is cut into pieces of 1/64 of a chunk, the pieces are put
    in random order, and each chunk (64 pieces from all over the split, each one contiguous
    read into `buffer`) is visited in a random permutation.
    """
    n = len(y)
    if isinstance(features, np.ndarray):
        yield features, y, rng.permutation(n)
        return
    piece = max(1, chunk_rows // 64)
    starts = rng.permutation(math.ceil(n / piece)) * piece
    order = np.concatenate([np.arange(s, min(s + piece, n)) for s in starts])
    for c in range(0, n, chunk_rows):
        index = order[c : c + chunk_rows]
        chunk = features.take(index, out=buffer[: len(index)])
        yield chunk, y[index], rng.permutation(len(index))


def fit_probes(
    train: tuple[np.ndarray, np.ndarray],
    l2s,
    settings: ProbeSettings,
    num_classes: int,
    learning_rate: float | None = None,
) -> list[LinearProbe]:
    """One probe per L2 strength (in the order given) on `train` = (features, labels), with
    features standardised by the training split's own statistics. Full-batch fits start from
    the previous solution, so give strengths from strongest to weakest."""
    x, y = train[0], np.asarray(train[1])
    if y.min() < 0:
        raise ValueError("probes need labelled examples; the split has labels of -1")
    mean, scale = standardizer(x)
    solver = choose_solver(x, settings)
    if solver == "lbfgs":
        x_std = (np.asarray(x, np.float32) - mean) / scale
    params = {
        "w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }
    probes = []
    for l2 in l2s:
        if solver == "lbfgs":
            params = fit_lbfgs(x_std, y, l2, params, settings)
        else:
            rate = settings.sgd_learning_rates[0] if learning_rate is None else learning_rate
            params = fit_sgd(x, y, l2, params, settings, mean, scale, rate)
        w, b = jax.device_get((params["w"], params["b"]))
        probes.append(LinearProbe(mean, scale, np.asarray(w), np.asarray(b), float(l2)))
    return probes


def choose_solver(features, settings: ProbeSettings) -> str:
    """The solver for these training features, "lbfgs" or "sgd": an array is in memory;
    stored features are too large for it (see `evaluate_features`) and only SGD streams."""
    stored = isinstance(features, StoredFeatures)
    if settings.solver == "lbfgs" and stored:
        raise ValueError(
            f"probe.solver='lbfgs' needs the features in memory, 4 copies of all splits, but "
            f"they may use {features.max_bytes / 2**20:.0f} MiB: raise host_memory_mb or use "
            "probe.solver='sgd'"
        )
    if settings.solver != "auto":
        return settings.solver
    return "sgd" if stored or features.size > settings.full_batch_max else "lbfgs"


def fit_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    settings: ProbeSettings = ProbeSettings(),
    num_classes: int | None = None,
) -> tuple[LinearProbe, dict[float, float]]:
    """Fit a probe for each L2 strength of the grid (and, with the SGD solver, each learning
    rate) on `train` and keep the one with the best accuracy on `val` (ties: the stronger L2).

    Returns the probe and the validation accuracy of every strength (at its best rate).
    """
    labels = np.concatenate([np.asarray(train[1]), np.asarray(val[1])])
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    l2s = sorted(settings.l2_grid, reverse=True)
    sgd = choose_solver(train[0], settings) == "sgd"
    rates = settings.sgd_learning_rates if sgd else (None,)
    best, best_acc, grid = None, -1.0, {}
    for rate in rates:
        for probe in fit_probes(train, l2s, settings, num_classes, rate):
            accuracy = probe.accuracy(*val)
            grid[probe.l2] = max(grid.get(probe.l2, -1.0), accuracy)
            if accuracy > best_acc:
                best, best_acc = dataclasses.replace(probe, learning_rate=rate), accuracy
    return best, grid


def subsample_per_class(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `per_class` examples of each class, drawn without replacement (the
    paper's low-data probes: 4 or 25 labels per class)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(
                f"labels_per_class={per_class} but class {label} has only {len(members)} "
                "training examples"
            )
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def pixel_features(
    spec: str,
    image_size: int,
    features_dir: str | Path,
    center_crop: bool = False,
    max_bytes: int = 1 << 30,
) -> tuple[StoredFeatures, np.ndarray]:
    """Raw pixels of a split as features, with the labels: each image resized to
    `image_size` (bilinear, as the tokenizer does), scaled to [-1, 1] and flattened, kept in
    a FeatureStore under `features_dir/pixels` like model features (written once, read in
    blocks of at most `max_bytes`). A split of grey images (R = G = B everywhere) is read as
    one channel: its three copies add nothing."""
    name = store_name(spec, image_size, center_crop)
    store = FeatureStore(Path(features_dir) / "pixels" / name)
    if PIXELS not in store.names():
        _write_pixels(store, spec, image_size, center_crop)
    features = store.features(PIXELS, max_bytes)
    if all(_grey(block) for block in features.blocks()):
        features = store.features(PIXELS, max_bytes, columns=slice(0, None, 3))
    return features, store.labels()


def _grey(block: np.ndarray) -> bool:
    """Whether every flattened (H, W, 3) row of `block` has R = G = B."""
    return np.array_equal(block[:, 0::3], block[:, 1::3]) and np.array_equal(
        block[:, 0::3], block[:, 2::3]
    )


def _write_pixels(store: FeatureStore, spec: str, image_size: int, center_crop: bool) -> None:
    """Fill `store` with the pixels of split `spec`; each process resizes the examples p,
    p + P, ... (as in evaluation), a batch at a time."""
    source = data_lib.open_source(spec)
    mine = np.arange(jax.process_index(), len(source), jax.process_count())
    num_batches = math.ceil(math.ceil(len(source) / jax.process_count()) / _PIXEL_BATCH)

    def produce(start: int):
        for first in range(start * _PIXEL_BATCH, len(mine), _PIXEL_BATCH):
            index = mine[first : first + _PIXEL_BATCH]
            records = [source[int(i)] for i in index]
            images = [to_rgb(r["image"]) for r in records]
            if center_crop:
                images = [central_square(image) for image in images]
            images = np.stack([resize(image, image_size) for image in images])
            labels = np.asarray([r["label"] for r in records], np.int32)
            yield index, labels, {PIXELS: pixel_values(images).reshape(len(index), -1)}

    dims = {PIXELS: image_size * image_size * 3}
    store.fill(dims, len(source), num_batches, produce, desc=f"pixels of {spec}")


def evaluate_features(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    settings: ProbeSettings = ProbeSettings(),
    labels_per_class: int = 0,
    num_subsets: int = 5,
) -> dict:
    """The paper's probe protocol on one feature set (section 3.1, 4.7).

    All labels: L2 chosen on `val`, then the probe is refit with that L2 on train + val and
    its test accuracy reported (`test_acc_refit`, the paper's figure); `test_acc` is the probe
    fitted on train alone. Low-data (`labels_per_class` = n): `num_subsets` random subsets of n
    training labels per class, each with its own L2 chosen on n validation labels per class
    drawn from `val`; the mean and standard deviation of their test accuracy (no refit: it
    would double the labels).
    """
    num_classes = int(max(train[1].max(), val[1].max(), test[1].max())) + 1
    # One memory decision for the whole protocol: stored features are read into memory
    # once if 4 copies of all splits fit their bound (the splits, and the refit's train+val,
    # standardised, and on the device for the full-batch solver), else every fit and
    # evaluation streams them block by block.
    features = in_memory([train[0], val[0], test[0]], copies=4)
    train, val, test = [(x, s[1]) for x, s in zip(features, (train, val, test), strict=True)]
    if not labels_per_class:
        probe, grid = fit_probe(train, val, settings, num_classes)
        both = (concatenate([train[0], val[0]], axis=0), np.concatenate([train[1], val[1]]))
        (refit,) = fit_probes(both, [probe.l2], settings, num_classes, probe.learning_rate)
        return {
            "train_acc": probe.accuracy(*train),
            "val_acc": grid[probe.l2],
            "test_acc": probe.accuracy(*test),
            "test_acc_refit": refit.accuracy(*test),
            "l2": probe.l2,
            "C": l2_to_c(probe.l2, len(train[1])),
            "learning_rate": probe.learning_rate,
            "val_acc_by_l2": {str(k): v for k, v in grid.items()},
        }
    val_accs, test_accs, l2s = [], [], []
    for subset in range(num_subsets):
        seed = settings.seed + subset
        keep = subsample_per_class(train[1], labels_per_class, seed)
        held = subsample_per_class(val[1], labels_per_class, seed + 10_000)
        probe, grid = fit_probe(
            (train[0][keep], train[1][keep]), (val[0][held], val[1][held]), settings, num_classes
        )
        val_accs.append(grid[probe.l2])
        test_accs.append(probe.accuracy(*test))
        l2s.append(probe.l2)
    return {
        "val_acc": float(np.mean(val_accs)),
        "val_acc_std": float(np.std(val_accs)),
        "test_acc": float(np.mean(test_accs)),
        "test_acc_std": float(np.std(test_accs)),
        "test_acc_by_subset": test_accs,
        "l2_by_subset": l2s,
    }


def pixel_baseline(
    train: str,
    val: str,
    test: str,
    image_size: int,
    features_dir: str | Path,
    settings: ProbeSettings = ProbeSettings(),
    labels_per_class: int = 0,
    num_subsets: int = 5,
    center_crop: bool = False,
    max_bytes: int = 1 << 30,
) -> dict:
    """The same protocol (`evaluate_features`) on standardised raw pixels instead of model
    features: the accuracy a representation has to beat. Takes split specs (e.g.
    "digits:test"); the pixels are kept in `features_dir` (see `pixel_features`)."""
    splits = [
        pixel_features(spec, image_size, features_dir, center_crop, max_bytes)
        for spec in (train, val, test)
    ]
    result = evaluate_features(*splits, settings, labels_per_class, num_subsets)
    return {"image_size": image_size} | result


def settings_from_config(probe: ml_collections.ConfigDict) -> ProbeSettings:
    """ProbeSettings from a config's `probe` group (same field names)."""
    fields = probe.to_dict()
    fields["l2_grid"] = tuple(float(v) for v in fields["l2_grid"])
    return ProbeSettings(**fields)


def run_probe(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The layer sweep of configs/probe.py: features of every requested layer for the train,
    val and test splits, one probe per layer, the raw-pixel baseline; writes
    `workdir/probe.json` and `workdir/probe_accuracy.png`, prints a table and the best layer
    (by validation accuracy). Returns what probe.json holds."""
    if not config.init_from:
        raise ValueError("no model to probe: set --config.init_from=DIR")
    workdir = Path(workdir).absolute()
    features_dir = Path(config.features_dir or workdir / "features").absolute()
    with DirectoryLock(workdir, "probe workdir"), DirectoryLock(features_dir, "features dir"):
        return _sweep(config, workdir, features_dir)


def _sweep(config: ml_collections.ConfigDict, workdir: Path, features_dir: Path) -> dict:
    settings = settings_from_config(config.probe)
    max_bytes = int(config.host_memory_mb * 2**20)
    extractor = FeatureExtractor(
        config.init_from,
        features_dir=features_dir,
        batch_size=config.batch_size,
        mesh_shape=config.mesh_shape,
        max_bytes=max_bytes,
        palette=config.data.palette,
        center_crop=config.data.center_crop,
    )
    specs = {"train": config.data.train, "val": config.data.val, "test": config.data.test}
    layers = check_layers(extractor.config, config.layers)
    concat = tuple(config.concat_layers)
    wanted = tuple(sorted(set(layers) | set(concat)))
    splits = {name: extractor.features(spec, wanted) for name, spec in specs.items()}
    low_data = config.labels_per_class
    headline = "test_acc" if low_data else "test_acc_refit"

    def features(layer_set):
        return [
            (concatenate([splits[n][0][k] for k in layer_set], axis=1), splits[n][1])
            for n in ("train", "val", "test")
        ]

    def evaluate(layer_set):
        return evaluate_features(*features(layer_set), settings, low_data, config.num_subsets)

    rows = []
    for layer in layers:
        row = {"layer": layer} | evaluate((layer,))
        rows.append(row)
        spread = f" +- {100 * row['test_acc_std']:.2f}" if low_data else ""
        print(
            f"layer {layer:3d}: val {100 * row['val_acc']:6.2f}  test "
            f"{100 * row[headline]:6.2f}{spread}",
            flush=True,
        )
    best = max(rows, key=lambda row: row["val_acc"])  # the first (shallowest) on ties
    result = {
        "init_from": str(config.init_from),
        "splits": specs,
        "num_train": len(splits["train"][1]),
        "labels_per_class": low_data,
        "num_subsets": config.num_subsets if low_data else 0,
        "protocol": (
            f"{config.num_subsets} subsets of {low_data} labels per class, L2 chosen per subset "
            "on as many validation labels; test_acc is their mean"
            if low_data
            else "L2 and layer chosen on val; test_acc_refit: refit on train+val (the paper's)"
        ),
        "headline": headline,
        "num_layers": extractor.config.n_layer,
        "layers": rows,
        "best_layer": best["layer"],
        "best": {k: v for k, v in best.items() if k != "val_acc_by_l2"},
    }
    if concat:
        result["concat"] = {"layers": list(concat)} | evaluate(concat)
        print(
            f"layers {list(concat)} concatenated: val {100 * result['concat']['val_acc']:.2f}"
            f"  test {100 * result['concat'][headline]:.2f}",
            flush=True,
        )
    if config.baseline:
        sizes = sorted({extractor.image_size, *config.baseline_sizes})
        result["raw_pixels"] = {
            str(size): pixel_baseline(
                specs["train"],
                specs["val"],
                specs["test"],
                size,
                features_dir,
                settings,
                low_data,
                config.num_subsets,
                config.data.center_crop,
                max_bytes,
            )
            for size in sizes
        }
        for size, pixels in result["raw_pixels"].items():
            print(
                f"raw pixels {size}x{size}: val {100 * pixels['val_acc']:.2f}  test "
                f"{100 * pixels[headline]:.2f}",
                flush=True,
            )
    print(
        f"best layer {best['layer']} (val {100 * best['val_acc']:.2f}): test accuracy "
        f"{100 * best[headline]:.2f}",
        flush=True,
    )
    if jax.process_index() == 0:
        files.write_json(workdir / PROBE_JSON, result)
        plot_probe(result, workdir / PROBE_PLOT)
    return result


def plot_probe(result: dict, path: str | Path) -> Path | None:
    """The paper's figure: probe accuracy against layer (validation, and test as reported),
    the best layer marked, and as horizontal lines the raw-pixel baselines and the probe of
    concatenated layers when present."""
    rows, headline = result["layers"], result["headline"]
    series = {
        "val": [100 * row["val_acc"] for row in rows],
        "test": [100 * row[headline] for row in rows],
    }
    references = {
        f"raw pixels {size}x{size} (test)": 100 * pixels[headline]
        for size, pixels in result.get("raw_pixels", {}).items()
    }
    if "concat" in result:
        concat = result["concat"]
        layers = ",".join(str(layer) for layer in concat["layers"])
        references[f"layers {layers} concatenated (test)"] = 100 * concat[headline]
    return line_chart(
        path,
        [row["layer"] for row in rows],
        series,
        title=f"Linear probe accuracy by layer ({result['init_from']})",
        xlabel="layer",
        ylabel="accuracy (%)",
        references=references,
        highlight_x=result["best_layer"],
    )


def read_probe(directory: str | Path) -> dict:
    """The `probe.json` a probe run wrote into `directory`, or that file itself (a copy kept
    after the run dir is gone, like docs/fashion_bert_probe.json)."""
    path = Path(directory)
    path = path if path.suffix == ".json" else path / PROBE_JSON
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: point at a probe run's --workdir or its {PROBE_JSON}"
        )
    return json.loads(path.read_text())


def plot_probe_comparison(results: dict[str, dict], path: str | Path) -> Path | None:
    """Several models' probe test accuracy by layer on one chart (the paper's comparison of
    the AR and BERT objectives), with the first result's raw-pixel baselines as lines."""
    if not results:
        raise ValueError("plot_probe_comparison needs at least one probe result")
    layer_counts = {name: len(result["layers"]) for name, result in results.items()}
    if len(set(layer_counts.values())) != 1:
        raise ValueError(f"the probes cover different numbers of layers: {layer_counts}")
    first = next(iter(results.values()))
    series = {
        f"{name} (test)": [100 * row[result["headline"]] for row in result["layers"]]
        for name, result in results.items()
    }
    references = {
        f"raw pixels {size}x{size} (test)": 100 * pixels[first["headline"]]
        for size, pixels in first.get("raw_pixels", {}).items()
    }
    return line_chart(
        path,
        [row["layer"] for row in first["layers"]],
        series,
        title="Linear probe accuracy by layer: " + " vs ".join(results),
        xlabel="layer",
        ylabel="accuracy (%)",
        references=references,
    )
