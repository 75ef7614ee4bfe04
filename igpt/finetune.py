"""Fine-tuning: a pretrained iGPT plus its classifier head, trained as the paper does.

The head (`score`: a linear layer without bias on the mean over positions of the final norm
output) starts at zero. The loss is `generative * L_gen + classification * L_clf` (the paper's
joint L_gen + L_clf by default; generative weight 0 is L_clf alone), with Adam at a constant
learning rate after warmup. Training is `igpt.pretrain.train` (same sharding, checkpoints,
exact resume, metrics); this module adds early stopping on validation accuracy, keeps the best
parameters as an igpt model dir `workdir/best`, and finally reports the best model's test
accuracy.

Early stopping survives restarts: each validation result is appended to
`workdir/validation.json`, and a resumed run first forgets the results of steps after its
checkpoint (it will compute them again, identically, since resume is exact).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np

from igpt import data as data_lib
from igpt.checkpoint import CONFIG_FILE, load_model, save_model
from igpt.checkpointing import PALETTE_FILE, is_workdir, latest_step
from igpt.config import ModelConfig
from igpt.features import load_checkpoint
from igpt.model import param_shapes
from igpt.plots import line_chart
from igpt.pretrain import evaluate, train
from igpt.run_config import build_model_config
from igpt.sharding import make_mesh, tree_shardings
from igpt.tokenizer import ColorTokenizer
from igpt.trainer import LossWeights, make_eval_step

BEST_DIR = "best"
HISTORY_FILE = "validation.json"
RESULTS_FILE = "results.json"
PLOT_FILE = "finetune_accuracy.png"


class EarlyStopping:
    """The `on_eval` callback of a fine-tuning run: records validation accuracy, saves a new
    best model to `workdir/best` and says stop after `patience` evaluations without
    improvement (patience 0: never stop early).
    """

    def __init__(self, workdir: Path, patience: int, model_config: ModelConfig):
        self.workdir, self.patience, self.model_config = workdir, patience, model_config
        resumed_at = latest_step(workdir) if is_workdir(workdir) else None
        history = []
        if resumed_at is not None and (workdir / HISTORY_FILE).exists():
            history = json.loads((workdir / HISTORY_FILE).read_text())
        self.history = [h for h in history if resumed_at is not None and h["step"] <= resumed_at]

    @property
    def best(self) -> dict | None:
        """The first validation record with the highest accuracy, or None."""
        return max(self.history, key=lambda h: h["accuracy"], default=None)

    @property
    def evals_since_best(self) -> int:
        """Validation passes after the best one."""
        best = self.best
        return 0 if best is None else len(self.history) - 1 - self.history.index(best)

    @property
    def stopped(self) -> bool:
        """True once `patience` evaluations have passed without improvement."""
        return self.patience > 0 and self.evals_since_best >= self.patience

    def __call__(self, step: int, state, metrics: dict) -> bool:
        previous = self.best
        self.history.append({"step": step} | {k: float(v) for k, v in metrics.items()})
        if previous is None or metrics["accuracy"] > previous["accuracy"]:
            self._save_best(state.params)
        if jax.process_index() == 0:
            _write_json(self.workdir / HISTORY_FILE, self.history)
        return self.stopped

    def _save_best(self, params) -> None:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        params = jax.device_get(params)
        if jax.process_index() == 0:  # train() has written the palette before any evaluation
            clusters = np.load(self.workdir / PALETTE_FILE)
            save_model(self.workdir / BEST_DIR, self.model_config, params, clusters, overwrite=True)


def _write_json(path: Path, value) -> None:
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(staging, path)


def _write_checkpoint_palette(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """With `data.palette="checkpoint"`, write the init_from model's clusters to
    workdir/palette.npy, which training then uses (and resumes with)."""
    path = workdir / PALETTE_FILE
    if path.exists() or config.data.palette != "checkpoint":
        return  # otherwise train() fits or loads data.palette and writes palette.npy
    clusters = load_checkpoint(config.init_from)[2]
    if clusters is None:
        raise ValueError(
            f"init_from={config.init_from} has no colour palette; set --config.data.palette to "
            "the .npy or transformers dir it was trained with"
        )
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".tmp.npy")
        np.save(staging, np.asarray(clusters, np.float32))
        os.replace(staging, path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("igpt finetune palette written")


def evaluate_model(
    model_dir: Path, spec: str, *, batch_size: int, mesh_shape=(-1, 1, 1)
) -> dict[str, float]:
    """Metrics (accuracy, clf_loss, loss, ...) of an igpt model dir with a classifier on a
    labelled split, sharded over a mesh like training."""
    mesh = make_mesh(mesh_shape)
    model_config = ModelConfig.load(Path(model_dir) / CONFIG_FILE)
    shardings = tree_shardings(param_shapes(model_config), mesh)
    _, params, clusters = load_model(model_dir, shardings=shardings)
    batches = data_lib.eval_dataset(
        data_lib.open_source(spec),
        ColorTokenizer(clusters),
        global_batch_size=batch_size,
        image_size=model_config.image_side,
    )
    return evaluate(make_eval_step(model_config, mesh), params, batches, mesh)


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tune (or resume fine-tuning) `config.init_from` in `workdir` as configs/finetune.py
    describes; returns the best model's step, validation and test results (also written to
    `workdir/results.json`, with a plot of validation accuracy by step)."""
    if not config.init_from:
        raise ValueError("fine-tuning needs a pretrained model: set --config.init_from=DIR")
    if not config.data.eval:
        raise ValueError("early stopping needs a validation split: set --config.data.eval")
    workdir = Path(workdir).absolute()
    model_config = build_model_config(config)
    if model_config.num_labels < 1:
        raise ValueError("set --config.model.num_labels to the number of classes")
    _write_checkpoint_palette(config, workdir)
    ft = config.finetune
    weights = LossWeights(ft.generative_weight, ft.classification_weight)
    stopper = EarlyStopping(workdir, ft.patience, model_config)
    if stopper.stopped:
        print(f"early stopping already reached in {workdir}; not training further", flush=True)
    else:
        train(config, workdir, weights=weights, on_eval=stopper)
    best = stopper.best
    if best is None:
        raise ValueError("no validation pass ran: num_steps must be at least 1")
    results = {
        "best_step": best["step"],
        "val_accuracy": best["accuracy"],
        "stopped_early": stopper.stopped,
        "best_model": str(workdir / BEST_DIR),
    }
    if config.data.test:
        metrics = evaluate_model(
            workdir / BEST_DIR,
            config.data.test,
            batch_size=config.batch_size,
            mesh_shape=config.mesh_shape,
        )
        results |= {"test_accuracy": metrics["accuracy"], "test_clf_loss": metrics["clf_loss"]}
        print(
            f"best model (step {best['step']}, val accuracy {100 * best['accuracy']:.2f}): "
            f"test accuracy {100 * metrics['accuracy']:.2f}",
            flush=True,
        )
    if jax.process_index() == 0:
        _write_json(workdir / RESULTS_FILE, results)
        line_chart(
            workdir / PLOT_FILE,
            [h["step"] for h in stopper.history],
            {"validation accuracy": [100 * h["accuracy"] for h in stopper.history]},
            title=f"Fine-tuning {config.init_from}",
            xlabel="step",
            ylabel="accuracy (%)",
            highlight_x=best["step"],
        )
    return results
