"""Linear probes: L2-regularised multinomial logistic regression on frozen features, and the
paper's sweep over layers.

The objective, over standardised features x (training-set mean and standard deviation):

    mean_i CE(x_i W + b, y_i) + l2 / 2 * ||W||^2        (the bias is not penalised)

scikit-learn's `LogisticRegression(C=C)` minimises `C * sum_i CE_i + ||W||^2 / 2`, the same
objective divided by C * n, so `l2 = 1 / (C * n)` (`l2_to_c` / `c_to_l2`). It is solved
full-batch with L-BFGS (optax's, zoom line search) when the training features fit on the
device, else by mini-batch SGD with momentum and a cosine learning-rate schedule (the paper's
ImageNet probe). `l2` is chosen per layer on a validation split from a grid.
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
from igpt.features import FeatureExtractor
from igpt.figures import line_chart
from igpt.pixels import pixel_values, resize, to_rgb

PROBE_JSON = "probe.json"
PROBE_PLOT = "probe_accuracy.png"


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """How probes are fitted (the `probe` group of configs/probe.py, same names).

    Attributes:
      l2_grid: L2 strengths tried; the one with the best validation accuracy is kept.
      solver: "lbfgs" (full batch), "sgd" (mini-batch), or "auto": lbfgs when the training
        features have at most `full_batch_max` entries.
      full_batch_max: size limit (examples x features) of the full-batch solver under "auto".
      max_iter, tol: L-BFGS stops after max_iter iterations or when the gradient norm < tol.
      sgd_epochs, sgd_batch_size, sgd_learning_rate, sgd_momentum: the SGD solver; the rate
        decays from its peak to 0 with a cosine over all steps.
      seed: shuffles the SGD batches.
    """

    l2_grid: tuple[float, ...] = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
    solver: str = "auto"
    full_batch_max: int = 1 << 28
    max_iter: int = 1000
    tol: float = 1e-5
    sgd_epochs: int = 30
    sgd_batch_size: int = 1024
    sgd_learning_rate: float = 0.1
    sgd_momentum: float = 0.9
    seed: int = 0

    def __post_init__(self):
        if self.solver not in ("auto", "lbfgs", "sgd"):
            raise ValueError(f"probe.solver={self.solver!r}: choose 'auto', 'lbfgs' or 'sgd'")
        if not self.l2_grid or min(self.l2_grid) < 0:
            raise ValueError(f"probe.l2_grid={self.l2_grid} must be non-empty and non-negative")


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

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(N, D) raw features -> (N, K) class logits."""
        return ((features - self.mean) / self.scale) @ self.weights + self.bias

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        """Fraction of examples whose highest logit is their label."""
        return float(np.mean(np.argmax(self.logits(features), axis=-1) == labels))


def standardizer(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (1 where a feature is constant)."""
    features = np.asarray(features, np.float64)
    mean, std = features.mean(axis=0), features.std(axis=0)
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
    features: np.ndarray,
    y: np.ndarray,
    l2: float,
    init: dict,
    settings: ProbeSettings,
    mean: np.ndarray,
    scale: np.ndarray,
) -> dict:
    """Minimise `objective` by mini-batch SGD with momentum and a cosine schedule.

    Raw features stay on the host; each batch is standardised on the device, so the full
    set is never copied there.
    """
    n = len(features)
    batch = min(settings.sgd_batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    schedule = optax.cosine_decay_schedule(
        settings.sgd_learning_rate, settings.sgd_epochs * steps_per_epoch
    )
    tx = optax.sgd(schedule, momentum=settings.sgd_momentum)
    mean, scale = jnp.asarray(mean), jnp.asarray(scale)

    @jax.jit
    def step(params, opt_state, xb, yb, weight):
        grads = jax.grad(objective)(params, (xb - mean) / scale, yb, l2, weight)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = init, tx.init(init)
    rng = np.random.default_rng(settings.seed)
    for _ in range(settings.sgd_epochs):
        order = rng.permutation(n)
        for i in range(steps_per_epoch):
            # The last batch is padded to full size with weight 0: one compiled shape.
            index = order[i * batch : (i + 1) * batch]
            weight = np.zeros(batch, np.float32)
            weight[: len(index)] = 1.0
            index = np.resize(index, batch)
            params, opt_state = step(params, opt_state, features[index], y[index], weight)
    return params


def fit_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    settings: ProbeSettings = ProbeSettings(),
    num_classes: int | None = None,
) -> tuple[LinearProbe, dict[float, float]]:
    """Fit a probe for each L2 strength of the grid on `train` = (features, labels) and keep
    the one with the best accuracy on `val` (ties: the stronger L2).

    Strengths are fitted from strongest to weakest, each starting from the previous solution.
    Returns the probe and the validation accuracy of every strength.
    """
    x, y = np.asarray(train[0], np.float32), np.asarray(train[1])
    val_x, val_y = val
    labels = np.concatenate([y, val_y])
    if labels.min() < 0:
        raise ValueError("probes need labelled examples; the split has labels of -1")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    mean, scale = standardizer(x)
    solver = settings.solver
    if solver == "auto":
        solver = "lbfgs" if x.size <= settings.full_batch_max else "sgd"
    if solver == "lbfgs":
        x_std = (x - mean) / scale
    params = {
        "w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }
    best, best_acc, grid = None, -1.0, {}
    for l2 in sorted(settings.l2_grid, reverse=True):
        if solver == "lbfgs":
            params = fit_lbfgs(x_std, y, l2, params, settings)
        else:
            params = fit_sgd(x, y, l2, params, settings, mean, scale)
        w, b = jax.device_get((params["w"], params["b"]))
        probe = LinearProbe(mean, scale, np.asarray(w), np.asarray(b), float(l2))
        grid[float(l2)] = probe.accuracy(val_x, val_y)
        if grid[float(l2)] > best_acc:
            best, best_acc = probe, grid[float(l2)]
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


def pixel_features(spec: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels of a split as features: each image resized to `image_size` (bilinear, as
    the tokenizer does), scaled to [-1, 1] and flattened; with the labels."""
    source = data_lib.open_source(spec)
    records = [source[i] for i in range(len(source))]
    images = np.stack([resize(to_rgb(r["image"]), image_size) for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return pixel_values(images).reshape(len(images), -1), labels


def pixel_baseline(
    train: str,
    val: str,
    test: str,
    image_size: int,
    settings: ProbeSettings = ProbeSettings(),
    labels_per_class: int = 0,
) -> dict:
    """The same probe on standardised raw pixels instead of model features: the accuracy a
    representation has to beat. Takes split specs (e.g. "digits:test") and returns
    train/val/test accuracy and the chosen L2."""
    splits = {name: pixel_features(spec, image_size) for name, spec in
              (("train", train), ("val", val), ("test", test))}  # fmt: skip
    x, y = splits["train"]
    if labels_per_class:
        keep = subsample_per_class(y, labels_per_class, settings.seed)
        splits["train"] = (x[keep], y[keep])
    probe, _ = fit_probe(splits["train"], splits["val"], settings)
    return {f"{name}_acc": probe.accuracy(*xy) for name, xy in splits.items()} | {
        "l2": probe.l2,
        "C": l2_to_c(probe.l2, len(splits["train"][1])),
    }


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
    settings = settings_from_config(config.probe)
    extractor = FeatureExtractor(
        config.init_from,
        batch_size=config.batch_size,
        mesh_shape=config.mesh_shape,
        cache_dir=config.features_dir or workdir / "features",
        palette=config.data.palette,
    )
    specs = {"train": config.data.train, "val": config.data.val, "test": config.data.test}
    splits = {name: extractor.features(spec, config.layers) for name, spec in specs.items()}
    train_features, train_labels = splits["train"]
    if config.labels_per_class:
        keep = subsample_per_class(train_labels, config.labels_per_class, settings.seed)
        train_features = {layer: x[keep] for layer, x in train_features.items()}
        train_labels = train_labels[keep]

    rows = []
    for layer, x in train_features.items():
        probe, grid = fit_probe(
            (x, train_labels), (splits["val"][0][layer], splits["val"][1]), settings
        )
        accuracy = {
            "train_acc": probe.accuracy(x, train_labels),
            "val_acc": grid[probe.l2],
            "test_acc": probe.accuracy(splits["test"][0][layer], splits["test"][1]),
        }
        rows.append({"layer": layer, **accuracy, "l2": probe.l2,
                     "C": l2_to_c(probe.l2, len(train_labels)),
                     "val_acc_by_l2": {str(k): v for k, v in grid.items()}})  # fmt: skip
        print(
            f"layer {layer:3d}: train {100 * accuracy['train_acc']:6.2f}  val "
            f"{100 * accuracy['val_acc']:6.2f}  test {100 * accuracy['test_acc']:6.2f}  "
            f"(l2 {probe.l2:g})",
            flush=True,
        )
    best = max(rows, key=lambda row: row["val_acc"])  # the first (shallowest) on ties
    result = {
        "init_from": str(config.init_from),
        "splits": specs,
        "num_train": len(train_labels),
        "labels_per_class": config.labels_per_class,
        "num_layers": extractor.config.n_layer,
        "layers": rows,
        "best_layer": best["layer"],
        "best": {k: best[k] for k in ("train_acc", "val_acc", "test_acc", "l2", "C")},
    }
    if config.baseline:
        result["raw_pixels"] = pixel_baseline(
            specs["train"], specs["val"], specs["test"], extractor.image_size, settings,
            config.labels_per_class,
        )  # fmt: skip
        print(f"raw pixels: test {100 * result['raw_pixels']['test_acc']:.2f}", flush=True)
    print(
        f"best layer {best['layer']} (val {100 * best['val_acc']:.2f}): test accuracy "
        f"{100 * best['test_acc']:.2f}",
        flush=True,
    )
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / PROBE_JSON).write_text(json.dumps(result, indent=2) + "\n")
        plot_probe(result, workdir / PROBE_PLOT)
    return result


def plot_probe(result: dict, path: str | Path) -> Path:
    """The paper's figure: probe accuracy against layer, the best layer marked, and the
    raw-pixel baseline as a dashed line when present."""
    rows = result["layers"]
    series = {name: [100 * row[f"{name}_acc"] for row in rows] for name in ("train", "val", "test")}
    references = {}
    if "raw_pixels" in result:
        references["raw pixels (test)"] = 100 * result["raw_pixels"]["test_acc"]
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
