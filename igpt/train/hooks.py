"""Periodic hooks of the training loop, in the manner of clu's periodic actions.

The loop calls every hook after each step with `(step, state, last)`; a hook acts every
`every` steps and at the last step, and returns True to stop training (early stopping).
`Evaluation` runs a validation pass and hands its metrics to listeners: `Pictures` (sample
grids and completions) for pretraining, early stopping for fine-tuning.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from igpt import data as data_lib
from igpt import figures, sampling
from igpt.losses import eval_masks
from igpt.model import ImageGPT
from igpt.sharding import global_batch
from igpt.train.step import summarize_eval

# A listener of validation results: (step, state, metrics) -> stop?
Listener = Callable[[int, object, dict], bool]


class Periodic(abc.ABC):
    """Calls `self.run(step, state)` every `every` steps and at the last step (every=0: only
    at the last)."""

    def __init__(self, every: int):
        self.every = every

    def __call__(self, step: int, state, last: bool) -> bool:
        if last or (self.every and step % self.every == 0):
            return bool(self.run(step, state))
        return False

    @abc.abstractmethod
    def run(self, step: int, state) -> bool:
        """The hook's action; True stops training."""


def evaluate(eval_step, params, batches, mesh) -> dict:
    """Metrics over a whole split: every example once, padding masked out."""
    total = None
    for local in batches:
        sums = eval_step(params, global_batch(local, mesh))
        total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
    return summarize_eval(jax.device_get(total))


class Evaluation(Periodic):
    """A validation pass over the whole split; its metrics go to the log, to `self.latest`
    and to each listener (all are called; training stops if any says so)."""

    def __init__(self, run, eval_step, every: int, listeners: Sequence[Listener] = ()):
        super().__init__(every)
        self.run_, self.eval_step, self.listeners = run, eval_step, tuple(listeners)
        self.latest: dict = {}
        self.latest_step: int | None = None

    def run(self, step: int, state) -> bool:
        run = self.run_
        batches = data_lib.eval_dataset(
            run.val_source,
            run.tokenizer,
            global_batch_size=run.config.batch_size,
            image_size=run.model_config.image_side,
            center_crop=run.config.data.center_crop,
        )
        self.latest = evaluate(self.eval_step, state.params, batches, run.mesh)
        self.latest_step = step
        run.writer.write(step, "eval", self.latest)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in self.latest.items())
        print(f"eval at step {step}: {shown}", flush=True)
        stops = [listener(step, state, self.latest) for listener in self.listeners]
        return any(stops)


class Pictures:
    """At each evaluation, as PNGs under `workdir/samples` and images in TensorBoard (process
    0 writes; every process computes them so collectives stay in step): for an "ar" model a
    sample grid and half-image completions of the first validation images; for a "bert"
    model, which cannot sample, its fill-ins of the masked pixels of the first validation
    images (their evaluation masks)."""

    def __init__(self, run):
        self.run = run

    def __call__(self, step: int, state, metrics: dict) -> bool:
        run, sample = self.run, self.run.config.sample
        if not sample.num_samples:
            return False
        params, model_config = state.params, run.model_config
        if jax.process_count() > 1:  # pictures are computed on each process's local devices
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        if model_config.causal:
            pictures = self._samples(step, params)
        else:
            pictures = self._fill_ins(params)
        if jax.process_index() == 0:
            for name, picture in pictures.items():
                figures.save_png(Path(run.workdir) / "samples" / f"{name}_{step:07d}.png", picture)
                run.writer.image(step, name, picture)
        return False

    def _fill_ins(self, params) -> dict:
        run, model_config = self.run, self.run.model_config
        source, side = run.val_source, model_config.image_side
        count = min(8, len(source))  # a row of 8 images stays readable
        tokens = run.tokenizer.encode([source[i]["image"] for i in range(count)], side)
        masked = eval_masks(jnp.arange(count), side * side, model_config.mask_prob)
        logits = _bert_logits(model_config, params, jnp.asarray(tokens), masked)
        filled = np.where(masked, np.asarray(jnp.argmax(logits, -1)), tokens)
        shape = (count, side, side)
        sheet = figures.fill_in_sheet(
            run.tokenizer.decode(tokens, side),
            np.asarray(masked).reshape(shape),
            run.tokenizer.decode(filled, side),
            figures.auto_scale(side),
        )
        return {"fill_ins": sheet}

    def _samples(self, step: int, params) -> dict:
        run, sample = self.run, self.run.config.sample
        model_config, tokenizer = run.model_config, run.tokenizer
        side = model_config.image_side
        scale = figures.auto_scale(side)
        options = dict(temperature=sample.temperature, top_k=sample.top_k or None)
        sample_rng, complete_rng = jax.random.split(
            jax.random.fold_in(jax.random.key(run.config.seed), step)
        )
        ids = sampling.sample(
            model_config, params, sample_rng, num_samples=sample.num_samples, **options
        )
        pictures = {"samples": figures.sample_sheet(tokenizer.decode(ids, side), scale)}
        source = run.val_source
        if source is not None and len(source):
            count = min(4, len(source))
            originals = tokenizer.decode(
                tokenizer.encode([source[i]["image"] for i in range(count)], side), side
            )
            completions = sampling.complete(
                model_config, params, complete_rng, tokenizer.encode(originals, side),
                rows_kept=0.5, num_completions=sample.num_completions, **options,
            )  # fmt: skip
            decoded = tokenizer.decode(completions.reshape(-1, side * side), side)
            rows_kept = sampling.rows_to_prompt_len(model_config, 0.5) // side
            pictures["completions"] = figures.completion_sheet(
                originals, decoded.reshape(count, -1, side, side, 3), rows_kept, scale
            )
        return pictures


@functools.partial(jax.jit, static_argnums=0)
def _bert_logits(model_config, params, tokens_BxT, masked_BxT):
    return ImageGPT(model_config).apply({"params": params}, tokens_BxT, masked=masked_BxT).logits
