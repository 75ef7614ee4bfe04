"""Opening models (igpt/loading.py): model dirs, workdirs and transformers dirs alike."""

import jax
import numpy as np
import pytest
from conftest import GREYS
from reference_models import random_hf_model, random_igpt_params

import igpt
from igpt.loading import read_palette
from igpt.sharding import make_mesh

CONFIG = igpt.ModelConfig(n_embd=32, n_layer=2, n_head=2, n_positions=16)


def test_model_directory_round_trip_and_atomic_overwrite(tmp_path):
    config = igpt.ModelConfig(n_embd=32, n_layer=2, n_head=2, n_positions=16)
    params = random_igpt_params(config)
    palette = np.linspace(-1, 1, 512 * 3, dtype=np.float32).reshape(512, 3)
    igpt.save_model(tmp_path / "m", config, params, palette)
    with pytest.raises(FileExistsError):
        igpt.save_model(tmp_path / "m", config, params)
    loaded = igpt.load_model(tmp_path / "m")
    assert loaded.config == config and loaded.kind == "model_dir"
    np.testing.assert_array_equal(loaded.palette, palette)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.params), strict=True):
        np.testing.assert_array_equal(a, b)
    igpt.save_model(tmp_path / "m", config, params, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging dirs left behind


def test_model_directory_with_wrong_config_is_a_clear_error(tmp_path):
    config = igpt.ModelConfig(n_embd=32, n_layer=2, n_head=2, n_positions=16)
    igpt.save_model(tmp_path / "m", config, random_igpt_params(config))
    config.replace(n_embd=64).save(tmp_path / "m" / "config.json")
    with pytest.raises(ValueError, match="do not match"):
        igpt.load_model(tmp_path / "m")


def test_every_kind_of_source_opens_to_the_same_model(tmp_path):
    hf = random_hf_model(seed=3, n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=17)
    hf.save_pretrained(tmp_path / "hf")
    igpt.ColorTokenizer(GREYS, size=8).save_pretrained(tmp_path / "hf")
    from_hf = igpt.load_model(tmp_path / "hf")
    assert from_hf.kind == "transformers" and from_hf.config.use_bias
    igpt.save_model(tmp_path / "m", from_hf.config, from_hf.params, from_hf.palette)
    from_dir = igpt.load_model(tmp_path / "m")
    assert from_dir.config == from_hf.config
    for loaded in (from_hf, from_dir):
        np.testing.assert_array_equal(loaded.palette, GREYS)
        np.testing.assert_array_equal(read_palette(loaded.path), GREYS)
    for a, b in zip(jax.tree.leaves(from_hf.params), jax.tree.leaves(from_dir.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_parameters_are_placed_on_a_mesh_when_asked(tmp_path):
    igpt.save_model(tmp_path / "m", CONFIG, random_igpt_params(CONFIG))
    mesh = make_mesh((-1, 1, 1))
    loaded = igpt.load_model(tmp_path / "m", mesh=mesh)
    for leaf in jax.tree.leaves(loaded.params):
        assert leaf.sharding.mesh == mesh


def test_model_dirs_written_before_the_palette_rename_still_load(tmp_path):
    igpt.save_model(tmp_path / "m", CONFIG, random_igpt_params(CONFIG), GREYS[:4])
    (tmp_path / "m" / "palette.npy").rename(tmp_path / "m" / "clusters.npy")
    np.testing.assert_array_equal(igpt.load_model(tmp_path / "m").palette, GREYS[:4])


def test_missing_sources_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        igpt.load_model(tmp_path / "nothing")
    (tmp_path / "w" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="without a checkpoint yet"):
        igpt.load_model(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_palette(tmp_path / "nothing.npy")
    igpt.save_model(tmp_path / "bare", CONFIG, random_igpt_params(CONFIG))
    with pytest.raises(FileNotFoundError, match="holds no palette"):
        read_palette(tmp_path / "bare")
