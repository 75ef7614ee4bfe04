"""Fine-tuning: a pretrained iGPT plus its classifier head, trained as the paper does.

The head (`score`: a linear layer without bias on the mean over positions of the final norm
output) starts at zero. The loss is `generative * L_gen + classification * L_clf` (the paper's
joint L_gen + L_clf by default; generative weight 0 is L_clf alone), with Adam at a constant
learning rate. The architecture is the `init_from` model's; `config.model` only changes the
classifier size, dtypes, dropout and remat. Training is the loop of `igpt.train.loop` (same
sharding, checkpoints, exact resume, metrics) with an evaluation hook whose listener,
`EarlyStopping`, stops on validation accuracy and keeps the best parameters as an igpt model
dir `workdir/best`; the best model's test accuracy is reported at the end.

BERT models (objective "bert") are fine-tuned on masked inputs with the masked-pixel loss as
L_gen, as they were pretrained (OpenAI's model.py masks in every pass). Validation passes use
one evaluation mask per image; the test figure is the paper's ensemble, class probabilities
averaged over `finetune.ensemble_masks` random masks, reported beside mask 0 alone.

Early stopping survives restarts: each validation result is appended to
`workdir/validation.json`, and a resumed run first forgets the results of steps after its
checkpoint (it will compute them again, identically, since resume is exact).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections

from igpt import data as data_lib
from igpt import files
from igpt.config import ModelConfig
from igpt.figures import line_chart
from igpt.loading import LoadedModel, is_workdir, load_model, read_model_config, save_model
from igpt.lock import DirectoryLock
from igpt.sharding import make_mesh
from igpt.tokenizer import ColorTokenizer
from igpt.train import checkpoints
from igpt.train.hooks import Evaluation, evaluate
from igpt.train.loop import setup, train
from igpt.train.step import LossWeights, make_eval_step

BEST_DIR = "best"
HISTORY_FILE = "validation.json"
RESULTS_FILE = "results.json"
SWEEP_FILE = "sweep.json"
PLOT_FILE = "finetune_accuracy.png"


class EarlyStopping:
    """The evaluation listener of a fine-tuning run: records validation accuracy, saves a new
    best model to `workdir/best` and says stop after `patience` evaluations without
    improvement (patience 0: never stop early).
    """

    def __init__(self, run, patience: int):
        self.run, self.workdir, self.patience = run, run.workdir, patience
        resumed_at = checkpoints.latest_step(self.workdir) if is_workdir(self.workdir) else None
        history = []
        if resumed_at is not None and (self.workdir / HISTORY_FILE).exists():
            history = json.loads((self.workdir / HISTORY_FILE).read_text())
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
            files.write_json(self.workdir / HISTORY_FILE, self.history)
        return self.stopped

    def _save_best(self, params) -> None:
        params = jax.device_get(_gathered(params))
        if jax.process_index() == 0:
            run = self.run
            save_model(
                self.workdir / BEST_DIR,
                run.model_config,
                params,
                run.tokenizer.palette,
                overwrite=True,
            )


def _gathered(params):
    """Parameters whole on every process (each holds only its shards of a multi-host mesh)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return params


def evaluate_model(
    model: LoadedModel,
    spec: str,
    *,
    batch_size: int,
    mesh,
    center_crop: bool = False,
    ensemble_masks: int = 1,
) -> dict[str, float]:
    """Metrics (accuracy, clf_loss, loss, ...) of a loaded classifier on a labelled split; a
    BERT model's are ensembled over `ensemble_masks` masks (`make_eval_step`)."""
    batches = data_lib.eval_dataset(
        data_lib.open_source(spec),
        ColorTokenizer(model.palette),
        global_batch_size=batch_size,
        image_size=model.config.image_side,
        center_crop=center_crop,
    )
    eval_step = make_eval_step(model.config, mesh, ensemble_masks)
    return evaluate(eval_step, model.params, batches, mesh)


def _base_model(config: ml_collections.ConfigDict, workdir: Path) -> ModelConfig:
    """The architecture being fine-tuned: the workdir's own on resume, else `init_from`'s."""
    step = checkpoints.latest_step(workdir) if is_workdir(workdir) else None
    if step is not None:
        return checkpoints.read_model_config(workdir, step)
    return read_model_config(config.init_from)


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tune `config.init_from` as the paper does: one run per learning rate of
    `finetune.learning_rates` (each in `workdir/lr_<rate>/`, resumable), the rate and step
    chosen on validation accuracy, then (with `finetune.refit_on`, the train and validation
    images together) a refit at that rate for that many steps whose test accuracy is
    reported. Without `learning_rates`, one run at `optimizer.learning_rate` in `workdir`
    itself. Writes and returns the summary (`workdir/sweep.json` for a sweep)."""
    rates = tuple(config.finetune.learning_rates)
    if not rates:
        return finetune_run(config, workdir)
    workdir = Path(workdir).absolute()
    with DirectoryLock(workdir, "fine-tuning sweep"):
        runs = {}
        for rate in rates:
            run_config = config.copy_and_resolve_references()
            run_config.optimizer.learning_rate = float(rate)
            run_config.data.test = ""  # chosen on validation; only the final model is tested
            runs[f"{rate:g}"] = finetune_run(run_config, workdir / f"lr_{rate:g}")
        best_rate = max(runs, key=lambda rate: runs[rate]["val_accuracy"])  # first on ties
        best = runs[best_rate]
        summary = {"runs": runs, "learning_rate": float(best_rate), "best_step": best["best_step"],
                   "val_accuracy": best["val_accuracy"]}  # fmt: skip
        print(
            f"best learning rate {best_rate} (val accuracy {100 * best['val_accuracy']:.2f} "
            f"at step {best['best_step']})",
            flush=True,
        )
        if config.data.test:
            if config.finetune.refit_on:
                refit_config = config.copy_and_resolve_references()
                refit_config.optimizer.learning_rate = float(best_rate)
                refit_config.num_steps = best["best_step"]
                refit_config.data.train = config.finetune.refit_on
                refit_config.data.val = ""
                model_dir = _refit(refit_config, workdir / "refit")
                summary["refit_on"] = config.finetune.refit_on
            else:
                model_dir = Path(best["best_model"])
            model = load_model(model_dir, mesh=make_mesh(config.mesh_shape))
            metrics = evaluate_model(
                model,
                config.data.test,
                batch_size=config.batch_size,
                mesh=make_mesh(config.mesh_shape),
                center_crop=config.data.center_crop,
                ensemble_masks=config.finetune.ensemble_masks,
            )
            summary |= _test_results(metrics) | {"tested_model": str(model_dir)}
            print(f"test accuracy {100 * metrics['accuracy']:.2f} ({model_dir})", flush=True)
        if jax.process_index() == 0:
            files.write_json(workdir / SWEEP_FILE, summary)
    return summary


def _test_results(metrics: dict) -> dict:
    """What a fine-tuning summary reports of a test pass."""
    results = {"test_accuracy": metrics["accuracy"], "test_clf_loss": metrics["clf_loss"]}
    if "accuracy_one_mask" in metrics:  # bert: the ensemble above, one mask here
        results["test_accuracy_one_mask"] = metrics["accuracy_one_mask"]
    return results


def _refit(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Train on train + val at the chosen rate for the chosen number of steps (no validation
    left to stop on); the final parameters become `workdir/best`."""
    with setup(config, workdir, base_model=_base_model(config, workdir)) as run:
        ft = config.finetune
        state = train(run, weights=LossWeights(ft.generative_weight, ft.classification_weight))
        params = jax.device_get(_gathered(state.params))
        if jax.process_index() == 0:
            save_model(
                workdir / BEST_DIR, run.model_config, params, run.tokenizer.palette, overwrite=True
            )
    return workdir / BEST_DIR


def finetune_run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """One fine-tuning run (or its resumption) at `optimizer.learning_rate` in `workdir`;
    returns the best model's step, validation and test results (also written to
    `workdir/results.json`, with a plot of validation accuracy by step)."""
    if not config.init_from:
        raise ValueError("fine-tuning needs a pretrained model: set --config.init_from=DIR")
    if not config.data.val:
        raise ValueError("early stopping needs a validation split: set --config.data.val")
    if config.model.num_labels < 1:
        raise ValueError("set --config.model.num_labels to the number of classes")
    workdir = Path(workdir).absolute()
    with setup(config, workdir, base_model=_base_model(config, workdir)) as run:
        ft = config.finetune
        stopper = EarlyStopping(run, ft.patience)
        if stopper.stopped:
            print(f"early stopping already reached in {workdir}; not training further")
        else:
            eval_step = make_eval_step(run.model_config, run.mesh)
            evaluation = Evaluation(run, eval_step, config.eval_every, [stopper])
            weights = LossWeights(ft.generative_weight, ft.classification_weight)
            state = train(run, weights=weights, hooks=[evaluation])
            if evaluation.latest_step != int(state.step) and not stopper.stopped:
                evaluation.run(int(state.step), state)  # owed by a run killed before it
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
            model = load_model(workdir / BEST_DIR, mesh=run.mesh, rules=run.rules)
            metrics = evaluate_model(
                model,
                config.data.test,
                batch_size=config.batch_size,
                mesh=run.mesh,
                center_crop=config.data.center_crop,
                ensemble_masks=ft.ensemble_masks,
            )
            results |= _test_results(metrics)
            print(
                f"best model (step {best['step']}, val accuracy {100 * best['accuracy']:.2f}): "
                f"test accuracy {100 * metrics['accuracy']:.2f}",
                flush=True,
            )
        if jax.process_index() == 0:
            files.write_json(workdir / RESULTS_FILE, results)
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
