"""The pure pieces of training: state, optimizer, and the jitted, sharded train/eval steps.

Shared by pretraining and fine-tuning; they differ only in the loss weights they pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from igpt.config import ModelConfig
from igpt.losses import classifier_inputs, model_inputs, token_nll
from igpt.model import ImageGPT
from igpt.sharding import Rules, abstract, tree_shardings


@struct.dataclass
class TrainState:
    """Everything a step changes. `rng` is raw uint32 key data so checkpoints can hold it."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


@struct.dataclass
class LossWeights:
    """Weights of the generative (next pixel) and classification losses in the total."""

    generative: float = 1.0
    classification: float = 0.0


PRETRAINING = LossWeights()  # the next-pixel loss alone


def learning_rate_schedule(opt: ml_collections.ConfigDict, warmup_steps: int, num_steps: int):
    """Linear warmup to the peak, then cosine decay to 0 at `num_steps`, or constant."""
    peak = opt.learning_rate
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup_steps, max(num_steps, warmup_steps + 1), end_value=0.0
        )
    if opt.schedule == "constant":
        warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
        return optax.join_schedules([warmup, optax.constant_schedule(peak)], [warmup_steps])
    raise ValueError(f"optimizer.schedule={opt.schedule!r}: choose 'cosine' or 'constant'")


def make_optimizer(opt: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
    """Adam (decoupled weight decay when set) after global-norm clipping."""
    parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
    parts.append(
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    )
    return optax.chain(*parts)


def _boxed_state(model_config: ModelConfig, tx, rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = ImageGPT(model_config).init(init_rng, ids)["params"]
    # Optimizer state built from the boxed params keeps the logical axis names, so it is
    # sharded like the parameters it mirrors.
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(state_rng),
    )


def state_shardings(model_config: ModelConfig, tx, mesh: Mesh, rules: Rules | None = None):
    """NamedShardings of the TrainState, derived from the model's logical axis names."""
    boxed = jax.eval_shape(functools.partial(_boxed_state, model_config, tx), jax.random.key(0))
    return tree_shardings(boxed, mesh, rules)


def create_train_state(
    model_config: ModelConfig, tx, mesh: Mesh, seed: int, rules: Rules | None = None
) -> TrainState:
    """A fresh TrainState initialised directly into its shardings (never whole on one device)."""
    shardings = state_shardings(model_config, tx, mesh, rules)
    init = jax.jit(
        lambda rng: nn.meta.unbox(_boxed_state(model_config, tx, rng)), out_shardings=shardings
    )
    return init(jax.random.key(seed))


def abstract_train_state(
    model_config: ModelConfig, tx, mesh: Mesh, rules: Rules | None = None
) -> TrainState:
    """Shapes, dtypes and shardings of the TrainState (a restore target)."""
    shardings = state_shardings(model_config, tx, mesh, rules)
    shapes = nn.meta.unbox(
        jax.eval_shape(functools.partial(_boxed_state, model_config, tx), jax.random.key(0))
    )
    return abstract(shapes, shardings)


def _losses(params, batch, rng, model: ImageGPT, deterministic: bool):
    """Sums over the batch (masked examples excluded) and their denominators.

    Without a classifier the model reads SOS + tokens[:-1] and predicts every token. With one,
    it reads the tokens themselves, as transformers' ImageGPTForImageClassification reads the
    processor's input_ids, so an exported classifier predicts the same classes from
    `processor(images)`; the classifier pools over those positions and the generative loss
    predicts tokens 1..T-1 from them (the first pixel has no SOS to be predicted from).
    """
    cfg = model.config
    tokens = batch["tokens"]
    mask = batch["mask"].astype(jnp.float32)
    inputs = classifier_inputs(tokens) if cfg.num_labels else model_inputs(tokens, cfg.sos_id)
    out = model.apply(
        {"params": params}, inputs, deterministic=deterministic, rngs={"dropout": rng}
    )
    logits, targets = out.logits, tokens
    if cfg.num_labels:
        logits, targets = logits[:, :-1], tokens[:, 1:]
    nll_sum = jnp.sum(token_nll(logits, targets) * mask[:, None])
    sums = {"nll": nll_sum, "tokens": jnp.sum(mask) * targets.shape[1], "examples": jnp.sum(mask)}
    if cfg.num_labels:
        clf_nll = token_nll(out.class_logits, batch["label"])
        correct = jnp.argmax(out.class_logits, -1) == batch["label"]
        sums |= {
            "clf_nll": jnp.sum(clf_nll * mask),
            "correct": jnp.sum(correct * mask),
        }
    return sums


def _objective(sums: dict, weights: LossWeights) -> jax.Array:
    loss = weights.generative * sums["nll"] / jnp.maximum(sums["tokens"], 1)
    if "clf_nll" in sums:
        loss += weights.classification * sums["clf_nll"] / jnp.maximum(sums["examples"], 1)
    return loss


def make_train_step(
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    schedule,
    mesh: Mesh,
    *,
    grad_accum_steps: int = 1,
    weights: LossWeights = PRETRAINING,
    rules: Rules | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)`, jitted with the state donated.

    `batch` holds global arrays: tokens (B, T) without SOS, label (B,), mask (B,). With
    `grad_accum_steps` = A, the batch is processed as A micro-batches whose gradients are
    averaged, each taking every A-th example so all devices work on every micro-batch.
    """
    model = ImageGPT(model_config)
    shardings = state_shardings(model_config, tx, mesh, rules)
    deterministic = not (
        model_config.attn_pdrop or model_config.resid_pdrop or model_config.embd_pdrop
    )

    def micro_sums(params, batch, rng):
        sums = _losses(params, batch, rng, model, deterministic)
        return _objective(sums, weights), sums

    grad_fn = jax.value_and_grad(micro_sums, has_aux=True)

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if grad_accum_steps == 1:
            (_, sums), grads = grad_fn(state.params, batch, rng)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(
                    x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]
                ).swapaxes(0, 1),
                batch,
            )

            def accumulate(carry, xs):
                i, one = xs
                (_, sums), grads = grad_fn(state.params, one, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (sums, grads)), None

            first = jax.tree.map(lambda x: x[0], micro)
            (_, sums_shape), grads_shape = jax.eval_shape(grad_fn, state.params, first, rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (sums_shape, grads_shape))
            (sums, grads), _ = jax.lax.scan(
                accumulate, zeros, (jnp.arange(grad_accum_steps), micro)
            )
            grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = _metrics(sums) | {
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
            # 1 if every parameter and optimizer moment after this update is finite: a finite
            # loss does not guarantee it (an update can overflow), and checkpoints of this
            # state are only written when it holds.
            "state_finite": _all_finite((params, opt_state)).astype(jnp.float32),
        }
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, donate_argnums=(0,), out_shardings=(shardings, replicated))


def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _metrics(sums: dict) -> dict:
    nats = sums["nll"] / jnp.maximum(sums["tokens"], 1)
    out = {"loss": nats, "bits_per_token": nats / jnp.log(2.0)}
    if "clf_nll" in sums:
        out["clf_loss"] = sums["clf_nll"] / jnp.maximum(sums["examples"], 1)
        out["accuracy"] = sums["correct"] / jnp.maximum(sums["examples"], 1)
    return out


def make_eval_step(model_config: ModelConfig, mesh: Mesh) -> Callable[[dict, dict], dict]:
    """`eval_step(params, batch) -> sums` of nll, tokens, examples, colour counts (and
    classifier counts) over the unmasked examples, to be added up over a whole split."""
    model = ImageGPT(model_config)
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(params, batch):
        sums = _losses(params, batch, jax.random.key(0), model, True)
        weight = jnp.broadcast_to(batch["mask"][:, None], batch["tokens"].shape)
        counts = jnp.zeros(model_config.palette_size).at[batch["tokens"]].add(weight)
        return sums | {"colour_counts": counts}

    return jax.jit(step, out_shardings=replicated)


def summarize_eval(total: dict) -> dict:
    """Metrics from summed eval counts: nats and bits per token, classifier loss/accuracy, and
    two baselines in nats per token: `uniform` (log K) and `unigram`, the entropy of the split's
    own colour frequencies (no model that ignores context can do better)."""
    metrics = {k: float(v) for k, v in _metrics(total).items()}
    counts = np.asarray(total["colour_counts"], np.float64)
    freq = counts[counts > 0] / counts.sum()
    metrics["unigram_baseline"] = float(-np.sum(freq * np.log(freq)))
    metrics["uniform_baseline"] = float(np.log(len(counts)))
    return metrics
