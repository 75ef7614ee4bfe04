"""ImageGPT as pure Flax linen modules.

Shapes in names: B batch, T tokens in this call, S cache length, D width, H heads, K head_dim,
V colour palette. Every parameter carries logical axis names ("vocab", "embed", "heads",
"kv", "mlp", "layers", ...) that `igpt.sharding` maps onto a device mesh.

Blocks are stacked with `nn.scan`, so parameters under "h" have a leading layer axis; the
scan is unrolled on CPUs and for shallow models (`ModelConfig.layer_unroll`), and otherwise
compiles one block however deep the model is. `decode_step` runs the same blocks one
layer at a time over per-layer caches, for samplers that feed one token per step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from igpt import attention_kernel, precision
from igpt.config import ModelConfig

_normal = nn.initializers.normal
_zeros = nn.initializers.zeros
_ones = nn.initializers.ones


def _logical(init, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, axes)


def _tokens_2d(dense: Callable, x: jax.Array, feature_axes: int = 1) -> jax.Array:
    """Apply `dense` with the batch and token axes merged into one.

    The weight gradient then contracts a single major axis, which XLA:CPU feeds to its matmul
    without transposing the (large) activation gradient; with separate batch and token axes it
    transposes it in a slow fused loop (a quarter of an S-size train step).
    """
    lead = x.shape[: x.ndim - feature_axes]
    y = dense(x.reshape((-1,) + x.shape[x.ndim - feature_axes :]))
    return keep_batch_sharded(y.reshape(lead + y.shape[1:]))


# The mesh axes (igpt.sharding.MESH_AXES) a batch is split over.
BATCH_AXES = ("data", "fsdp")


def keep_batch_sharded(x: jax.Array) -> jax.Array:
    """Constrain `x`'s leading (batch) axis to be split over `BATCH_AXES` and its other axes
    to be whole, while a step is traced under `igpt.sharding.with_activation_sharding` (a no-op
    elsewhere, e.g. on one device or in the sampler).

    Without it, XLA's sharding propagation meets parameters split over "fsdp" along the
    contracted "embed" axis and may all-gather the activations of the whole batch onto every
    device instead of the (much smaller) parameters: an iGPT-XL step at one 64x64 image per
    chip then needs every chip's attention for all 64 images (75 GB of temporaries).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    free = (jax.sharding.PartitionSpec.UNCONSTRAINED,) * (x.ndim - 1)
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(BATCH_AXES, *free))


def target_platform() -> str:
    """The platform ("cpu", "gpu", "tpu") of the program being traced: that of the mesh's
    devices under `igpt.sharding.with_activation_sharding` (benchmarks/aot.py traces programs
    for TPU chips on a CPU host), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return jax.default_backend() if device is None else device.platform


def quick_gelu(x: jax.Array) -> jax.Array:
    """ImageGPT's activation ("gelu2" in the TF code): x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


@struct.dataclass
class ModelOutput:
    """What `ImageGPT.__call__` returns.

    logits: (B, T, V) float32 next-token logits over the colour palette (never over SOS).
    hidden_states: like transformers' `output_hidden_states`: the residual stream before each
        block (n_layer arrays of (B, T, D)), then the final norm output.
    class_logits: (B, num_labels) float32, or None when the config has no classifier.
    """

    logits: jax.Array
    hidden_states: tuple[jax.Array, ...]
    class_logits: jax.Array | None = None


class RMSNorm(nn.Module):
    """ImageGPT's norm: x / sqrt(mean(x^2) + eps) * gain; no centring, no bias, trainable gain.
    Computed and returned in float32 whatever the compute dtype (the products after it round
    their inputs)."""

    epsilon: float
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        gain = self.param(
            "scale", _logical(_ones, ("embed",)), (x_BxTxD.shape[-1],), self.param_dtype
        )
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return x * gain.astype(jnp.float32)


class Attention(nn.Module):
    """Multi-head self-attention, causal for the "ar" objective and bidirectional for "bert"
    (OpenAI's model.py applies its causal mask only `if not hparams.bert`), with an optional
    KV cache for (causal) decoding.

    The cache holds keys as (B, H, K, S) and values as (B, H, S, K), the layouts the score and
    value matmuls read as they are. A decoding call attends to the cache as it was before the
    call plus its own tokens, so the cached arrays are only read by the matmuls and written by
    one in-place update each: if the matmuls read the updated cache instead, XLA copies the
    whole cache every step.
    """

    config: ModelConfig
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, layer_idx: jax.Array, start: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        d, h, k = cfg.n_embd, cfg.n_head, cfg.head_dim
        c_attn = nn.DenseGeneral(
            (3, h, k),
            use_bias=cfg.use_bias,
            dtype=jnp.float32,
            dot_general=precision.dot_general(dtype),
            param_dtype=cfg.storage_dtype,
            kernel_init=_logical(_normal(1.0 / math.sqrt(d)), ("embed", None, "heads", "kv")),
            bias_init=_logical(_zeros, (None, "heads", "kv")),
            name="c_attn",
        )
        qkv = _tokens_2d(c_attn, x_BxTxD)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

        scale = 1.0 / math.sqrt(k)
        if cfg.scale_attn_by_inverse_layer_idx:
            scale = scale / (layer_idx + 1).astype(jnp.float32)
        if self.decode and self.has_variable("cache", "key"):
            out_BxTxHxK = self._attend_with_cache(qkv, start, scale)
        else:
            if self.decode:  # creating the cache: its length is that of these ids
                # float32 where the decode kernel reads it, as the fused kernel reads keys and
                # values whatever the compute dtype.
                cached = jnp.float32 if self._use_decode_kernel() else dtype
                self.variable("cache", "key", jnp.zeros, _keys_layout(k_BxTxHxK).shape, cached)
                self.variable("cache", "value", jnp.zeros, _values_layout(v_BxTxHxK).shape, cached)
            if self._use_kernel():
                out_BxTxHxK = _kernel_attention(qkv, scale, cfg.causal)
            else:
                out_BxTxHxK = self._attend(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, scale)
        c_proj = nn.DenseGeneral(
            d,
            axis=(-2, -1),
            use_bias=cfg.use_bias,
            dtype=jnp.float32,
            dot_general=precision.dot_general(dtype),
            param_dtype=cfg.storage_dtype,
            kernel_init=_logical(
                _normal(1.0 / math.sqrt(d * cfg.n_layer)), ("heads", "kv", "embed")
            ),
            bias_init=_logical(_zeros, ("embed",)),
            name="c_proj",
        )
        return _tokens_2d(c_proj, out_BxTxHxK, feature_axes=2)

    def _use_kernel(self) -> bool:
        """Whether this call's attention runs in igpt's fused CPU kernel (`attention="auto"`):
        in programs for CPUs without attention dropout, where the kernel builds and takes the
        heads' width.

        bfloat16 programs too: the kernel reads q, k and v as the projection returns them, in
        float32, and computes in float32, where XLA's attention rounds them to bfloat16 for
        its products. Alternated in one process on a 2-core Intel Xeon with AMX, it made the
        bfloat16 train step 1.20x (tiny), 1.32x (Fashion-MNIST shape) and 1.12x (S) faster,
        and the forward pass 1.27-1.38x."""
        cfg = self.config
        return (
            cfg.attention == "auto"
            and target_platform() == "cpu"
            and (self.deterministic or not cfg.attn_pdrop)
            and attention_kernel.available(cfg.head_dim)
        )

    def _use_decode_kernel(self) -> bool:
        """Whether a decoding call of one token per sequence attends in igpt's CPU kernel
        (`attention_kernel.decode`): where the fused kernel would run, outside a device mesh.
        Its cache is float32 whatever the compute dtype (the fused kernel too reads keys and
        values in float32). It reads only the filled positions of the cache; XLA's products
        read it whole, and the softmax between them ran as separate kernels. A bfloat16
        cache also cost the bfloat16 sampler a copy of the whole cache per update and its
        conversion to float32 for the products: 14 of its 24 ms per token at S."""
        return self._use_kernel() and jax.sharding.get_abstract_mesh().empty

    def _probs(self, scores_BxHxTxS, allowed_TxS, scale) -> jax.Array:
        # Scores and softmax in float32 whatever the compute dtype: bf16 logits lose the
        # small differences between far-apart pixels.
        scores = jnp.where(allowed_TxS, scores_BxHxTxS * scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        return nn.Dropout(self.config.attn_pdrop)(probs, deterministic=self.deterministic)

    def _attend(self, q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, scale) -> jax.Array:
        """Attention among this call's tokens, in blocks of `config.attention_block` queries; a
        causal block reads keys only up to its own end, so the masked upper triangle is mostly
        skipped (62.5% of the dense work at 1,024 tokens in blocks of 256)."""
        causal, dtype = self.config.causal, self.config.compute_dtype
        if self.config.attention == "dot_product":
            # cuDNN's fused kernel on GPUs; elsewhere JAX's XLA reference implementation.
            on_gpu = jax.default_backend() == "gpu"
            q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (
                x.astype(dtype) for x in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK)
            )
            return jax.nn.dot_product_attention(
                q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, scale=scale, is_causal=causal,
                implementation="cudnn" if on_gpu else None,
            )  # fmt: skip
        # Heads next to the batch, once for all blocks: XLA:CPU's batched dots want their batch
        # dimensions leading, and otherwise transposes each block's operands (on 2 CPU cores
        # the Fashion-MNIST-shape train step is 5% and its forward pass 11% faster so).
        q_BxHxTxK, k_BxHxTxK, v_BxHxTxK = (
            precision.in_memory(jnp.transpose(x, (0, 2, 1, 3)), dtype)
            for x in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK)
        )
        t = q_BxHxTxK.shape[2]
        pos = jnp.arange(t)
        blocks = []
        block = self.config.attention_block
        for lo in range(0, t, block):
            hi = min(lo + block, t)
            end = hi if causal else t  # the last key a query of this block may read, + 1
            scores = precision.einsum(
                "bhtk,bhsk->bhts", q_BxHxTxK[:, :, lo:hi], k_BxHxTxK[:, :, :end], dtype
            )
            allowed = pos[None, :end] <= pos[lo:hi, None] if causal else jnp.ones((), bool)
            probs = self._probs(keep_batch_sharded(scores), allowed, scale)
            out = precision.einsum("bhts,bhsk->bhtk", probs, v_BxHxTxK[:, :, :end], dtype)
            blocks.append(keep_batch_sharded(out))
        out_BxHxTxK = jnp.concatenate(blocks, axis=2) if len(blocks) > 1 else blocks[0]
        return jnp.transpose(out_BxHxTxK, (0, 2, 1, 3))

    def _attend_with_cache(self, qkv_BxTx3xHxK, start, scale) -> jax.Array:
        """Attention over the cached positions before `start` and this call's tokens, which
        are then written into the cache at `start`."""
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (qkv_BxTx3xHxK[:, :, i] for i in range(3))
        key = self.variable("cache", "key")
        value = self.variable("cache", "value")
        old_k_BxHxKxS, old_v_BxHxSxK = key.value, value.value
        t, s = q_BxTxHxK.shape[1], old_k_BxHxKxS.shape[-1]
        if t == 1 and old_k_BxHxKxS.dtype == jnp.float32 and self._use_decode_kernel():
            out_Bx1xHxK, key.value, value.value = attention_kernel.decode(
                qkv_BxTx3xHxK, old_k_BxHxKxS, old_v_BxHxSxK, start, scale
            )
            return out_Bx1xHxK
        dtype = self.config.compute_dtype
        new_k_BxHxKxT = _keys_layout(k_BxTxHxK).astype(old_k_BxHxKxS.dtype)
        new_v_BxHxTxK = _values_layout(v_BxTxHxK).astype(old_v_BxHxSxK.dtype)
        key.value = jax.lax.dynamic_update_slice(old_k_BxHxKxS, new_k_BxHxKxT, (0, 0, 0, start))
        value.value = jax.lax.dynamic_update_slice(old_v_BxHxSxK, new_v_BxHxTxK, (0, 0, start, 0))

        old_scores = precision.einsum("bthk,bhks->bhts", q_BxTxHxK, old_k_BxHxKxS, dtype)
        new_scores = precision.einsum("bthk,bhku->bhtu", q_BxTxHxK, new_k_BxHxKxT, dtype)
        allowed_TxS = jnp.concatenate(
            [
                jnp.broadcast_to(jnp.arange(s)[None, :] < start, (t, s)),
                jnp.tril(jnp.ones((t, t), bool)),
            ],
            axis=-1,
        )
        probs = self._probs(jnp.concatenate([old_scores, new_scores], -1), allowed_TxS, scale)
        out = precision.einsum("bhts,bhsk->bthk", probs[..., :s], old_v_BxHxSxK, dtype)
        return out + precision.einsum("bhtu,bhuk->bthk", probs[..., s:], new_v_BxHxTxK, dtype)


def _kernel_attention(qkv_BxTx3xHxK: jax.Array, scale, causal: bool) -> jax.Array:
    """`attention_kernel.attention`; under a device mesh, run by each device on its rows of
    the batch (and its heads, where the mesh splits them), since XLA cannot partition a custom
    call. The custom call's results carry no record of varying over the mesh axes, which
    shard_map's checks would ask of the gradient (`check_vma`)."""
    attend = functools.partial(attention_kernel.attention, causal=causal)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attend(qkv_BxTx3xHxK, scale)
    heads = "tensor" if qkv_BxTx3xHxK.shape[3] % mesh.shape["tensor"] == 0 else None
    P = jax.sharding.PartitionSpec
    return jax.shard_map(
        attend,
        mesh=mesh,
        in_specs=(P(BATCH_AXES, None, None, heads), P()),
        out_specs=P(BATCH_AXES, None, heads),
        check_vma=False,
    )(qkv_BxTx3xHxK, jnp.asarray(scale, jnp.float32))


def _keys_layout(k_BxTxHxK: jax.Array) -> jax.Array:
    """(B, T, H, K) -> the cache layout of keys, (B, H, K, T)."""
    return jnp.transpose(k_BxTxHxK, (0, 2, 3, 1))


def _values_layout(v_BxTxHxK: jax.Array) -> jax.Array:
    """(B, T, H, K) -> the cache layout of values, (B, H, T, K)."""
    return jnp.transpose(v_BxTxHxK, (0, 2, 1, 3))


class MLP(nn.Module):
    """Two dense layers with quick_gelu between them."""

    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.config
        dense = dict(
            use_bias=cfg.use_bias,
            dtype=jnp.float32,
            dot_general=precision.dot_general(cfg.compute_dtype),
            param_dtype=cfg.storage_dtype,
        )
        c_fc = nn.Dense(
            cfg.mlp_dim,
            kernel_init=_logical(_normal(0.02), ("embed", "mlp")),
            bias_init=_logical(_zeros, ("mlp",)),
            name="c_fc",
            **dense,
        )
        c_proj = nn.Dense(
            cfg.n_embd,
            kernel_init=_logical(_normal(0.02), ("mlp", "embed")),
            bias_init=_logical(_zeros, ("embed",)),
            name="c_proj",
            **dense,
        )
        return _tokens_2d(c_proj, quick_gelu(_tokens_2d(c_fc, x_BxTxD)))


class Block(nn.Module):
    """Pre-norm transformer block: h + attn(norm(h)), then + mlp(norm(h))."""

    config: ModelConfig
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, h_BxTxD: jax.Array, layer_idx: jax.Array, start: jax.Array):
        cfg = self.config
        norm = dict(epsilon=cfg.layer_norm_epsilon, param_dtype=cfg.storage_dtype)
        drop = nn.Dropout(cfg.resid_pdrop)
        a = Attention(cfg, self.decode, self.deterministic, name="attn")(
            RMSNorm(**norm, name="ln_1")(h_BxTxD), layer_idx, start
        )
        x = h_BxTxD + drop(a, deterministic=self.deterministic)
        m = MLP(cfg, self.deterministic, name="mlp")(RMSNorm(**norm, name="ln_2")(x))
        x = keep_batch_sharded(x + drop(m, deterministic=self.deterministic))
        # carry = the new residual stream; scanned output = the stream before this block.
        return x, h_BxTxD


# The embeddings and the head are built by these functions both inside `ImageGPT` (where they
# bind to it under their names) and, unbound, by `decode_step`.


# The residual stream stays float32 whatever the compute dtype (only matmul inputs are cast):
# through 24-60 layers, bf16 residual adds would lose the small updates of each block. So the
# embeddings are looked up in float32, and the head accumulates its logits in float32.


def _wte(cfg: ModelConfig) -> nn.Embed:
    return nn.Embed(
        cfg.vocab_size,
        cfg.n_embd,
        dtype=jnp.float32,
        param_dtype=cfg.storage_dtype,
        embedding_init=_logical(_normal(0.02), ("vocab", "embed")),
        name="wte",
    )


def _wpe(cfg: ModelConfig) -> nn.Embed:
    return nn.Embed(
        cfg.n_positions,
        cfg.n_embd,
        dtype=jnp.float32,
        param_dtype=cfg.storage_dtype,
        embedding_init=_logical(_normal(0.01), (None, "embed")),
        name="wpe",
    )


def _ln_f(cfg: ModelConfig) -> RMSNorm:
    return RMSNorm(cfg.layer_norm_epsilon, cfg.storage_dtype, name="ln_f")


def _lm_head(cfg: ModelConfig) -> nn.Dense:
    return nn.Dense(
        cfg.palette_size,
        use_bias=False,
        dtype=jnp.float32,
        dot_general=precision.dot_general(cfg.compute_dtype),
        param_dtype=cfg.storage_dtype,
        kernel_init=_logical(_zeros, ("embed", "vocab")),
        name="lm_head",
    )


class ImageGPT(nn.Module):
    """The ImageGPT transformer with its pixel head and, if `num_labels > 0`, a classifier.

    `apply({"params": params}, input_ids)` takes (B, T) int32 ids. For the "ar" objective they
    follow the transformers convention, SOS (id `config.sos_id`) first, and the head predicts
    each next pixel; with `decode=True` and a cache from `init_cache` (passed as
    `{"cache": cache}` and returned through `mutable=["cache"]`), each call appends its ids to
    the cache at the running position, so a prompt chunk of any length can be prefilled and
    then tokens fed one at a time. For "bert" they are the image's pixel ids (no SOS) and
    `masked` (B, T) bool marks the positions hidden from the model: their token embedding is
    multiplied by 0 and only the position embedding remains (OpenAI's model.py,
    `h = h * tf.expand_dims(M, 2)` before `h += wpe`); the head predicts every position's
    pixel. BERT models have no decoding mode (nothing to sample from) and keep the SOS row of
    `wte` unused, so both objectives share one parameter layout.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        *,
        masked: jax.Array | None = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> ModelOutput:
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {input_ids.shape}")
        t = input_ids.shape[1]
        if t > cfg.n_positions:
            reads = (
                f"SOS plus the first {cfg.n_positions - 1} pixel ids (igpt.losses.model_inputs)"
                if cfg.causal
                else f"at most {cfg.n_positions} pixel ids"
            )
            raise ValueError(
                f"{t} input ids are more than n_positions={cfg.n_positions}: the model reads "
                + reads
            )
        if decode and not cfg.causal:
            raise ValueError("a BERT model (objective='bert') has no decoding mode")
        if masked is not None and cfg.causal:
            raise ValueError("masked positions are for objective='bert'; this model is 'ar'")

        start = jnp.zeros((), jnp.int32)
        if decode:
            is_initialized = self.has_variable("cache", "position")
            position = self.variable("cache", "position", jnp.zeros, (), jnp.int32)
            if is_initialized:
                start = position.value
                position.value = start + t

        h = _wte(cfg)(input_ids)
        if masked is not None:
            h = h * (~masked)[..., None].astype(h.dtype)
        h = h + _wpe(cfg)(start + jnp.arange(t))[None]
        h = keep_batch_sharded(nn.Dropout(cfg.embd_pdrop)(h, deterministic=deterministic))

        block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
        blocks = nn.scan(
            block,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast),
            length=cfg.n_layer,
            unroll=cfg.layer_unroll(target_platform()),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, decode, deterministic, name="h")
        h, before_blocks_LxBxTxD = blocks(h, jnp.arange(cfg.n_layer), start)

        final = _ln_f(cfg)(h)
        logits = _tokens_2d(_lm_head(cfg), final).astype(jnp.float32)

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
    the full context). Keys and values are stored in float32 where igpt's decode attention
    kernel reads them (CPUs), else in the compute dtype."""
    length = config.n_positions if length is None else length
    if not 0 < length <= config.n_positions:
        raise ValueError(f"cache length {length} must be in [1, n_positions={config.n_positions}]")
    ids = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    shapes = jax.eval_shape(
        lambda r, x: ImageGPT(config).init(r, x, decode=True), jax.random.key(0), ids
    )["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes))


def check_ids(ids, config: ModelConfig, *, sos: bool = False) -> np.ndarray:
    """Host ids checked against a model: integers in [0, palette_size) (or SOS with `sos`), at
    most n_positions per row; a one-line ValueError otherwise (`jnp.take` would silently clamp
    an out-of-range id). Returns them as int32 numpy."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    if ids.ndim and ids.shape[-1] > config.n_positions:
        raise ValueError(f"{ids.shape[-1]} ids per image exceed n_positions={config.n_positions}")
    top = config.vocab_size if sos else config.palette_size
    if ids.size and (ids.min() < 0 or ids.max() >= top):
        what = "palette colours and SOS" if sos else "palette colours, no SOS"
        raise ValueError(f"ids must lie in 0..{top - 1} ({what}); got [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int32)


def split_layers(stacked: dict, n_layer: int) -> tuple[dict, ...]:
    """Per-layer slices of a tree stacked on a leading layer axis (`params["h"]` or
    `init_cache(...)["h"]`), for `decode_step`."""
    return tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n_layer))


def decode_step(
    config: ModelConfig,
    params: dict,
    layers: tuple[dict, ...],
    caches: tuple[dict, ...],
    input_ids: jax.Array,
    start: jax.Array,
) -> tuple[jax.Array, tuple[dict, ...]]:
    """`ImageGPT(config).apply(..., decode=True)` over per-layer parameters and caches.

    `layers = split_layers(params["h"], n_layer)`, `caches = split_layers(init_cache(...)["h"],
    n_layer)`; the ids (B, T) are appended at position `start`. Returns float32 logits (B, T, V)
    and the updated caches. Unlike the scanned model, every layer's cache is its own buffer,
    which XLA updates in place and reads without copying; a scan slices the stacked cache and
    restacks it every step. A sampling loop slices the parameters once, outside the loop.
    """
    t = input_ids.shape[1]
    h = _wte(config).apply({"params": params["wte"]}, input_ids)
    h = h + _wpe(config).apply({"params": params["wpe"]}, start + jnp.arange(t))[None]
    block = Block(config, decode=True)
    new_caches = []
    for i, (layer, cache) in enumerate(zip(layers, caches, strict=True)):
        (h, _), variables = block.apply(
            {"params": layer, "cache": cache}, h, jnp.int32(i), start, mutable=["cache"]
        )
        new_caches.append(variables["cache"])
    final = _ln_f(config).apply({"params": params["ln_f"]}, h)
    head = _lm_head(config)
    logits = _tokens_2d(lambda x: head.apply({"params": params["lm_head"]}, x), final)
    return logits.astype(jnp.float32), tuple(new_caches)
