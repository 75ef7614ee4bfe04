"""The BERT objective (paper section 2.1, OpenAI's model.py): what each position may see, the
masked-position loss, the masks, and the tools that must refuse a BERT model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import config_from
from test_train_step import TINY, _batch

import igpt
from igpt.losses import bert_masks, eval_masks, model_inputs
from igpt.sharding import global_batch, make_mesh
from igpt.train.config import pretrain_defaults
from igpt.train.step import (
    create_train_state,
    learning_rate_schedule,
    make_eval_step,
    make_optimizer,
    make_train_step,
    train_masks,
)

AR = igpt.ModelConfig(n_embd=32, n_layer=2, n_head=4, n_positions=8, vocab_size=17)
BERT = AR.replace(objective="bert")
TINY_BERT = TINY.replace(objective="bert")  # 8 devices against one: test_train_step.py


def _params(config, seed=0):
    """Random parameters with a non-zero output head (it starts at zero)."""
    params = igpt.init_params(config, jax.random.key(seed))
    kernel = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = 0.5 * jax.random.normal(jax.random.key(seed + 1), kernel.shape)
    return params


def _token_gradients(config, params, inputs, masked=None):
    """|d logits[i] / d wte row v| for every position i and vocabulary row v: (T, vocab)."""

    def logits(wte):
        p = params | {"wte": {"embedding": wte}}
        return igpt.ImageGPT(config).apply({"params": p}, inputs[None], masked=masked).logits[0]

    jacobian = jax.jit(jax.jacobian(logits))(params["wte"]["embedding"])  # (T, V, vocab, D)
    return np.abs(np.asarray(jacobian)).sum(axis=(1, 3))


# Eight distinct colours, so each wte row belongs to one position.
TOKENS = jnp.array([3, 11, 0, 7, 14, 5, 9, 1], jnp.int32)


def test_an_ar_prediction_never_depends_on_its_own_or_later_tokens():
    params = _params(AR)
    inputs = model_inputs(TOKENS[None], AR.sos_id)[0]  # what training feeds: SOS, tokens[:-1]
    all_grads = _token_gradients(AR, params, inputs)
    for i, grads in enumerate(all_grads):  # logits[i] predict tokens[i]
        assert grads[AR.sos_id] > 0
        for j, token in enumerate(np.asarray(TOKENS)):
            if j < i:
                assert grads[token] > 0, (i, j)
            else:  # its own token and every later one
                assert grads[token] == 0, (i, j)


def test_a_bert_prediction_depends_on_both_sides_and_never_on_its_masked_token():
    params = _params(BERT)
    masked = jnp.array([[False, False, True, False, False, True, False, False]])
    all_grads = _token_gradients(BERT, params, TOKENS, masked)
    for i in (2, 5):
        grads = all_grads[i]
        for j, token in enumerate(np.asarray(TOKENS)):
            if masked[0, j]:  # its own masked token, and the other masked one
                assert grads[token] == 0, (i, j)
            else:  # every visible token, before and after it
                assert grads[token] > 0, (i, j)


def test_masks_come_from_the_step_key_differ_per_step_and_mask_15_percent():
    rng = jax.random.key_data(jax.random.key(3))
    shape = (64, 256)
    first = np.asarray(train_masks(rng, 5, shape, 0.15))
    np.testing.assert_array_equal(first, np.asarray(train_masks(rng, 5, shape, 0.15)))
    assert (first != np.asarray(train_masks(rng, 6, shape, 0.15))).mean() > 0.2
    assert abs(first.mean() - 0.15) < 0.01  # 16,384 draws: 4 standard deviations is 0.011
    assert np.corrcoef(first[:, :-1].ravel(), first[:, 1:].ravel())[0, 1] < 0.05  # independent
    # a row's mask does not depend on the rows beside it
    np.testing.assert_array_equal(first[:8], np.asarray(train_masks(rng, 5, (8, 256), 0.15)))


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, tokens, masked):
    return igpt.ImageGPT(config).apply({"params": params}, tokens, masked=masked).logits


def _reference_bert_loss(config, params, tokens, masked):
    """The paper's BERT loss in numpy: per example the mean cross-entropy of the original ids
    at its masked positions, then the mean over examples (with any masked position)."""
    logits = np.asarray(_logits(config, params, tokens, masked), np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tokens, masked = np.asarray(tokens), np.asarray(masked)
    nll = -np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
    per_example = [nll[b][masked[b]].mean() for b in range(len(tokens)) if masked[b].any()]
    return float(np.mean(per_example)), float(nll[masked].mean())


def _state_and_step(config, grad_accum_steps=1):
    opt = pretrain_defaults().optimizer
    schedule = learning_rate_schedule(opt, 2, 10)
    tx = make_optimizer(opt, schedule)
    mesh = make_mesh((1, 1, 1))
    state = create_train_state(config, tx, mesh, seed=0).replace(params=_params(config))
    step = make_train_step(config, tx, schedule, mesh, grad_accum_steps=grad_accum_steps)
    return state, step, mesh


def test_the_train_step_loss_is_the_masked_positions_cross_entropy():
    state, step, mesh = _state_and_step(TINY_BERT)
    params, batch = state.params, _batch(8, TINY_BERT)
    masked = train_masks(np.asarray(state.rng), 0, batch["tokens"].shape, TINY_BERT.mask_prob)
    objective, per_token = _reference_bert_loss(TINY_BERT, params, batch["tokens"], masked)

    value, grads = _paper_objective_and_gradient(TINY_BERT, params, batch["tokens"], masked)
    assert float(value) == pytest.approx(objective, rel=1e-5)
    _, metrics = step(state, global_batch(batch, mesh))
    assert float(metrics["loss"]) == pytest.approx(per_token, rel=1e-5)  # nats per masked token
    assert float(metrics["grad_norm"]) == pytest.approx(float(_global_norm(grads)), rel=1e-4)


def _paper_objective_and_gradient(config, params, tokens, masked):
    """The BERT objective over the whole batch, written out in jax (for its gradient): each
    example's mean cross-entropy over its masked positions, averaged over the examples with
    any."""

    def paper_objective(p):
        out = igpt.ImageGPT(config).apply({"params": p}, tokens, masked=masked)
        log_probs = jax.nn.log_softmax(out.logits)
        nll = -jnp.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
        w = masked.astype(jnp.float32)
        has = w.sum(1) > 0
        return ((nll * w).sum(1) / jnp.maximum(w.sum(1), 1) * has).sum() / has.sum()

    return jax.jit(jax.value_and_grad(paper_objective))(params)


def test_each_accumulated_micro_batch_has_its_own_masks():
    state, step, mesh = _state_and_step(TINY_BERT, grad_accum_steps=2)
    batch = _batch(8, TINY_BERT)
    nll = tokens = 0.0
    for i in range(2):  # micro-batch i holds every second example from i
        micro = batch["tokens"][i::2]
        masked = train_masks(np.asarray(state.rng), 0, micro.shape, 0.15, micro_batch=i)
        _, per_token = _reference_bert_loss(TINY_BERT, state.params, micro, masked)
        nll, tokens = nll + per_token * np.asarray(masked).sum(), tokens + np.asarray(masked).sum()
    _, metrics = step(state, global_batch(batch, mesh))
    assert float(metrics["loss"]) == pytest.approx(nll / tokens, rel=1e-5)


def test_accumulated_micro_batches_give_the_whole_batchs_gradient():
    # At 5% per position, 44% of 16-token examples have no masked position, so the two
    # micro-batches hold different numbers of the examples the objective averages over (1 and
    # 4 here): a mean of the micro-batches' own objectives would weigh them differently.
    config = TINY_BERT.replace(mask_prob=0.05)
    state, step, mesh = _state_and_step(config, grad_accum_steps=2)
    batch = _batch(8, config)
    masked = np.zeros(batch["tokens"].shape, bool)
    for i in range(2):  # micro-batch i holds every second example from i, with its own masks
        shape = (4, config.n_positions)
        masked[i::2] = train_masks(np.asarray(state.rng), 0, shape, 0.05, micro_batch=i)
    assert [masked[i::2].any(axis=1).sum() for i in range(2)] == [1, 4]
    _, grads = _paper_objective_and_gradient(config, state.params, batch["tokens"], masked)
    _, metrics = step(state, global_batch(batch, mesh))
    assert float(metrics["grad_norm"]) == pytest.approx(float(_global_norm(grads)), rel=1e-4)


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_evaluation_counts_masked_positions_only_with_masks_fixed_by_example_index():
    params = _params(TINY_BERT)
    mesh = make_mesh((1, 1, 1))
    batch = _batch(8, TINY_BERT) | {"index": np.arange(100, 108, dtype=np.int32)}
    sums = jax.device_get(make_eval_step(TINY_BERT, mesh)(params, global_batch(batch, mesh)))
    masked = eval_masks(jnp.asarray(batch["index"]), 16, TINY_BERT.mask_prob)
    _, per_token = _reference_bert_loss(TINY_BERT, params, batch["tokens"], masked)
    assert sums["tokens"] == np.asarray(masked).sum()
    assert sums["nll"] / sums["tokens"] == pytest.approx(per_token, rel=1e-5)

    # The same examples in another batch order get the same masks, hence the same sums.
    order = np.arange(8)[::-1]
    shuffled = {k: v[order] for k, v in batch.items()}
    again = jax.device_get(make_eval_step(TINY_BERT, mesh)(params, global_batch(shuffled, mesh)))
    assert again["nll"] == pytest.approx(sums["nll"], rel=1e-5)


def test_a_fine_tuned_bert_classifier_averages_class_probabilities_over_masks():
    config = TINY_BERT.replace(num_labels=10)
    params = _params(config)
    params["score"]["kernel"] = jax.random.normal(jax.random.key(7), (32, 10))
    mesh = make_mesh((1, 1, 1))
    batch = _batch(8, config) | {"index": np.arange(8, dtype=np.int32)}
    sums = jax.device_get(make_eval_step(config, mesh, 3)(params, global_batch(batch, mesh)))

    probs = []
    apply = jax.jit(igpt.ImageGPT(config).apply)
    for k in range(3):
        masked = eval_masks(jnp.arange(8), 16, config.mask_prob, k)
        out = apply({"params": params}, batch["tokens"], masked=masked)
        probs.append(np.asarray(jax.nn.softmax(out.class_logits)))
    mean = np.mean(probs, axis=0)
    label = batch["label"]
    assert sums["correct"] == (mean.argmax(-1) == label).sum()
    assert sums["correct_one_mask"] == (probs[0].argmax(-1) == label).sum()
    assert sums["clf_nll"] == pytest.approx(-np.log(mean[np.arange(8), label]).sum(), rel=1e-5)
    assert sums["examples"] == 8


def test_sampling_and_export_refuse_a_bert_model(tmp_path):
    params = igpt.init_params(BERT, jax.random.key(0))
    with pytest.raises(ValueError, match="BERT model .* no pixel-by-pixel distribution"):
        igpt.sample(BERT, params, jax.random.key(0), num_samples=1)
    with pytest.raises(ValueError, match="transformers has no BERT ImageGPT"):
        igpt.save_hf(BERT, params, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(ValueError, match="no decoding mode"):
        igpt.init_cache(BERT, 1)


def test_masked_positions_are_refused_by_an_ar_model():
    params = igpt.init_params(AR, jax.random.key(0))
    with pytest.raises(ValueError, match="masked positions are for objective='bert'"):
        igpt.ImageGPT(AR).apply({"params": params}, TOKENS[None], masked=TOKENS[None] > 5)


def test_objective_and_mask_rate_are_checked():
    with pytest.raises(ValueError, match="objective='mlm' is not 'ar' or 'bert'"):
        AR.replace(objective="mlm")
    with pytest.raises(ValueError, match=r"mask_prob=1.0 must be in \(0, 1\)"):
        BERT.replace(mask_prob=1.0)


def test_bert_masks_depend_only_on_key_and_row():
    key = jax.random.key(0)
    a = bert_masks(key, jnp.array([4, 9]), 32, 0.5)
    b = bert_masks(key, jnp.array([9, 1, 4]), 32, 0.5)
    np.testing.assert_array_equal(a[0], b[2])
    np.testing.assert_array_equal(a[1], b[0])


def test_the_digits_job_runs_as_bert_and_its_run_resumes_bit_for_bit(tmp_path):
    from igpt.train.pretrain import pretrain

    small = {
        "model.objective": "bert",
        "model.n_embd": "32",
        "model.n_layer": "2",
        "model.n_head": "2",
        "model.n_inner": "128",
        "batch_size": "16",
        "log_every": "10",
        "eval_every": "20",
        "checkpoint_every": "10",
        "data.palette_pixels": "20000",
        "optimizer.schedule": "constant",  # so that stopping at 10 changes no learning rate
    }
    straight = pretrain(config_from("digits.py", small | {"num_steps": "20"}), tmp_path / "a")
    pretrain(config_from("digits.py", small | {"num_steps": "10"}), tmp_path / "b")
    resumed = pretrain(config_from("digits.py", small | {"num_steps": "20"}), tmp_path / "b")
    assert straight == resumed
    for x, y in zip(
        jax.tree.leaves(igpt.load_model(tmp_path / "a").params),
        jax.tree.leaves(igpt.load_model(tmp_path / "b").params),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
    assert igpt.load_model(tmp_path / "a").config.objective == "bert"
    fill_ins = sorted(p.name for p in (tmp_path / "a" / "samples").iterdir())
    assert fill_ins == ["fill_ins_0000020.png"]


def test_a_bert_model_fine_tunes_and_is_tested_with_the_mask_ensemble(tmp_path):
    from conftest import GREYS
    from test_finetune import SMALL

    from igpt.data import open_source
    from igpt.train.finetune import finetune

    config = igpt.ModelConfig(
        n_embd=32, n_layer=2, n_head=2, n_inner=128, n_positions=64, vocab_size=17,
        objective="bert",
    )  # fmt: skip
    pretrained = igpt.save_model(
        tmp_path / "m", config, igpt.init_params(config, jax.random.key(0)), GREYS
    )
    overrides = SMALL | {"init_from": str(pretrained), "num_steps": "40", "eval_every": "20"}
    results = finetune(config_from("finetune.py", overrides), tmp_path / "ft")
    best = igpt.load_model(tmp_path / "ft" / "best")
    assert best.config.objective == "bert" and best.config.num_labels == 10

    # The test figures recomputed from the best model, test image i with eval_masks(i, k).
    source = open_source("digits:test[:200]")
    images = np.stack([source[i]["image"] for i in range(len(source))])
    labels = np.asarray([source[i]["label"] for i in range(len(source))])
    ids = jnp.asarray(igpt.ColorTokenizer(best.palette, size=8).encode(images))
    apply = jax.jit(igpt.ImageGPT(best.config).apply)
    probs = [
        jax.nn.softmax(
            apply(
                {"params": best.params}, ids, masked=eval_masks(jnp.arange(len(ids)), 64, 0.15, k)
            ).class_logits
        )
        for k in range(4)  # finetune.ensemble_masks
    ]
    ensemble = np.mean(np.asarray(probs), axis=0).argmax(-1)
    assert results["test_accuracy"] == pytest.approx((ensemble == labels).mean(), abs=1e-6)
    one = np.asarray(probs[0]).argmax(-1)
    assert results["test_accuracy_one_mask"] == pytest.approx((one == labels).mean(), abs=1e-6)


def test_bert_probe_features_read_masked_inputs_whatever_the_batch(tmp_path):
    from conftest import GREYS

    from igpt.data import open_source
    from igpt.features import FeatureExtractor

    config = TINY_BERT.replace(n_positions=64, vocab_size=17)
    model_dir = igpt.save_model(tmp_path / "m", config, _params(config), GREYS)
    spec = "digits:test[:20]"
    by_8 = FeatureExtractor(model_dir, batch_size=8, features_dir=tmp_path / "a")
    by_16 = FeatureExtractor(model_dir, batch_size=16, features_dir=tmp_path / "b")
    by_8, by_16 = by_8.features(spec, [1, 2])[0], by_16.features(spec, [1, 2])[0]
    np.testing.assert_allclose(by_8[2][:], by_16[2][:], rtol=1e-5, atol=1e-6)

    # Layer 2 of a 2-layer model is the final norm's output averaged over positions, with
    # image i masked by eval_masks(i).
    source = open_source(spec)
    images = np.stack([source[i]["image"] for i in range(len(source))])
    ids = jnp.asarray(igpt.ColorTokenizer(GREYS, size=8).encode(images))
    masked = eval_masks(jnp.arange(len(ids)), 64, config.mask_prob)
    out = jax.jit(igpt.ImageGPT(config).apply)({"params": _params(config)}, ids, masked=masked)
    np.testing.assert_allclose(by_8[2][:], np.asarray(out.hidden_states[2]).mean(1), atol=1e-5)
