"""ImageGPT as pure Flax linen modules.

Shapes in names: B batch, T tokens in this call, S cache length, D width, H heads, K head_dim,
V colour clusters. Every parameter carries logical axis names ("vocab", "embed", "heads",
"kv", "mlp", "layers", ...) that `igpt.sharding` maps onto a device mesh.

Blocks are stacked with `nn.scan`, so parameters under "h" have a leading layer axis and the
program compiles one block however deep the model is.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from igpt.config import ModelConfig

_normal = nn.initializers.normal
_zeros = nn.initializers.zeros
_ones = nn.initializers.ones


def _logical(init, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, axes)


def quick_gelu(x: jax.Array) -> jax.Array:
    """ImageGPT's activation ("gelu2" in the TF code): x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


@struct.dataclass
class ModelOutput:
    """What `ImageGPT.__call__` returns.

    logits: (B, T, V) float32 next-token logits over the colour clusters (never over SOS).
    hidden_states: like transformers' `output_hidden_states`: the residual stream before each
        block (n_layer arrays of (B, T, D)), then the final norm output.
    class_logits: (B, num_labels) float32, or None when the config has no classifier.
    """

    logits: jax.Array
    hidden_states: tuple[jax.Array, ...]
    class_logits: jax.Array | None = None


class RMSNorm(nn.Module):
    """ImageGPT's norm: x / sqrt(mean(x^2) + eps) * gain; no centring, no bias, trainable gain."""

    epsilon: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        gain = self.param(
            "scale", _logical(_ones, ("embed",)), (x_BxTxD.shape[-1],), self.param_dtype
        )
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return (x * gain.astype(jnp.float32)).astype(self.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with an optional KV cache for decoding."""

    config: ModelConfig
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, layer_idx: jax.Array, start: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        d, h, k = cfg.n_embd, cfg.n_head, cfg.head_dim
        qkv = nn.DenseGeneral(
            (3, h, k),
            use_bias=cfg.use_bias,
            dtype=dtype,
            param_dtype=cfg.storage_dtype,
            kernel_init=_logical(_normal(1.0 / math.sqrt(d)), ("embed", None, "heads", "kv")),
            bias_init=_logical(_zeros, (None, "heads", "kv")),
            name="c_attn",
        )(x_BxTxD)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

        t = x_BxTxD.shape[1]
        q_pos = start + jnp.arange(t)
        if self.decode:
            k_BxSxHxK, v_BxSxHxK = self._update_cache(k_BxTxHxK, v_BxTxHxK, start)
        else:
            k_BxSxHxK, v_BxSxHxK = k_BxTxHxK, v_BxTxHxK
        k_pos = jnp.arange(k_BxSxHxK.shape[1])
        causal_TxS = k_pos[None, :] <= q_pos[:, None]

        scale = 1.0 / math.sqrt(k)
        if cfg.scale_attn_by_inverse_layer_idx:
            scale = scale / (layer_idx + 1).astype(jnp.float32)
        # Scores and softmax in float32 whatever the compute dtype: bf16 logits lose the
        # small differences between far-apart pixels.
        scores_BxHxTxS = jnp.einsum(
            "bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK, preferred_element_type=jnp.float32
        )
        scores_BxHxTxS = jnp.where(causal_TxS, scores_BxHxTxS * scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(dtype)
        probs = nn.Dropout(cfg.attn_pdrop)(probs, deterministic=self.deterministic)
        out_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs, v_BxSxHxK)
        return nn.DenseGeneral(
            d,
            axis=(-2, -1),
            use_bias=cfg.use_bias,
            dtype=dtype,
            param_dtype=cfg.storage_dtype,
            kernel_init=_logical(
                _normal(1.0 / math.sqrt(d * cfg.n_layer)), ("heads", "kv", "embed")
            ),
            bias_init=_logical(_zeros, ("embed",)),
            name="c_proj",
        )(out_BxTxHxK)

    def _update_cache(self, k_BxTxHxK, v_BxTxHxK, start):
        """Write this chunk's keys/values at `start` and return the whole cache."""
        is_initialized = self.has_variable("cache", "key")
        # The cache length is fixed by the ids given when the cache is created (`init_cache`).
        key = self.variable("cache", "key", jnp.zeros, k_BxTxHxK.shape, k_BxTxHxK.dtype)
        value = self.variable("cache", "value", jnp.zeros, v_BxTxHxK.shape, v_BxTxHxK.dtype)
        if not is_initialized:
            return k_BxTxHxK, v_BxTxHxK
        key.value = jax.lax.dynamic_update_slice(key.value, k_BxTxHxK, (0, start, 0, 0))
        value.value = jax.lax.dynamic_update_slice(value.value, v_BxTxHxK, (0, start, 0, 0))
        return key.value, value.value


class MLP(nn.Module):
    """Two dense layers with quick_gelu between them."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.config
        dense = dict(use_bias=cfg.use_bias, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype)
        x = nn.Dense(
            cfg.mlp_dim,
            kernel_init=_logical(_normal(0.02), ("embed", "mlp")),
            bias_init=_logical(_zeros, ("mlp",)),
            name="c_fc",
            **dense,
        )(x_BxTxD)
        x = quick_gelu(x)
        return nn.Dense(
            cfg.n_embd,
            kernel_init=_logical(_normal(0.02), ("mlp", "embed")),
            bias_init=_logical(_zeros, ("embed",)),
            name="c_proj",
            **dense,
        )(x)


class Block(nn.Module):
    """Pre-norm transformer block: h + attn(norm(h)), then + mlp(norm(h))."""

    config: ModelConfig
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, h_BxTxD: jax.Array, layer_idx: jax.Array, start: jax.Array):
        cfg = self.config
        norm = dict(
            epsilon=cfg.layer_norm_epsilon, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype
        )
        drop = nn.Dropout(cfg.resid_pdrop)
        a = Attention(cfg, self.decode, self.deterministic, name="attn")(
            RMSNorm(**norm, name="ln_1")(h_BxTxD), layer_idx, start
        )
        x = h_BxTxD + drop(a, deterministic=self.deterministic)
        m = MLP(cfg, self.deterministic, name="mlp")(RMSNorm(**norm, name="ln_2")(x))
        x = x + drop(m, deterministic=self.deterministic)
        # carry = the new residual stream; scanned output = the stream before this block.
        return x, h_BxTxD


class ImageGPT(nn.Module):
    """The ImageGPT decoder with its next-pixel head and, if `num_labels > 0`, a classifier.

    `apply({"params": params}, input_ids)` takes (B, T) int32 ids in the transformers convention:
    the first token is SOS (id `config.sos_id`). With `decode=True` and a cache from `init_cache`
    (passed as `{"cache": cache}` and returned through `mutable=["cache"]`), each call appends
    its ids to the cache at the running position, so a prompt chunk of any length can be
    prefilled and then tokens fed one at a time.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, *, decode: bool = False, deterministic: bool = True
    ) -> ModelOutput:
        cfg = self.config
        dtype = cfg.compute_dtype
        t = input_ids.shape[1]

        start = jnp.zeros((), jnp.int32)
        if decode:
            is_initialized = self.has_variable("cache", "position")
            position = self.variable("cache", "position", jnp.zeros, (), jnp.int32)
            if is_initialized:
                start = position.value
                position.value = start + t

        wte = nn.Embed(
            cfg.vocab_size,
            cfg.n_embd,
            dtype=dtype,
            param_dtype=cfg.storage_dtype,
            embedding_init=_logical(_normal(0.02), ("vocab", "embed")),
            name="wte",
        )
        wpe = nn.Embed(
            cfg.n_positions,
            cfg.n_embd,
            dtype=dtype,
            param_dtype=cfg.storage_dtype,
            embedding_init=_logical(_normal(0.01), (None, "embed")),
            name="wpe",
        )
        h = wte(input_ids) + wpe(start + jnp.arange(t))[None]
        h = nn.Dropout(cfg.embd_pdrop)(h, deterministic=deterministic)

        block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
        blocks = nn.scan(
            block,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast),
            length=cfg.n_layer,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, decode, deterministic, name="h")
        h, before_blocks_LxBxTxD = blocks(h, jnp.arange(cfg.n_layer), start)

        norm = RMSNorm(cfg.layer_norm_epsilon, dtype, cfg.storage_dtype, name="ln_f")
        final = norm(h)
        logits = nn.Dense(
            cfg.num_clusters,
            use_bias=False,
            dtype=dtype,
            param_dtype=cfg.storage_dtype,
            kernel_init=_logical(_zeros, ("embed", "vocab")),
            name="lm_head",
        )(final).astype(jnp.float32)

        class_logits = None
        if cfg.num_labels:
            pooled = jnp.mean(final.astype(jnp.float32), axis=1)
            class_logits = nn.Dense(
                cfg.num_labels,
                use_bias=False,
                dtype=jnp.float32,
                param_dtype=cfg.storage_dtype,
                kernel_init=_logical(_zeros, ("embed", "classes")),
                name="score",
            )(pooled)

        hidden_states = tuple(before_blocks_LxBxTxD[i] for i in range(cfg.n_layer)) + (final,)
        return ModelOutput(logits=logits, hidden_states=hidden_states, class_logits=class_logits)


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Fresh parameters (plain arrays, logical-axis boxes removed) on the default device."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(ImageGPT(config).init(rng, ids)["params"])


def param_shapes(config: ModelConfig) -> dict:
    """Parameter shapes and dtypes (jax.ShapeDtypeStruct, boxed with logical axis names).

    Nothing is allocated; sharding code turns the boxes into partition specs.
    """
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda r, x: ImageGPT(config).init(r, x), jax.random.key(0), ids)[
        "params"
    ]


def count_params(params) -> int:
    """Total number of scalars in a parameter tree."""
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(params))


def init_cache(config: ModelConfig, batch_size: int, length: int | None = None) -> dict:
    """An empty decoding cache for `batch_size` sequences of up to `length` tokens (default:
    the full context). Keys/values are stored in the compute dtype."""
    length = config.n_positions if length is None else length
    if not 0 < length <= config.n_positions:
        raise ValueError(f"cache length {length} must be in [1, n_positions={config.n_positions}]")
    ids = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    shapes = jax.eval_shape(
        lambda r, x: ImageGPT(config).init(r, x, decode=True), jax.random.key(0), ids
    )["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes))
