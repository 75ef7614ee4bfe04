"""The two objectives' inputs and losses (paper section 2.1; OpenAI's src/model.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The seed of the masks with which BERT models are evaluated, probed and tested (`eval_masks`).
EVAL_MASK_SEED = 0


def model_inputs(tokens_BxT: jax.Array, sos_id: int) -> jax.Array:
    """The ids the model reads to predict `tokens`: SOS, then every token but the last."""
    sos = jnp.full((tokens_BxT.shape[0], 1), sos_id, tokens_BxT.dtype)
    return jnp.concatenate([sos, tokens_BxT[:, :-1]], axis=1)


def classifier_inputs(tokens_BxT: jax.Array) -> jax.Array:
    """The ids a classifier reads: the image's own tokens, no SOS (transformers' convention for
    ImageGPTForImageClassification, which takes the processor's input_ids as they are)."""
    return tokens_BxT


def bert_masks(key: jax.Array, rows_B: jax.Array, length: int, prob: float) -> jax.Array:
    """(B, T) bool, True where a position is masked: each position of row r independently with
    probability `prob`, drawn from `fold_in(key, r)` (OpenAI's model.py draws
    `M = uniform([batch, sequence]) > bert_mask_prob` as the positions kept; the paper's
    section 2.1 masks each position independently with probability 0.15).

    A row's mask depends only on the key and its row number, never on the batch it sits in or
    on how that batch is sharded: training passes the step's key and 0..B-1, evaluation the
    fixed evaluation key and each example's index in its split.
    """
    draw = lambda row: jax.random.bernoulli(jax.random.fold_in(key, row), prob, (length,))  # noqa: E731
    return jax.vmap(draw)(rows_B)


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Negative log-likelihood in nats of each target under its logits, shape (B, T)."""
    log_probs = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets_BxT[..., None], axis=-1)[..., 0]


def next_token_loss(logits_BxTxV: jax.Array, input_ids_BxT: jax.Array) -> jax.Array:
    """Mean next-pixel cross-entropy in nats per token over ids that start with SOS: position t
    predicts token t+1 and the last position predicts nothing (transformers' causal LM loss
    with `labels=input_ids`)."""
    return jnp.mean(token_nll(logits_BxTxV[:, :-1], input_ids_BxT[:, 1:]))


def masked_example_nll(nll_BxT: jax.Array, masked_BxT: jax.Array) -> jax.Array:
    """Each example's BERT loss, shape (B,): the mean cross-entropy over its masked positions
    (OpenAI's model.py: `reduce_sum(gen_losses * IM, axis=1) / reduce_sum(IM, axis=1)`, which
    the batch then averages). An example with no masked position gets 0, not NaN; the
    training step leaves such examples out of the average."""
    weight = masked_BxT.astype(jnp.float32)
    return jnp.sum(nll_BxT * weight, axis=1) / jnp.maximum(jnp.sum(weight, axis=1), 1.0)


def eval_masks(index_B: jax.Array, length: int, prob: float, k: int = 0) -> jax.Array:
    """Mask k (of an ensemble; 0 alone otherwise) of the examples with these indices in their
    split: evaluation, probe features and tests of a BERT model see the same masks every time,
    whatever the batch size, process count or mesh."""
    key = jax.random.fold_in(jax.random.key(EVAL_MASK_SEED), k)
    return bert_masks(key, index_B, length, prob)
