"""The training loop: data -> sharded train step -> metrics, checkpoints and pictures.

`train(config, workdir)` runs pretraining (and, with classifier loss weights, fine-tuning). A
run restarted on the same workdir resumes from its latest checkpoint exactly: the same
parameters, optimizer state, rng and data position as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from igpt import data as data_lib
from igpt import images, sampling
from igpt.checkpoint import load_pretrained
from igpt.checkpointing import PALETTE_FILE, Checkpointer
from igpt.config import ModelConfig
from igpt.kmeans import fit_clusters, sample_pixels
from igpt.metrics import MetricsWriter, Progress, format_duration
from igpt.run_config import build_model_config
from igpt.sharding import global_batch, make_mesh
from igpt.tokenizer import ColorTokenizer
from igpt.trainer import (
    PRETRAINING,
    LossWeights,
    TrainState,
    abstract_train_state,
    create_train_state,
    learning_rate_schedule,
    make_eval_step,
    make_optimizer,
    make_train_step,
    state_shardings,
    summarize_eval,
)

# Fields that must agree between a config and an `init_from` checkpoint (the others, such as
# dtype, dropout or remat, may change between runs).
_ARCHITECTURE_FIELDS = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "use_bias",
    "layer_norm_epsilon", "scale_attn_by_inverse_layer_idx",
)  # fmt: skip


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient."""


def resolve_palette(config: ml_collections.ConfigDict, workdir: Path, num_clusters: int):
    """The run's colour palette: reused from the workdir on resume, else fitted or loaded.

    Written to `workdir/palette.npy` so every later stage (resume, sampling, probing) uses
    exactly the clusters the model was trained on.
    """
    path = workdir / PALETTE_FILE
    if path.exists():
        clusters = ColorTokenizer.from_npy(path).clusters
    elif config.data.palette == "fit":
        source = data_lib.open_source(config.data.train, skip_corrupt=config.data.skip_corrupt)
        pixels = sample_pixels(
            source, config.data.palette_pixels, size=config.data.image_size, seed=config.seed
        )
        clusters, inertia = fit_clusters(pixels, num_clusters, seed=config.seed)
        print(f"fitted a {num_clusters}-colour palette (inertia {inertia:.4g})", flush=True)
    elif Path(config.data.palette).is_dir():
        clusters = ColorTokenizer.from_pretrained(config.data.palette).clusters
    else:
        clusters = ColorTokenizer.from_npy(config.data.palette).clusters
    clusters = np.asarray(clusters, np.float32)
    if clusters.shape[0] != num_clusters:
        raise ValueError(
            f"The palette has {clusters.shape[0]} colours but model.vocab_size="
            f"{num_clusters + 1} needs {num_clusters}; set --config.model.vocab_size="
            f"{clusters.shape[0] + 1} or use another palette"
        )
    if jax.process_index() == 0 and not path.exists():
        staging = path.with_suffix(".tmp.npy")
        np.save(staging, clusters)
        os.replace(staging, path)  # other processes never see a half-written palette
    return clusters


def load_init_params(path: str, model_config: ModelConfig, shardings) -> dict:
    """Parameters of an `init_from` checkpoint, checked against the run's model and placed
    with the run's shardings. A classifier head the checkpoint lacks starts at zero; one the
    run does not use is dropped."""
    found, params, _ = load_pretrained(path)
    # n_inner=None (transformers' configs) means 4 * n_embd; run configs store the width.
    found = found.replace(n_inner=found.mlp_dim)
    wanted = model_config.replace(n_inner=model_config.mlp_dim)
    diffs = [
        f"{f}: checkpoint {getattr(found, f)!r}, config {getattr(wanted, f)!r}"
        for f in _ARCHITECTURE_FIELDS
        if getattr(found, f) != getattr(wanted, f)
    ]
    if diffs:
        raise ValueError(
            f"init_from={path} does not match config.model ({'; '.join(diffs)}); set those "
            "--config.model.* fields to the checkpoint's values"
        )
    params = dict(params)
    score = params.pop("score", None)
    if model_config.num_labels:
        shape = (model_config.n_embd, model_config.num_labels)
        if score is None or tuple(score["kernel"].shape) != shape:
            score = {"kernel": np.zeros(shape, model_config.storage_dtype)}
        params["score"] = score
    # Through the host: the loaded arrays sit on one local device, the mesh may span processes.
    return jax.device_put(jax.device_get(params), shardings.params)


class _Preemption:
    """Turns SIGTERM into a flag the loop polls, so it can save before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def poll(self, step: int, every: int) -> bool:
        """True if any process received the signal. With several processes they agree (a
        collective) every `every` steps, so all of them stop at the same step."""
        if jax.process_count() == 1:
            return self.requested
        if step % every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags))

    def restore(self):
        """Put back the handler that was installed before."""
        signal.signal(signal.SIGTERM, self._previous)


def _check_finite(step: int, values: dict, checkpointer: Checkpointer) -> None:
    if all(math.isfinite(values[k]) for k in ("loss", "grad_norm")):
        return
    checkpointer.wait()
    raise NonFiniteLossError(
        f"Non-finite loss or gradient at step {step} (loss={values['loss']}, "
        f"grad_norm={values['grad_norm']}). The last good checkpoint (step "
        f"{checkpointer.latest_step()}) is intact. Lower optimizer.learning_rate, keep "
        "optimizer.grad_clip on, or train in float32."
    )


def evaluate(eval_step, params, batches, mesh) -> dict:
    """Metrics over a whole split: every example once, padding masked out."""
    total = None
    for local in batches:
        sums = eval_step(params, global_batch(local, mesh))
        total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
    return summarize_eval(jax.device_get(total))


def write_pictures(
    workdir: Path, step: int, params, model_config: ModelConfig, config, tokenizer, eval_source
) -> None:
    """Sample grid and half-image completions of the first validation images, as PNGs under
    `workdir/samples` (process 0 writes; every process samples so collectives stay in step)."""
    if jax.process_count() > 1:  # the sampler runs on each process's local devices
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    side = model_config.image_side
    scale = images.auto_scale(side)
    top_k = config.sample.top_k or None
    sample_rng, complete_rng = jax.random.split(
        jax.random.fold_in(jax.random.key(config.seed), step)
    )
    ids = sampling.sample(
        model_config, params, sample_rng, num_samples=config.sample.num_samples,
        temperature=config.sample.temperature, top_k=top_k,
    )  # fmt: skip
    pictures = {"samples": images.sample_sheet(tokenizer.decode(np.asarray(ids), side), scale)}
    if eval_source is not None and len(eval_source):
        count = min(4, len(eval_source))
        originals = tokenizer.decode(
            tokenizer.encode([eval_source[i]["image"] for i in range(count)], side), side
        )
        completions = sampling.complete(
            model_config, params, complete_rng, tokenizer.encode(originals, side),
            rows_kept=0.5, num_completions=config.sample.num_completions,
            temperature=config.sample.temperature, top_k=top_k,
        )  # fmt: skip
        decoded = tokenizer.decode(np.asarray(completions).reshape(-1, side * side), side)
        rows_kept = sampling.rows_to_prompt_len(model_config, 0.5) // side
        pictures["completions"] = images.completion_sheet(
            originals, decoded.reshape(count, -1, side, side, 3), rows_kept, scale
        )
    if jax.process_index() == 0:
        for name, picture in pictures.items():
            images.save_png(workdir / "samples" / f"{name}_{step:07d}.png", picture)


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    weights: LossWeights = PRETRAINING,
    on_eval=None,
) -> dict:
    """Train (or resume) the run in `workdir`; returns the last validation metrics.

    `on_eval(step, state, eval_metrics)` is called after each validation pass (fine-tuning
    uses it for early stopping; returning True stops training).
    """
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    model_config = build_model_config(config)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    clusters = resolve_palette(config, workdir, model_config.num_clusters)
    tokenizer = ColorTokenizer(clusters)
    train_source = data_lib.open_source(config.data.train, skip_corrupt=config.data.skip_corrupt)
    if config.batch_size % (jax.process_count() * config.grad_accum_steps):
        raise ValueError(
            f"batch_size={config.batch_size} must divide evenly over {jax.process_count()} "
            f"processes x grad_accum_steps={config.grad_accum_steps}"
        )
    train_iter = data_lib.make_train_iterator(
        train_source,
        tokenizer,
        global_batch_size=config.batch_size,
        image_size=config.data.image_size,
        seed=config.seed,
        augment=config.data.augment,
        worker_count=config.data.worker_count,
    )
    eval_source = (
        data_lib.open_source(config.data.eval, skip_corrupt=config.data.skip_corrupt)
        if config.data.eval
        else None
    )

    mesh = make_mesh(config.mesh_shape)
    steps_per_epoch = max(len(train_source) // config.batch_size, 1)
    warmup_steps = int(round(config.optimizer.warmup_epochs * steps_per_epoch))
    schedule = learning_rate_schedule(config.optimizer, warmup_steps, config.num_steps)
    tx = make_optimizer(config.optimizer, schedule)

    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    latest = checkpointer.latest_step()
    if latest is not None:
        state, data_state = checkpointer.restore(
            latest, abstract_train_state(model_config, tx, mesh)
        )
        train_iter.set_state(data_state)
        print(f"resumed from step {latest} in {workdir}", flush=True)
    else:
        state = create_train_state(model_config, tx, mesh, config.seed)
        if config.init_from:
            shardings = state_shardings(model_config, tx, mesh)
            state = state.replace(
                params=load_init_params(config.init_from, model_config, shardings)
            )
            print(f"initialised parameters from {config.init_from}", flush=True)

    train_step = make_train_step(
        model_config,
        tx,
        schedule,
        mesh,
        grad_accum_steps=config.grad_accum_steps,
        weights=weights,
    )
    eval_step = make_eval_step(model_config, mesh)
    writer = MetricsWriter(workdir)
    step = int(state.step)
    progress = Progress(step, config.num_steps, config.batch_size * model_config.n_positions)
    preemption = _Preemption()
    eval_metrics: dict = {}
    start_time = time.perf_counter()

    def run_eval(state: TrainState) -> bool:
        nonlocal eval_metrics
        if eval_source is None:
            return False
        batches = data_lib.eval_dataset(
            eval_source,
            tokenizer,
            global_batch_size=config.batch_size,
            image_size=config.data.image_size,
        )
        eval_metrics = evaluate(eval_step, state.params, batches, mesh)
        writer.write(int(state.step), "eval", eval_metrics)
        if config.sample.num_samples:
            write_pictures(
                workdir, int(state.step), state.params, model_config, config, tokenizer, eval_source
            )
        shown = ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
        print(f"eval at step {int(state.step)}: {shown}", flush=True)
        return bool(on_eval and on_eval(int(state.step), state, eval_metrics))

    pending = None  # (step, metrics) of the last step, read after the next one is dispatched
    try:
        while step < config.num_steps:
            batch = global_batch(next(train_iter), mesh)
            state, metrics = train_step(state, batch)
            step += 1
            if pending is not None:
                _report(pending, config, writer, progress, checkpointer)
            pending = (step, metrics)
            preempted = preemption.poll(step, config.log_every)
            if step % config.checkpoint_every == 0 or step == config.num_steps or preempted:
                _report(pending, config, writer, progress, checkpointer, force=preempted)
                pending = None
                checkpointer.save(state, train_iter.get_state(), model_config)
            if preempted:
                print(f"SIGTERM: saved step {step} and stopping", flush=True)
                break
            due = config.eval_every and step % config.eval_every == 0
            if (due or step == config.num_steps) and run_eval(state):
                break
        if pending is not None:
            _report(pending, config, writer, progress, checkpointer, force=True)
        if checkpointer.latest_step() != step:  # e.g. num_steps=0 after init_from
            checkpointer.save(state, train_iter.get_state(), model_config)
    finally:
        checkpointer.close()
        writer.close()
        preemption.restore()
    elapsed = format_duration(time.perf_counter() - start_time)
    print(f"finished at step {step} in {elapsed}; workdir {workdir}", flush=True)
    if jax.process_index() == 0:
        (workdir / "final_metrics.json").write_text(json.dumps(eval_metrics, indent=2) + "\n")
    return eval_metrics


def _report(pending, config, writer, progress, checkpointer, force: bool = False) -> None:
    """Check a finished step's metrics and, every `log_every` steps, log them."""
    step, metrics = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    _check_finite(step, values, checkpointer)
    if step % config.log_every and not force:
        return
    line, tokens_per_s = progress.line(
        step, {"loss": values["loss"], "lr": values["learning_rate"]}
    )
    print(line, flush=True)
    writer.write(step, "train", values | {"tokens_per_s": tokens_per_s})
