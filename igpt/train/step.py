"""The pure pieces of training: state, optimizer, and the jitted, sharded train/eval steps.

Shared by pretraining and fine-tuning (they differ only in the loss weights they pass) and by
both objectives of `ModelConfig.objective` (they differ only in `_losses`).
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
from igpt.losses import (
    bert_masks,
    classifier_inputs,
    eval_masks,
    masked_example_nll,
    model_inputs,
    token_nll,
)
from igpt.model import ImageGPT
from igpt.sharding import Rules, abstract, tree_shardings, with_activation_sharding


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


def _losses(params, batch, rng, model: ImageGPT, deterministic: bool, masked=None):
    """Sums over the batch (padding examples, `batch["mask"]` False, excluded) and their
    denominators, and the class logits (None without a classifier).

    "ar": without a classifier the model reads SOS + tokens[:-1] and predicts every token.
    With one, it reads the tokens themselves, as transformers' ImageGPTForImageClassification
    reads the processor's input_ids, so an exported classifier predicts the same classes from
    `processor(images)`; the classifier pools over those positions and the generative loss
    predicts tokens 1..T-1 from them (the first pixel has no SOS to be predicted from).

    "bert": the model reads the tokens with the `masked` (B, T) positions hidden, and the
    generative sums count the masked positions only: "nll" and "tokens" over masked tokens
    (bits per masked token), "example_nll" the sum of each example's mean over its masked
    positions and "masked_examples" the examples with any, whose ratio is the BERT objective
    (OpenAI's model.py averages the examples' means over the batch). The
    classifier (fine-tuning) pools over all positions of the same masked pass, as there.
    """
    cfg = model.config
    tokens = batch["tokens"]
    if cfg.causal:
        inputs = classifier_inputs(tokens) if cfg.num_labels else model_inputs(tokens, cfg.sos_id)
    else:
        inputs = tokens
    out = model.apply(
        {"params": params},
        inputs,
        masked=masked,
        deterministic=deterministic,
        rngs={"dropout": rng},
    )
    logits, targets = out.logits, tokens
    if cfg.causal and cfg.num_labels:
        logits, targets = logits[:, :-1], tokens[:, 1:]
    nll_BxT = token_nll(logits, targets)
    counted = _counted(cfg, batch, masked)
    sums = _counts(cfg, batch, masked) | {"nll": jnp.sum(nll_BxT * counted)}
    if not cfg.causal:
        weight = _has_masked(batch, masked)
        sums["example_nll"] = jnp.sum(masked_example_nll(nll_BxT, masked) * weight)
    return sums, out.class_logits


def _counted(cfg: ModelConfig, batch: dict, masked) -> jax.Array:
    """(B, T') weights of the predicted positions the generative sums count: every one of a
    real example's ("ar"; T' = T - 1 with a classifier, which reads the tokens themselves),
    or its masked ones ("bert")."""
    mask = batch["mask"].astype(jnp.float32)[:, None]
    if not cfg.causal:
        return masked.astype(jnp.float32) * mask
    batch_size, length = batch["tokens"].shape
    return jnp.broadcast_to(mask, (batch_size, length - 1 if cfg.num_labels else length))


def _counts(cfg: ModelConfig, batch: dict, masked) -> dict:
    """The sums of `_losses` that do not depend on the parameters: the objective's
    denominators. Gradient accumulation adds them up over the micro-batches first, so that
    every micro-batch's loss is divided by the whole batch's."""
    mask = batch["mask"].astype(jnp.float32)
    counts = {"tokens": jnp.sum(_counted(cfg, batch, masked)), "examples": jnp.sum(mask)}
    if not cfg.causal:
        counts["masked_examples"] = jnp.sum(_has_masked(batch, masked))
    return counts


def _has_masked(batch: dict, masked: jax.Array) -> jax.Array:
    """(B,) 1 for the real examples with any masked position: those the BERT objective
    averages over."""
    return jnp.any(masked, axis=1).astype(jnp.float32) * batch["mask"].astype(jnp.float32)


def _classifier_sums(log_probs_BxC: jax.Array, batch: dict) -> dict:
    """Classifier loss and correct predictions summed over the batch's real examples."""
    mask = batch["mask"].astype(jnp.float32)
    clf_nll = token_nll(log_probs_BxC, batch["label"])
    correct = jnp.argmax(log_probs_BxC, -1) == batch["label"]
    return {"clf_nll": jnp.sum(clf_nll * mask), "correct": jnp.sum(correct * mask)}


def _train_key(state_rng: jax.Array, step, micro_batch=None) -> jax.Array:
    """The key of a step (and micro-batch): dropout draws from it, BERT masks from
    `fold_in(key, 1)`."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state_rng), step)
    return key if micro_batch is None else jax.random.fold_in(key, micro_batch)


def _masks_from(key: jax.Array, shape: tuple[int, int], prob: float) -> jax.Array:
    return bert_masks(jax.random.fold_in(key, 1), jnp.arange(shape[0]), shape[1], prob)


def train_masks(
    state_rng: jax.Array, step: int, shape: tuple[int, int], prob: float, micro_batch=None
) -> jax.Array:
    """The (B, T) masks a BERT train step at `step` uses for a batch of `shape` (or for its
    micro-batch `micro_batch` under gradient accumulation), from the state's raw key data."""
    return _masks_from(_train_key(state_rng, step, micro_batch), shape, prob)


def _objective(sums: dict, counts: dict, weights: LossWeights) -> jax.Array:
    """The loss of the sums' examples, over the denominators `counts` (their own, or under
    gradient accumulation the whole batch's, so that the micro-batches' losses add up to the
    batch's)."""
    if "example_nll" in sums:  # bert: the mean over examples of their masked-position means
        generative = sums["example_nll"] / jnp.maximum(counts["masked_examples"], 1)
    else:  # ar: the mean over every predicted token
        generative = sums["nll"] / jnp.maximum(counts["tokens"], 1)
    loss = weights.generative * generative
    if "clf_nll" in sums:
        loss += weights.classification * sums["clf_nll"] / jnp.maximum(counts["examples"], 1)
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
    `grad_accum_steps` = A, the batch is processed as A micro-batches, each taking every A-th
    example so all devices work on every micro-batch, whose gradients add up to the whole
    batch's: each micro-batch's loss is divided by the whole batch's denominators (its
    predicted tokens, examples, examples with masked positions), not by its own.
    A BERT model's masks come from the state's key: `train_masks(state.rng, step, ...)` for
    each micro-batch, so they are reproducible from the run's seed and differ every step.
    """
    model = ImageGPT(model_config)
    shardings = state_shardings(model_config, tx, mesh, rules)
    deterministic = not (
        model_config.attn_pdrop or model_config.resid_pdrop or model_config.embd_pdrop
    )

    def masks(key, shape):
        return None if model_config.causal else _masks_from(key, shape, model_config.mask_prob)

    def micro_sums(params, batch, rng, masked, counts):
        sums, class_logits = _losses(params, batch, rng, model, deterministic, masked)
        if class_logits is not None:
            sums |= _classifier_sums(jax.nn.log_softmax(class_logits), batch)
        return _objective(sums, counts, weights), sums

    grad_fn = jax.value_and_grad(micro_sums, has_aux=True)

    def step(state: TrainState, batch: dict):
        if grad_accum_steps == 1:
            rng = _train_key(state.rng, state.step)
            masked = masks(rng, batch["tokens"].shape)
            counts = _counts(model_config, batch, masked)
            (_, sums), grads = grad_fn(state.params, batch, rng, masked, counts)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(
                    x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]
                ).swapaxes(0, 1),
                batch,
            )
            keys = jax.vmap(lambda i: _train_key(state.rng, state.step, i))(
                jnp.arange(grad_accum_steps)
            )
            micro_masked = jax.vmap(lambda key, x: masks(key, x.shape))(keys, micro["tokens"])
            counts = jax.tree.map(
                lambda c: jnp.sum(c, axis=0),
                jax.vmap(functools.partial(_counts, model_config))(micro, micro_masked),
            )

            def accumulate(carry, xs):
                key, one, masked = xs
                (_, sums), grads = grad_fn(state.params, one, key, masked, counts)
                return jax.tree.map(jnp.add, carry, (sums, grads)), None

            key, one, masked = jax.tree.map(lambda x: x[0], (keys, micro, micro_masked))
            (_, sums_shape), grads_shape = jax.eval_shape(
                grad_fn, state.params, one, key, masked, counts
            )
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (sums_shape, grads_shape))
            (sums, grads), _ = jax.lax.scan(accumulate, zeros, (keys, micro, micro_masked))
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
    return jax.jit(
        with_activation_sharding(step, mesh),
        donate_argnums=(0,),
        out_shardings=(shardings, replicated),
    )


def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _metrics(sums: dict) -> dict:
    nats = sums["nll"] / jnp.maximum(sums["tokens"], 1)
    out = {"loss": nats, "bits_per_token": nats / jnp.log(2.0)}
    if "clf_nll" in sums:
        out["clf_loss"] = sums["clf_nll"] / jnp.maximum(sums["examples"], 1)
        out["accuracy"] = sums["correct"] / jnp.maximum(sums["examples"], 1)
    if "correct_one_mask" in sums:
        out["accuracy_one_mask"] = sums["correct_one_mask"] / jnp.maximum(sums["examples"], 1)
    return out


def make_eval_step(
    model_config: ModelConfig, mesh: Mesh, ensemble_masks: int = 1
) -> Callable[[dict, dict], dict]:
    """`eval_step(params, batch) -> sums` of nll, tokens, examples, colour counts (and
    classifier counts) over the real examples, to be added up over a whole split.

    BERT models are evaluated with masked inputs, as they were trained (paper section 4.6):
    example i of the split with `eval_masks(i, ..., k)` for k < `ensemble_masks` (the batch
    carries "index", as `igpt.data.eval_dataset` makes it). The generative sums add up over
    the masks; a classifier's prediction averages its class probabilities over them, the
    paper's ensemble over random masks, and "correct_one_mask" counts mask 0's alone.
    """
    if ensemble_masks < 1:
        raise ValueError(f"ensemble_masks={ensemble_masks} must be >= 1")
    model = ImageGPT(model_config)
    replicated = NamedSharding(mesh, PartitionSpec())

    def bert_sums(params, batch):
        shape, prob = batch["tokens"].shape, model_config.mask_prob
        sums, log_probs = {}, []
        for k in range(ensemble_masks):
            masked = eval_masks(batch["index"], shape[1], prob, k)
            one, class_logits = _losses(params, batch, jax.random.key(0), model, True, masked)
            sums = one if not sums else jax.tree.map(jnp.add, sums, one)
            if class_logits is not None:
                log_probs.append(jax.nn.log_softmax(class_logits))
        sums["examples"] = jnp.sum(batch["mask"].astype(jnp.float32))  # each once, not per mask
        if log_probs:
            mean = jax.nn.logsumexp(jnp.stack(log_probs), axis=0) - jnp.log(len(log_probs))
            sums |= _classifier_sums(mean, batch)
            if ensemble_masks > 1:
                sums["correct_one_mask"] = _classifier_sums(log_probs[0], batch)["correct"]
        return sums

    def step(params, batch):
        if model_config.causal:
            sums, class_logits = _losses(params, batch, jax.random.key(0), model, True)
            if class_logits is not None:
                sums |= _classifier_sums(jax.nn.log_softmax(class_logits), batch)
        else:
            sums = bert_sums(params, batch)
        weight = jnp.broadcast_to(batch["mask"][:, None], batch["tokens"].shape)
        counts = jnp.zeros(model_config.palette_size).at[batch["tokens"]].add(weight)
        return sums | {"colour_counts": counts}

    return jax.jit(with_activation_sharding(step, mesh), out_shardings=replicated)


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
