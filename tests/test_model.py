"""The Flax ImageGPT model: sizes, initialisation, causality, the KV cache, dtypes."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from reference_models import random_igpt_params

import igpt
from igpt.losses import next_token_loss
from igpt.sharding import MESH_AXES

TINY = igpt.ModelConfig(n_embd=32, n_layer=3, n_head=4, n_positions=36)


def _ids(config, batch=2, length=None, seed=0):
    length = config.n_positions if length is None else length
    ids = np.random.default_rng(seed).integers(0, config.palette_size, (batch, length))
    ids[:, 0] = config.sos_id
    return jnp.asarray(ids, jnp.int32)


# Parameter counts from the paper's released models (REFERENCE.md "Sizes").
@pytest.mark.parametrize(
    "name, without_bias, with_bias",
    [
        ("s", 76_571_648, 76_682_240),
        ("m", 455_157_760, 455_489_536),
        ("l", 1_362_250_752, 1_362_914_304),
    ],
)
def test_preset_parameter_counts_match_released_models(name, without_bias, with_bias):
    config = igpt.ModelConfig.preset(name)
    assert igpt.count_params(igpt.param_shapes(config)) == without_bias
    with_biases = igpt.param_shapes(config.replace(use_bias=True))
    assert igpt.count_params(with_biases) == with_bias


def test_xl_preset_is_about_6_8_billion_parameters():
    n = igpt.count_params(igpt.param_shapes(igpt.ModelConfig.preset("xl")))
    assert 6.7e9 < n < 6.9e9


def test_bad_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="not divisible by n_head"):
        igpt.ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match=r"query_block=-1 must be >= 0 \(0: automatic\)"):
        igpt.ModelConfig(query_block=-1)
    with pytest.raises(ValueError, match=r"scan_unroll=-1 must be >= 0 \(0: automatic\)"):
        igpt.ModelConfig(scan_unroll=-1)
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        igpt.ModelConfig.preset("huge")
    with pytest.raises(ValueError, match=r"Unknown ModelConfig fields \['n_embed'\]"):
        igpt.ModelConfig.from_dict({"n_embed": 4})


@pytest.mark.parametrize(
    "n_positions, query_block, block",
    [(64, 0, 64), (196, 0, 64), (256, 0, 64), (529, 0, 133), (1024, 0, 256), (4096, 0, 256)]
    + [(196, 48, 48), (4096, 1024, 1024)],
)
def test_automatic_attention_blocks_are_a_quarter_of_the_sequence_within_64_to_256(
    n_positions, query_block, block
):
    config = igpt.ModelConfig(n_positions=n_positions, query_block=query_block)
    assert config.attention_block == block


@pytest.mark.parametrize(
    "platform, n_layer, scan_unroll, unroll",
    [
        ("tpu", 4, 0, 4),
        ("gpu", 12, 0, 12),
        ("tpu", 13, 0, 1),
        ("gpu", 24, 0, 1),
        ("tpu", 48, 0, 1),
        ("cpu", 24, 0, 24),
        ("cpu", 48, 0, 48),
        ("cpu", 4, 1, 1),
        ("tpu", 24, 4, 4),
    ],
)
def test_automatic_unrolling_unrolls_on_cpus_and_up_to_12_layers_elsewhere(
    platform, n_layer, scan_unroll, unroll
):
    config = igpt.ModelConfig(n_layer=n_layer, scan_unroll=scan_unroll)
    assert config.layer_unroll(platform) == unroll


def _scan_unrolls(jaxpr) -> list[int]:
    """The unroll factor (iterations per loop trip) of every scan in a jaxpr, nested ones too."""
    unrolls = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            unrolls.append(eqn.params["unroll"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            unrolls += _scan_unrolls(sub)
    return unrolls


def test_the_traced_program_unrolls_for_the_platform_its_mesh_is_on():
    deep = TINY.replace(n_layer=13)

    def scans(config, platform=None):
        # Traced from the parameters' shapes alone: nothing is initialised or compiled.
        params = nn.meta.unbox(igpt.param_shapes(config))

        def trace():
            forward = igpt.ImageGPT(config).apply
            return jax.make_jaxpr(lambda p, ids: forward({"params": p}, ids))(params, _ids(config))

        if platform is None:  # no mesh: the default backend, this CPU
            return _scan_unrolls(trace().jaxpr)
        device = jax.sharding.AbstractDevice(device_kind="chip", num_cores=None, platform=platform)
        mesh = jax.sharding.AbstractMesh((1, 1, 1), MESH_AXES, abstract_device=device)
        with jax.sharding.use_abstract_mesh(mesh):  # as igpt.sharding traces a step for a mesh
            return _scan_unrolls(trace().jaxpr)

    assert scans(deep) == [13]  # every block unrolled
    assert scans(deep, "cpu") == [13]
    assert scans(deep, "tpu") == [1]  # a plan for TPU chips traced on this CPU keeps the scan
    assert scans(TINY, "tpu") == [3]  # shallow models are unrolled everywhere


def test_every_parameter_has_logical_axis_names():
    boxed = igpt.param_shapes(TINY.replace(use_bias=True, num_labels=3))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert leaves and all(len(x.names) == len(x.value.shape) for x in leaves)
    names = {n for x in leaves for n in x.names}
    assert {"layers", "vocab", "embed", "heads", "kv", "mlp", "classes"} <= names


def test_initialisation_follows_the_original_tf_code():
    config = igpt.ModelConfig(n_embd=256, n_layer=4, n_head=4, n_positions=64, num_labels=5)
    p = igpt.init_params(config, jax.random.key(0))
    d, layers = config.n_embd, config.n_layer
    assert np.all(p["lm_head"]["kernel"] == 0) and np.all(p["score"]["kernel"] == 0)
    for gain in (p["ln_f"]["scale"], p["h"]["ln_1"]["scale"], p["h"]["ln_2"]["scale"]):
        assert np.all(gain == 1)
    expected_std = {
        ("wte", "embedding"): 0.02,
        ("wpe", "embedding"): 0.01,
        ("h", "attn", "c_attn", "kernel"): 1 / np.sqrt(d),
        ("h", "attn", "c_proj", "kernel"): 1 / np.sqrt(d * layers),
        ("h", "mlp", "c_fc", "kernel"): 0.02,
        ("h", "mlp", "c_proj", "kernel"): 0.02,
    }
    for path, std in expected_std.items():
        x = p
        for key in path:
            x = x[key]
        assert np.std(np.asarray(x)) == pytest.approx(std, rel=0.05), path


def test_outputs_have_transformers_shapes():
    config = TINY.replace(num_labels=7)
    params = random_igpt_params(config)
    out = igpt.ImageGPT(config).apply({"params": params}, _ids(config, 3, 10))
    assert out.logits.shape == (3, 10, 512) and out.logits.dtype == jnp.float32
    assert len(out.hidden_states) == config.n_layer + 1
    assert all(h.shape == (3, 10, 32) for h in out.hidden_states)
    assert out.class_logits.shape == (3, 7)


def test_logits_at_t_do_not_depend_on_later_inputs():
    # Position s only enters through wpe[s]: d logits[t] / d wpe[s] must vanish for s > t.
    config = TINY.replace(n_positions=12)
    params = random_igpt_params(config)
    ids = _ids(config, 1)

    def logits_from_wpe(wpe):
        p = {**params, "wpe": {"embedding": wpe}}
        return igpt.ImageGPT(config).apply({"params": p}, ids).logits[0].sum(-1)

    jac_TxSxD = jax.jacrev(logits_from_wpe)(params["wpe"]["embedding"])
    influence_TxS = np.abs(np.asarray(jac_TxSxD)).sum(-1)
    future = np.triu(np.ones_like(influence_TxS, dtype=bool), k=1)
    assert np.all(influence_TxS[future] == 0)
    assert np.all(influence_TxS[~future] > 0)


@pytest.mark.parametrize("chunks", [(1, 1, 1), (5, 1, 1, 3, 1), (17, 19)])
def test_cached_decode_equals_full_forward(chunks):
    config = TINY.replace(scale_attn_by_inverse_layer_idx=True, use_bias=True)
    params = random_igpt_params(config)
    model = igpt.ImageGPT(config)
    length = sum(chunks)
    ids = _ids(config, 2, length)
    full = model.apply({"params": params}, ids).logits

    cache = igpt.init_cache(config, batch_size=2, length=length)
    pieces, start = [], 0
    for n in chunks:
        variables = {"params": params, "cache": cache}
        chunk = ids[:, start : start + n]
        out, variables = model.apply(variables, chunk, decode=True, mutable=["cache"])
        cache = variables["cache"]
        pieces.append(out.logits)
        start += n
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)
    assert int(cache["position"]) == length


def test_cache_length_is_checked():
    with pytest.raises(ValueError, match="cache length 99"):
        igpt.init_cache(TINY, batch_size=1, length=99)


def test_norm_gains_receive_gradients():
    # transformers 4.x multiplied by `weight.data`, silently freezing the gains.
    params = random_igpt_params(TINY)
    ids = _ids(TINY)

    def loss(p):
        return next_token_loss(igpt.ImageGPT(TINY).apply({"params": p}, ids).logits, ids)

    grads = jax.grad(loss)(params)
    for gain in (grads["ln_f"]["scale"], grads["h"]["ln_1"]["scale"], grads["h"]["ln_2"]["scale"]):
        assert np.all(np.abs(np.asarray(gain)).sum(-1) > 0)


@pytest.mark.parametrize(
    "change",
    [
        {"remat": True},
        {"scan_unroll": 1},  # TINY's 3 blocks are unrolled by default: the scan
        {"scan_unroll": 2},
        {"scan_unroll": 99},
        {"query_block": 5},  # 8 blocks, the last one short
        {"query_block": 5, "objective": "bert"},  # every block reads every key
    ],
)
def test_speed_settings_change_neither_outputs_nor_gradients(change):
    base = TINY.replace(objective=change.get("objective", "ar"))
    params = random_igpt_params(TINY)
    ids = _ids(TINY)

    def loss(config, p):
        out = igpt.ImageGPT(config).apply({"params": p}, ids)
        return next_token_loss(out.logits, ids) + 0.1 * jnp.mean(out.hidden_states[1] ** 2)

    plain = jax.jit(jax.value_and_grad(lambda p: loss(base, p)))(params)
    changed = jax.jit(jax.value_and_grad(lambda p: loss(base.replace(**change), p)))(params)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
    jax.tree.map(close, plain, changed)


def test_bfloat16_compute_stays_close_to_float32():
    params = random_igpt_params(TINY)
    ids = _ids(TINY)
    exact = igpt.ImageGPT(TINY).apply({"params": params}, ids).logits
    bf16 = igpt.ImageGPT(TINY.replace(dtype="bfloat16")).apply({"params": params}, ids).logits
    assert bf16.dtype == jnp.float32
    exact_p, bf16_p = jax.nn.softmax(exact), jax.nn.softmax(bf16)
    assert float(jnp.max(jnp.abs(exact_p - bf16_p))) < 0.02


def test_dropout_only_when_not_deterministic():
    config = TINY.replace(attn_pdrop=0.5, resid_pdrop=0.5, embd_pdrop=0.5)
    params = random_igpt_params(config)
    model, ids = igpt.ImageGPT(config), _ids(config)
    a = model.apply({"params": params}, ids).logits
    b = model.apply({"params": params}, ids).logits
    c = model.apply(
        {"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(1)}
    ).logits
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_dot_product_attention_option_matches_the_default():
    # On GPUs this path runs cuDNN's fused kernel; here, JAX's XLA implementation.
    params = random_igpt_params(TINY)
    ids = _ids(TINY)
    exact = igpt.ImageGPT(TINY).apply({"params": params}, ids).logits
    fused = igpt.ImageGPT(TINY.replace(attention="dot_product")).apply({"params": params}, ids)
    np.testing.assert_allclose(fused.logits, exact, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="supports neither attn_pdrop"):
        TINY.replace(attention="dot_product", attn_pdrop=0.1)


def test_bfloat16_keeps_float32_logits_and_a_converted_models_loss():
    from reference_models import random_hf_model

    hf = random_hf_model(seed=5, n_embd=64, n_layer=3, n_head=4, n_positions=64)
    config, params = _converted(hf)
    ids = _ids(config, batch=4)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = igpt.ImageGPT(config.replace(dtype=dtype)).apply({"params": params}, ids)
        losses[dtype] = float(next_token_loss(out.logits, ids))
        if dtype == "bfloat16":  # accumulated in float32, not rounded to bf16
            logits = np.asarray(out.logits)
            rounded = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
            assert out.logits.dtype == jnp.float32 and np.mean(logits != rounded) > 0.5
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.01


def _converted(hf):
    from igpt.convert import CAUSAL_LM, config_from_hf, params_from_hf

    config, _ = config_from_hf(hf.config.to_dict() | {"architectures": [CAUSAL_LM]})
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return config, params_from_hf(config, tensors, CAUSAL_LM)


def test_bad_input_ids_are_clear_errors():
    params = igpt.init_params(TINY, jax.random.key(0))
    too_long = jnp.zeros((1, TINY.n_positions + 1), jnp.int32)
    with pytest.raises(ValueError, match="more than n_positions"):
        igpt.ImageGPT(TINY).apply({"params": params}, too_long)
    with pytest.raises(ValueError, match=r"ids must lie in 0\.\.511"):
        igpt.complete(TINY, params, jax.random.key(0), np.full((1, TINY.n_positions), 512))


def test_default_norm_epsilon_is_transformers_default():
    from transformers import ImageGPTConfig

    assert igpt.ModelConfig().layer_norm_epsilon == ImageGPTConfig().layer_norm_epsilon == 1e-5
