"""The converter against transformers' PyTorch ImageGPT: parity, round trips, bad checkpoints."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import run_script
from reference_models import random_hf_model, random_igpt_params
from safetensors.numpy import load_file, save_file
from transformers import ImageGPTForCausalImageModeling, ImageGPTForImageClassification

import igpt
from igpt.losses import next_token_loss

ROOT = Path(__file__).resolve().parents[1]


def _ids(n_positions, batch=2, seed=0, sos=True):
    ids = np.random.default_rng(seed).integers(0, 512, (batch, n_positions))
    if sos:
        ids[:, 0] = 512
    return ids


@pytest.mark.parametrize(
    "fields",
    [
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=64),
        dict(n_embd=48, n_layer=3, n_head=3, n_positions=36, n_inner=80),
        dict(n_embd=96, n_layer=4, n_head=8, n_positions=100, scale_attn_by_inverse_layer_idx=True),
        dict(n_embd=32, n_layer=2, n_head=2, n_positions=16, reorder_and_upcast_attn=True),
    ],
)
def test_causal_lm_matches_transformers(tmp_path, fields):
    hf = random_hf_model(seed=len(fields), **fields)
    hf.save_pretrained(tmp_path)
    config, params, palette = igpt.load_hf(tmp_path)
    assert palette is None and config.use_bias

    ids = _ids(fields["n_positions"])
    with torch.no_grad():
        ref = hf(torch.tensor(ids), labels=torch.tensor(ids), output_hidden_states=True)
    out = igpt.ImageGPT(config).apply({"params": params}, jnp.asarray(ids))

    np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=1e-4, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)
    loss = next_token_loss(out.logits, jnp.asarray(ids))
    assert float(loss) == pytest.approx(float(ref.loss), abs=1e-5)


def test_classifier_matches_transformers(tmp_path):
    hf = random_hf_model(seed=3, num_labels=5, n_embd=64, n_layer=3, n_head=4, n_positions=49)
    hf.save_pretrained(tmp_path)
    config, params, _ = igpt.load_hf(tmp_path)
    assert config.num_labels == 5
    assert np.all(params["lm_head"]["kernel"] == 0)  # transformers' classifier has no LM head

    ids = _ids(49, batch=3, sos=False)  # the classifier sees processor ids without SOS
    with torch.no_grad():
        ref = hf(torch.tensor(ids), output_hidden_states=True)
    out = igpt.ImageGPT(config).apply({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(out.class_logits, ref.logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.hidden_states[-1], ref.hidden_states[-1].numpy(), atol=1e-4)


def _tensors(directory):
    return load_file(str(Path(directory) / "model.safetensors"))


@pytest.mark.parametrize("num_labels", [0, 4])
def test_transformers_igpt_transformers_round_trip_is_exact(tmp_path, num_labels):
    hf = random_hf_model(seed=5, num_labels=num_labels, n_inner=100)
    hf.save_pretrained(tmp_path / "a")
    palette = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
    config, params, _ = igpt.load_hf(tmp_path / "a")
    igpt.save_hf(config, params, tmp_path / "b", palette=palette)

    before, after = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert sorted(before) == sorted(after)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    _, _, palette_back = igpt.load_hf(tmp_path / "b")
    np.testing.assert_array_equal(palette_back, palette)

    cls = ImageGPTForImageClassification if num_labels else ImageGPTForCausalImageModeling
    reloaded = cls.from_pretrained(tmp_path / "b").eval()
    ids = torch.tensor(_ids(64))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), hf(ids).logits.numpy())


def test_pytorch_bin_with_mask_buffers_loads_like_safetensors(tmp_path):
    hf = random_hf_model(seed=6)
    hf.save_pretrained(tmp_path / "st")
    config, expected, _ = igpt.load_hf(tmp_path / "st")

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    state = hf.state_dict()
    n = config.n_positions
    for i in range(config.n_layer):  # what old pytorch_model.bin files carry
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, n, n, dtype=bool))
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")

    _, params, _ = igpt.load_hf(tmp_path / "bin")
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_base_model_checkpoint_loads(tmp_path):
    hf = random_hf_model(seed=7)
    hf.transformer.save_pretrained(tmp_path)  # an ImageGPTModel: keys without "transformer."
    config, params, _ = igpt.load_hf(tmp_path)
    ids = _ids(64)
    with torch.no_grad():
        ref = hf.transformer(torch.tensor(ids)).last_hidden_state.numpy()
    out = igpt.ImageGPT(config).apply({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(out.hidden_states[-1], ref, atol=1e-4)


def _corrupt(tmp_path, edit):
    random_hf_model(seed=8).save_pretrained(tmp_path)
    tensors = _tensors(tmp_path)
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"), {"format": "pt"})


def test_wrong_shape_names_key_expected_and_found(tmp_path):
    def widen(t):
        t["transformer.h.1.mlp.c_fc.weight"] = np.zeros((64, 200), np.float32)

    _corrupt(tmp_path, widen)
    with pytest.raises(igpt.CheckpointMismatchError) as e:
        igpt.load_hf(tmp_path)
    expected = "transformer.h.1.mlp.c_fc.weight: expected shape (64, 256), found (64, 200)"
    assert expected in str(e.value)


def test_missing_and_unexpected_keys_are_errors(tmp_path):
    def rename(t):
        t["transformer.h.0.ln_2.gain"] = t.pop("transformer.h.0.ln_2.weight")

    _corrupt(tmp_path, rename)
    with pytest.raises(igpt.CheckpointMismatchError) as e:
        igpt.load_hf(tmp_path)
    assert "missing keys [transformer.h.0.ln_2.weight]" in str(e.value)
    assert "unexpected keys [transformer.h.0.ln_2.gain]" in str(e.value)


def test_offline_hub_id_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="Could not fetch 'openai/imagegpt-small'.*offline"):
        igpt.load_hf("openai/imagegpt-small")
    with pytest.raises(FileNotFoundError, match="not a directory of a transformers"):
        igpt.load_hf(tmp_path / "nothing" / "here")


def test_igpt_model_exports_to_transformers_with_same_predictions(tmp_path):
    # An igpt-trained model has no biases; transformers gets zero biases and the same function.
    config = igpt.ModelConfig(n_embd=32, n_layer=2, n_head=2, n_positions=25, num_labels=3)
    params = random_igpt_params(config)
    igpt.save_hf(config, params, tmp_path / "hf")
    hf = ImageGPTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(25, batch=4, sos=False)
    out = igpt.ImageGPT(config).apply({"params": params}, jnp.asarray(ids))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(out.class_logits, ref, atol=1e-4)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "ImageGPTForImageClassification"
    ]


def test_convert_cli_both_ways(tmp_path):
    hf = random_hf_model(seed=9)
    hf.save_pretrained(tmp_path / "hf")
    for way, src, out in (("from_hf", "hf", "ig"), ("to_hf", "ig", "back")):
        result = run_script("convert", f"--{way}={tmp_path / src}", f"--out={tmp_path / out}")
        assert result.returncode == 0, result.stderr
    before, after = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    bad = run_script("convert", f"--from_hf={tmp_path / 'nope'}", f"--out={tmp_path / 'x'}")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "not a directory of a transformers ImageGPT checkpoint" in bad.stderr
