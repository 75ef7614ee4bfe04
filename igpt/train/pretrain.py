"""Pretraining (either objective), with validation passes and pictures.

`pretrain(config, workdir)` is the whole task: the loop of `igpt.train.loop` with an
evaluation hook (validation loss against the unigram and uniform baselines, then the pictures
of `igpt.train.hooks.Pictures`), writing `final_metrics.json` at the end. A run restarted after
it reached `num_steps` but before that file was written (killed during the final evaluation)
evaluates again and writes it.
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
    with setup(config, workdir) as run:
        if run.val_source is None:
            train(run)
            metrics = {}
        else:
            eval_step = make_eval_step(run.model_config, run.mesh)
            evaluation = Evaluation(run, eval_step, config.eval_every, [Pictures(run)])
            state = train(run, hooks=[evaluation])
            step = int(state.step)
            if evaluation.latest_step != step:  # owed by a run that stopped before it
                evaluation.run(step, state)
            metrics = evaluation.latest
        if jax.process_index() == 0:
            files.write_json(run.workdir / FINAL_METRICS, metrics)
    return metrics
