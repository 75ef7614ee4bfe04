"""The training loop: data -> sharded train step -> metrics, checkpoints and periodic hooks.

`setup(config, workdir)` builds a `Run` (model config, palette, data, mesh, optimizer,
checkpointer, metrics); `train(run, ...)` resumes or starts its state and steps it to
`num_steps`, calling the task's hooks (evaluation, pictures, early stopping) after each step.
A run restarted on the same workdir resumes from its latest checkpoint exactly: the same
parameters, optimizer state, rng and data position as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from igpt import data as data_lib
from igpt.cli import EXIT_PREEMPTED
from igpt.config import ModelConfig
from igpt.flops import peak_flops, train_step_flops
from igpt.loading import load_model
from igpt.lock import DirectoryLock
from igpt.sharding import global_batch, make_mesh, place
from igpt.tokenizer import ColorTokenizer
from igpt.train import checkpoints
from igpt.train.checkpoints import Checkpointer
from igpt.train.config import build_model_config, rules_from_config, validate
from igpt.train.metrics import MetricsWriter, Progress, format_duration
from igpt.train.step import (
    PRETRAINING,
    LossWeights,
    TrainState,
    abstract_train_state,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    state_shardings,
)
from igpt.train.workdir import check_restart, resolve_palette

# Fields that must agree between a config and an `init_from` checkpoint (the others, such as
# dtype, dropout or remat, may change between runs).
_ARCHITECTURE_FIELDS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "use_bias",
    "layer_norm_epsilon",
    "scale_attn_by_inverse_layer_idx",
)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient."""


class Preempted(Exception):
    """The run received SIGTERM, saved a checkpoint and stopped before `num_steps`."""

    exit_code = EXIT_PREEMPTED


@dataclasses.dataclass
class Run:
    """What a training run is made of, set up from its config before the first step.

    A context manager: it holds the workdir's lock, and leaving it waits for checkpoints in
    flight, closes the metric files and releases the lock, on every exit path.
    """

    config: ml_collections.ConfigDict
    workdir: Path
    model_config: ModelConfig
    tokenizer: ColorTokenizer
    mesh: Mesh
    rules: tuple
    train_source: object
    val_source: object | None
    steps_per_epoch: int
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    checkpointer: Checkpointer
    writer: MetricsWriter
    lock: DirectoryLock

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.checkpointer.close()
            self.writer.close()
        finally:
            self.lock.__exit__(*exc)


def _verify(source) -> None:
    """Read every example once, so a corrupt image stops the run now, not at the first
    evaluation hours in."""
    for i in range(len(source)):
        source[i]  # raises UnreadableImageError naming the file or record


def setup(
    config: ml_collections.ConfigDict, workdir: str, base_model: ModelConfig | None = None
) -> Run:
    """Check the config, lock the workdir and set up everything but the train state;
    `base_model` as in `build_model_config`. Every value is checked, the data opened and the
    validation split read before anything is written to the workdir."""
    validate(config)
    workdir = Path(workdir).absolute()
    model_config = build_model_config(config, base_model)
    mesh = make_mesh(config.mesh_shape)
    if config.batch_size % (jax.process_count() * config.grad_accum_steps):
        raise ValueError(
            f"batch_size={config.batch_size} must divide evenly over {jax.process_count()} "
            f"processes x grad_accum_steps={config.grad_accum_steps}"
        )
    skip = config.data.skip_corrupt
    train_source = data_lib.open_source(config.data.train, skip_corrupt=skip)
    val_source = None
    if config.data.val:
        val_source = data_lib.open_source(config.data.val, skip_corrupt=skip)
        _verify(val_source)
    steps_per_epoch = max(len(train_source) // config.batch_size, 1)
    warmup_steps = int(round(config.optimizer.warmup_epochs * steps_per_epoch))
    schedule = learning_rate_schedule(config.optimizer, warmup_steps, config.num_steps)
    tx = make_optimizer(config.optimizer, schedule)

    lock = DirectoryLock(workdir).__enter__()  # released by Run.__exit__
    try:
        check_restart(config, workdir, checkpoints.latest_step(workdir))
        palette = resolve_palette(config, workdir, model_config, train_source)
        checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
        writer = MetricsWriter(workdir)
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    return Run(
        config=config,
        workdir=workdir,
        model_config=model_config,
        tokenizer=ColorTokenizer(palette, size=model_config.image_side),
        mesh=mesh,
        rules=rules_from_config(config.sharding_rules),
        train_source=train_source,
        val_source=val_source,
        steps_per_epoch=steps_per_epoch,
        schedule=schedule,
        tx=tx,
        checkpointer=checkpointer,
        writer=writer,
        lock=lock,
    )


def load_init_params(run: Run) -> dict:
    """Parameters of the `init_from` model, checked against the run's model and placed with
    the run's shardings. A classifier head the checkpoint lacks starts at zero; one the run
    does not use is dropped."""
    path, model_config = run.config.init_from, run.model_config
    found = load_model(path)
    # n_inner=None (transformers' configs) means 4 * n_embd; run configs store the width.
    have = found.config.replace(n_inner=found.config.mlp_dim)
    want = model_config.replace(n_inner=model_config.mlp_dim)
    diffs = [
        f"{f}: checkpoint {getattr(have, f)!r}, config {getattr(want, f)!r}"
        for f in _ARCHITECTURE_FIELDS
        if getattr(have, f) != getattr(want, f)
    ]
    if diffs:
        raise ValueError(
            f"init_from={path} does not match config.model ({'; '.join(diffs)}); set those "
            "--config.model.* fields to the checkpoint's values"
        )
    params = dict(found.params)
    score = params.pop("score", None)
    if model_config.num_labels:
        shape = (model_config.n_embd, model_config.num_labels)
        if score is None or tuple(score["kernel"].shape) != shape:
            score = {"kernel": np.zeros(shape, model_config.storage_dtype)}
        params["score"] = score
    return place(params, state_shardings(model_config, run.tx, run.mesh, run.rules).params)


class _Preemption:
    """Whether the run has been asked to stop (SIGTERM), so it can save first.

    One process: a SIGTERM handler sets a flag. Several: JAX's preemption service (started by
    `jax.distributed.initialize`) receives the signal on any process, and orbax's
    `reached_preemption(step)` turns it into a step at which every process stops together.
    """

    def __init__(self):
        self.multihost = jax.process_count() > 1
        self.requested = False
        if not self.multihost:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def poll(self, step: int) -> bool:
        """True once the run should save and stop (the same step on every process)."""
        if self.multihost:
            return ocp.multihost.reached_preemption(step)
        return self.requested

    def restore(self):
        """Put back the handler that was installed before."""
        if not self.multihost:
            signal.signal(signal.SIGTERM, self._previous)


class _Reporter:
    """Reads each step's metrics one step late (after the next step is dispatched, so the
    host never waits for the device), stops on a non-finite loss and logs every
    `log_every` steps."""

    def __init__(self, run: Run, first_step: int):
        self.run = run
        tokens = run.config.batch_size * run.model_config.n_positions
        self.progress = Progress(first_step, run.config.num_steps, tokens)
        self.pending = None
        # Model FLOP utilisation, as nanoGPT and maxtext report it: the model's matmul FLOPs
        # per second over the devices' peak (igpt.flops).
        self.flops_per_token = train_step_flops(run.model_config, 1) / run.model_config.n_positions
        peak = peak_flops(jax.devices()[0], run.model_config.compute_dtype)
        self.peak = peak * jax.device_count()

    def push(self, step: int, metrics: dict) -> None:
        """Queue step `step`'s metrics, reporting the previously queued ones."""
        self.flush()
        self.pending = (step, metrics)

    def flush(self, force: bool = False) -> None:
        """Report the queued metrics now (`force`: log them even off the interval)."""
        if self.pending is None:
            return
        (step, metrics), self.pending = self.pending, None
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(values[k]) for k in ("loss", "grad_norm")):
            self._stop(
                step,
                f"the loss or gradient is not finite (loss={values['loss']}, "
                f"grad_norm={values['grad_norm']})",
            )
        if not values.pop("state_finite"):
            self._stop(step, "its update made parameters or optimizer state non-finite")
        if step % self.run.config.log_every and not force:
            return
        line, tokens_per_s = self.progress.line(
            step, {"loss": values["loss"], "lr": values["learning_rate"]}
        )
        mfu = tokens_per_s * self.flops_per_token / self.peak
        print(f"{line} | MFU {100 * mfu:.1f}%", flush=True)
        speed = {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / jax.device_count(),
            "mfu": mfu,
        }
        self.run.writer.write(step, "train", values | speed)

    def _stop(self, step: int, what: str):
        """Raise for a non-finite step, naming the newest (finite) checkpoint and advice that
        fits the cause. Checkpoints are written only after their step passed this check."""
        checkpointer, opt = self.run.checkpointer, self.run.config.optimizer
        checkpointer.wait()
        latest = checkpointer.latest_step()
        kept = (
            f"the newest checkpoint, step {latest}, is finite and a restart resumes from it"
            if latest is not None
            else "no checkpoint was written"
        )
        if opt.eps == 0:
            advice = (
                "optimizer.eps=0 divides by zero where a parameter has no gradient; use "
                "the default 1e-8"
            )
        elif opt.learning_rate >= 0.1:
            advice = f"optimizer.learning_rate={opt.learning_rate} is very large; lower it"
        else:
            advice = (
                "lower optimizer.learning_rate, keep optimizer.grad_clip on, or train "
                "with model.dtype=float32"
            )
        raise NonFiniteLossError(f"Step {step} is not finite: {what}; {kept}. Fix: {advice}.")


def initial_state(run: Run) -> TrainState:
    """A fresh state, with the parameters of `init_from` when it is set."""
    model_config, tx, mesh = run.model_config, run.tx, run.mesh
    state = create_train_state(model_config, tx, mesh, run.config.seed, run.rules)
    if run.config.init_from:
        state = state.replace(params=load_init_params(run))
        print(f"initialised parameters from {run.config.init_from}", flush=True)
    return state


def train(run: Run, *, weights: LossWeights = PRETRAINING, hooks: Sequence = ()) -> TrainState:
    """Train (or resume) `run` to `config.num_steps`, or until a hook asks to stop.

    After each step every hook is called with `(step, state, last)`. Checkpoints are written
    every `checkpoint_every` steps, at the end and on SIGTERM, which then raises `Preempted`.
    """
    config, model_config, mesh = run.config, run.model_config, run.mesh
    train_iter = data_lib.make_train_iterator(
        run.train_source,
        run.tokenizer,
        global_batch_size=config.batch_size,
        image_size=model_config.image_side,
        seed=config.seed,
        augment=config.data.augment,
        worker_count=config.data.worker_count,
    )
    checkpointer = run.checkpointer
    restored = None
    if checkpointer.latest_step() is not None:
        abstract = abstract_train_state(model_config, run.tx, mesh, run.rules)
        restored = checkpointer.restore_latest(abstract)
        if restored is None:
            raise ValueError(
                f"no checkpoint in {checkpointer.directory} can be read (they were moved "
                "aside as *.damaged); use another --workdir to start over"
            )
    if restored is not None:
        state, data_state = restored
        train_iter.set_state(data_state)
        print(f"resumed from step {int(state.step)} in {run.workdir}", flush=True)
    else:
        state = initial_state(run)

    train_step = make_train_step(
        model_config,
        run.tx,
        run.schedule,
        mesh,
        grad_accum_steps=config.grad_accum_steps,
        weights=weights,
        rules=run.rules,
    )
    step = int(state.step)
    reporter = _Reporter(run, step)
    preemption = _Preemption()
    start_time = time.perf_counter()
    preempted = False
    try:
        while step < config.num_steps:
            batch = global_batch(next(train_iter), mesh)
            state, metrics = train_step(state, batch)
            step += 1
            reporter.push(step, metrics)
            preempted = preemption.poll(step)
            last = step == config.num_steps
            if step % config.checkpoint_every == 0 or last or preempted:
                reporter.flush(force=preempted)
                checkpointer.save(state, train_iter.get_state(), model_config)
            if preempted:
                break
            if any([hook(step, state, last) for hook in hooks]):
                break
        reporter.flush(force=True)
        if checkpointer.latest_step() != step:  # stopped early, or num_steps=0 after init_from
            checkpointer.save(state, train_iter.get_state(), model_config)
    finally:
        preemption.restore()
    elapsed = format_duration(time.perf_counter() - start_time)
    if preempted:
        raise Preempted(
            f"SIGTERM: saved step {step} in {run.workdir} after {elapsed}; run the same "
            "command again to resume"
        )
    print(f"finished at step {step} in {elapsed}; workdir {run.workdir}", flush=True)
    return state
