"""Pretraining: the next-pixel objective, with validation passes and sample pictures.

`pretrain(config, workdir)` is the whole task: the loop of `igpt.train.loop` with an
evaluation hook (validation loss against the unigram and uniform baselines, then a sample grid
and half-image completions), writing `final_metrics.json` at the end.
"""

from __future__ import annotations

import jax
import ml_collections

from igpt import files
from igpt.train.hooks import Evaluation, Pictures
from igpt.train.loop import setup, train
from igpt.train.step import make_eval_step

FINAL_METRICS = "final_metrics.json"


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrain (or resume) the run in `workdir`; returns the last validation metrics."""
    run = setup(config, workdir)
    hooks = []
    if run.val_source is not None:
        evaluation = Evaluation(
            run, make_eval_step(run.model_config, run.mesh), config.eval_every, [Pictures(run)]
        )
        hooks.append(evaluation)
    train(run, hooks=hooks)
    metrics = evaluation.latest if hooks else {}
    if jax.process_index() == 0:
        files.write_json(run.workdir / FINAL_METRICS, metrics)
    return metrics
