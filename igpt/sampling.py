"""Sampling images from an ImageGPT model with a KV cache, and conditional image completion.

`sample` is one jitted program: the start-of-sequence token and any prompt are prefilled into a
static-size cache in a single pass, then a `fori_loop` feeds back one sampled token per step.
The program is built once per (config, batch, prompt length, length, greedy, top_k, whether
top_p is used) and reused, so new keys, temperatures or top-p values do not recompile.
`sample_batched` and `complete` run many samples in fixed-size batches, with a progress bar.

Ids are colour-cluster ids in raster order without the SOS token, as the tokenizer produces.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from igpt import precision
from igpt.config import ModelConfig
from igpt.model import check_ids, decode_step, init_cache, split_layers


def filter_logits(
    logits_BxV: jax.Array,
    temperature: jax.Array | float,
    *,
    top_k: int | None = None,
    top_p: jax.Array | float | None = None,
) -> jax.Array:
    """Logits divided by `temperature`, with tokens outside the k most likely and outside the
    nucleus of mass `top_p` (of the top-k distribution) set to -inf. Ties at a cut keep all
    tied tokens.

    The nucleus is the set of tokens whose strictly more likely tokens hold less than `top_p`
    of the mass; the most likely token is always in it.
    """
    logits = logits_BxV.astype(jnp.float32) / temperature
    keys_BxV = _order_keys(logits)
    if top_k is not None and top_k < logits.shape[-1]:
        # The k-th largest key: the largest t with at least k keys >= t.
        kth_B = _bisect(keys_BxV, lambda t: jnp.sum(keys_BxV >= t[:, None], -1) >= top_k, True)
        logits = jnp.where(keys_BxV >= kth_B[:, None], logits, -jnp.inf)
    if top_p is not None:
        probs = jax.nn.softmax(logits, axis=-1)

        def mass_above_is_small(t):
            return jnp.sum(jnp.where(keys_BxV > t[:, None], probs, 0.0), -1) < top_p

        # The smallest t whose strictly larger tokens hold less than top_p.
        cut_B = _bisect(keys_BxV, mass_above_is_small, False)
        logits = jnp.where(keys_BxV >= cut_B[:, None], logits, -jnp.inf)
    return logits


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (negative floats have all their bits flipped);
    -0.0 becomes +0.0 first, so equal floats get equal keys."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _bisect(keys_BxV: jax.Array, predicate, largest: bool) -> jax.Array:
    """Per row, the largest (`largest=True`) key value t in [min, max] of the row where the
    monotone `predicate(t)` holds, or the smallest one. `predicate` must hold at the row's
    minimum (largest) or maximum (smallest).

    A 32-step integer bisection: exact selection in a few fused reductions, where `lax.top_k`
    and `jnp.sort` of 512 logits cost ~45 us per token on CPU.
    """
    lo, hi = jnp.min(keys_BxV, -1), jnp.max(keys_BxV, -1)

    def step(_, bounds):
        lo, hi = bounds
        if largest:  # invariant: predicate(lo); answer in [lo, hi]
            mid = lo + (hi - lo + 1) // 2
            ok = predicate(mid)
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
        mid = lo + (hi - lo) // 2  # invariant: predicate(hi); answer in [lo, hi]
        ok = predicate(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo, hi = jax.lax.fori_loop(0, 32, step, (lo, hi), unroll=True)
    return lo if largest else hi


def draw(logits_BxV: jax.Array, uniform_B: jax.Array) -> jax.Array:
    """One token per row from softmax(logits) by inverting its CDF at `uniform_B` in [0, 1).

    One uniform number per row (not 512 Gumbel draws as `jax.random.categorical` takes) keeps
    the random-number work out of the per-token loop. Tokens of probability 0 (logit -inf) are
    never drawn.
    """
    probs = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    below = jnp.sum(cdf <= uniform_B[:, None] * cdf[:, -1:], axis=-1)
    # Rounding can put u * total at the total itself; fall back to the last possible token.
    last_possible = probs.shape[-1] - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)
    return jnp.minimum(below, last_possible).astype(jnp.int32)


def _choose(logits_BxV, uniform_B, temperature, top_p, *, greedy: bool, top_k, use_top_p: bool):
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits_BxV, temperature, top_k=top_k, top_p=top_p if use_top_p else None)
    return draw(logits, uniform_B)


@functools.lru_cache(maxsize=32)
def _compiled_sampler(
    config: ModelConfig,
    batch: int,
    prompt_len: int,
    length: int,
    greedy: bool,
    top_k: int | None,
    use_top_p: bool,
):
    """The jitted sampling program for one shape and one set of static options."""
    choose = functools.partial(_choose, greedy=greedy, top_k=top_k, use_top_p=use_top_p)

    def run(params, rng, prompt_BxP, temperature, top_p):
        # One uniform number per position and sample, indexed by position, so a token's
        # randomness does not depend on how long the prompt was.
        uniform_NxB = jax.random.uniform(rng, (length, batch))

        # Rounded and sliced once here, outside the loop: each layer's weights and cache are
        # separate buffers that every step reads (and updates) in place.
        params = precision.round_kernels(params, config.compute_dtype)
        layers = split_layers(params["h"], config.n_layer)
        caches = split_layers(init_cache(config, batch, length)["h"], config.n_layer)
        step = functools.partial(decode_step, config, params, layers)

        sos = jnp.full((batch, 1), config.sos_id, jnp.int32)
        logits, caches = step(caches, jnp.concatenate([sos, prompt_BxP], axis=1), jnp.int32(0))
        first = choose(logits[:, -1], uniform_NxB[prompt_len], temperature, top_p)
        tokens_BxN = jnp.zeros((batch, length), jnp.int32)
        tokens_BxN = jax.lax.dynamic_update_slice(tokens_BxN, prompt_BxP, (0, 0))
        tokens_BxN = tokens_BxN.at[:, prompt_len].set(first)

        def body(position, state):
            # Feed the token at position - 1 (model input slot `position`, after SOS) and
            # sample the token at `position`.
            caches, tokens_BxN, last_B = state
            logits, caches = step(caches, last_B[:, None], position)
            token_B = choose(logits[:, 0], uniform_NxB[position], temperature, top_p)
            tokens_BxN = jax.lax.dynamic_update_slice(tokens_BxN, token_B[:, None], (0, position))
            return caches, tokens_BxN, token_B

        state = (caches, tokens_BxN, first)
        _, tokens_BxN, _ = jax.lax.fori_loop(prompt_len + 1, length, body, state)
        return tokens_BxN

    # Where XLA's attention decodes (the decode attention kernel updates its caches in place
    # itself), XLA:CPU's default copy insertion copies every loop-carried cache buffer once
    # per step (it cannot tell that the products read a buffer before its in-place update);
    # the region analysis can. The option names a CPU field, so it is only given to the CPU
    # compiler.
    options = {"xla_cpu_copy_insertion_use_region_analysis": True}
    return jax.jit(run, compiler_options=options if jax.default_backend() == "cpu" else None)


def sample(
    config: ModelConfig,
    params: dict,
    rng: jax.Array,
    *,
    num_samples: int,
    prompt=None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    length: int | None = None,
) -> np.ndarray:
    """Sample `num_samples` images (as ids) from the model.

    Args:
      config, params: the model.
      rng: a `jax.random` key; the same key gives the same samples.
      num_samples: batch size B.
      prompt: the known first P tokens in raster order, without SOS: (B, P) or (P,) (shared by
        every sample), or None for unconditional sampling. Prefilled in one pass.
      temperature: divides the logits; 0 means greedy (argmax) decoding.
      top_k: sample only among the k most likely tokens (1 is greedy).
      top_p: sample only from the smallest set of most likely tokens whose mass reaches top_p
        (nucleus sampling), applied after top_k.
      length: number of raster positions to fill (default: the whole image, n_positions).

    Returns:
      int32 numpy ids (B, length) without SOS; the first P are the prompt, unchanged.
    """
    check_samplable(config)
    length = config.n_positions if length is None else int(length)
    if not 0 < length <= config.n_positions:
        raise ValueError(f"length={length} must be in [1, n_positions={config.n_positions}]")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    prompt_BxP = _prompt_array(config, prompt, num_samples, length)
    greedy = _check_options(config, temperature, top_k, top_p)
    prompt_len = prompt_BxP.shape[1]
    if prompt_len == length:
        return prompt_BxP
    run = _compiled_sampler(
        config,
        num_samples,
        prompt_len,
        length,
        greedy,
        None if greedy else top_k,
        top_p is not None and not greedy,
    )
    top_p_value = jnp.float32(1.0 if top_p is None else top_p)
    temperature_value = jnp.float32(1.0 if greedy else temperature)
    return np.asarray(run(params, rng, jnp.asarray(prompt_BxP), temperature_value, top_p_value))


def check_samplable(config: ModelConfig) -> None:
    """A one-line error for a model this sampler cannot draw images from."""
    if not config.causal:
        raise ValueError(
            "this is a BERT model (objective='bert'): it predicts masked pixels from all the "
            "others and defines no pixel-by-pixel distribution to sample images from; sample "
            "from an autoregressive ('ar') model"
        )


def _prompt_array(config: ModelConfig, prompt, num_samples: int, length: int) -> np.ndarray:
    if prompt is None:
        return np.zeros((num_samples, 0), np.int32)
    prompt = np.asarray(prompt)
    if not np.issubdtype(prompt.dtype, np.integer):
        raise TypeError(f"prompt must hold integer ids, got dtype {prompt.dtype}")
    if prompt.ndim == 1:
        prompt = np.broadcast_to(prompt, (num_samples, prompt.shape[0]))
    if prompt.ndim != 2 or prompt.shape[0] != num_samples:
        raise ValueError(
            f"prompt must have shape (P,) or (num_samples={num_samples}, P); got {prompt.shape}"
        )
    if prompt.shape[1] > length:
        raise ValueError(f"prompt of {prompt.shape[1]} tokens is longer than length={length}")
    if prompt.size and (prompt.min() < 0 or prompt.max() >= config.palette_size):
        raise ValueError(
            f"prompt ids must lie in 0..{config.palette_size - 1} (colour palette, no SOS); "
            f"got [{prompt.min()}, {prompt.max()}]"
        )
    return prompt.astype(np.int32)


def _check_options(config: ModelConfig, temperature, top_k, top_p) -> bool:
    """Validate the sampling options; True when they amount to greedy decoding."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and not 1 <= top_k <= config.palette_size:
        raise ValueError(f"top_k={top_k} must be in [1, {config.palette_size}]")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    return temperature == 0 or top_k == 1


def rows_to_prompt_len(config: ModelConfig, rows_kept: float) -> int:
    """Number of prompt tokens that keep the top `rows_kept` fraction of an image's rows."""
    if not 0 <= rows_kept <= 1:
        raise ValueError(f"rows_kept={rows_kept} must be a fraction in [0, 1]")
    side = config.image_side
    return round(rows_kept * side) * side


def sample_batched(
    config: ModelConfig,
    params: dict,
    rng: jax.Array,
    *,
    num_samples: int,
    prompt=None,
    batch_size: int | None = None,
    progress: bool = False,
    **options,
) -> np.ndarray:
    """`sample` in batches of `batch_size` (default: all at once); returns numpy ids.

    Batch i uses the key `fold_in(rng, i)`. The last batch is padded to the full batch size,
    so every batch runs the same compiled program. `progress` shows a bar with tokens/s.
    `options` are `sample`'s (temperature, top_k, top_p, length).
    """
    length = options.get("length") or config.n_positions
    prompt_NxP = _prompt_array(config, prompt, num_samples, length)
    batch_size = num_samples if batch_size is None else min(batch_size, num_samples)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    starts = range(0, num_samples, batch_size)
    bar = tqdm(starts, desc="sampling", unit="batch", disable=not progress)
    pieces = []
    for i, lo in enumerate(bar):
        chunk = prompt_NxP[lo : lo + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
        tic = time.perf_counter()
        key = rng if len(starts) == 1 else jax.random.fold_in(rng, i)
        ids = sample(config, params, key, num_samples=batch_size, prompt=padded, **options)
        new_tokens = batch_size * (length - chunk.shape[1])
        bar.set_postfix(tokens_per_s=f"{new_tokens / (time.perf_counter() - tic):.0f}")
        pieces.append(ids[: len(chunk)])
    return np.concatenate(pieces)


def complete(
    config: ModelConfig,
    params: dict,
    rng: jax.Array,
    ids,
    *,
    rows_kept: float = 0.5,
    num_completions: int = 4,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Complete images from their top rows, as in the iGPT paper's completion figure.

    Args:
      ids: (N, n_positions) or (n_positions,) colour-cluster ids of whole images (no SOS).
      rows_kept: fraction of the image rows, from the top, kept as the prompt (rounded to
        whole rows).
      num_completions: samples per image.
      temperature, top_k, top_p: as in `sample`.
      batch_size, progress: as in `sample_batched`.

    Returns:
      int32 ids (N, num_completions, n_positions); the kept rows equal the input's.
    """
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] != config.n_positions:
        raise ValueError(
            f"ids must have shape (N, {config.n_positions}) for this model; got {ids.shape}"
        )
    ids = check_ids(ids, config)
    if num_completions < 1:
        raise ValueError(f"num_completions={num_completions} must be >= 1")
    prompt_len = rows_to_prompt_len(config, rows_kept)
    prompts = np.repeat(ids[:, :prompt_len], num_completions, axis=0)
    out = sample_batched(
        config,
        params,
        rng,
        num_samples=len(prompts),
        prompt=prompts,
        batch_size=batch_size,
        progress=progress,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    return out.reshape(len(ids), num_completions, config.n_positions)
