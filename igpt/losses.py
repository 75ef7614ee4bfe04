"""Losses on model outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def model_inputs(tokens_BxT: jax.Array, sos_id: int) -> jax.Array:
    """The ids the model reads to predict `tokens`: SOS, then every token but the last."""
    sos = jnp.full((tokens_BxT.shape[0], 1), sos_id, tokens_BxT.dtype)
    return jnp.concatenate([sos, tokens_BxT[:, :-1]], axis=1)


def classifier_inputs(tokens_BxT: jax.Array) -> jax.Array:
    """The ids a classifier reads: the image's own tokens, no SOS (transformers' convention for
    ImageGPTForImageClassification, which takes the processor's input_ids as they are)."""
    return tokens_BxT


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Negative log-likelihood in nats of each target under its logits, shape (B, T)."""
    log_probs = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets_BxT[..., None], axis=-1)[..., 0]


def next_token_loss(logits_BxTxV: jax.Array, input_ids_BxT: jax.Array) -> jax.Array:
    """Mean next-pixel cross-entropy in nats per token over ids that start with SOS: position t
    predicts token t+1 and the last position predicts nothing (transformers' causal LM loss
    with `labels=input_ids`)."""
    return jnp.mean(token_nll(logits_BxTxV[:, :-1], input_ids_BxT[:, 1:]))
