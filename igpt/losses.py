"""Losses on model outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_nll(logits_BxTxV: jax.Array, input_ids_BxT: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood (nats) of each next pixel, shape (B, T-1).

    `input_ids` start with SOS, so position t predicts token t+1, as in transformers'
    `labels=input_ids` loss. The last position predicts nothing and is dropped.
    """
    log_probs = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
    targets = input_ids_BxT[:, 1:]
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def next_token_loss(logits_BxTxV: jax.Array, input_ids_BxT: jax.Array) -> jax.Array:
    """Mean next-pixel cross-entropy in nats per token (transformers' causal LM loss)."""
    return jnp.mean(next_token_nll(logits_BxTxV, input_ids_BxT))
