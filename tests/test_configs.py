"""Every config variant resolves and feeds its first batch, so a preset can never be broken
unseen (a misspelt augmentation once failed only after the palette fit)."""

import numpy as np
import pytest
from conftest import ROOT

import igpt
from igpt import data as data_lib
from igpt.cli import load_config
from igpt.data import ArraySource
from igpt.train.config import build_model_config, validate

PRETRAIN_DATASETS = ["cifar10", "imagenet32", "imagenet48", "imagenet64", "imagenet_resized32",
                     "imagenet_resized64", "folder"]  # fmt: skip
MODELS = ["s", "m", "l", "xl", "tiny", "mini", "cifar-small"]

PRETRAIN = [f"pretrain.py:dataset={d},model={m},folder=/data" for d in PRETRAIN_DATASETS
            for m in MODELS] + ["pretrain.py:runlocal", "digits.py",
                                "fashion_mnist.py", "fashion_mnist.py:task=pretrain"]  # fmt: skip
FINETUNE = ["finetune.py", "finetune.py:dataset=cifar10", "finetune.py:clf_only",
            "fashion_mnist.py:task=finetune"]  # fmt: skip
PROBE = ["probe.py", "probe.py:dataset=cifar10,labels_per_class=4", "fashion_mnist.py:task=probe",
         "fashion_mnist.py:task=probe,labels_per_class=10"]  # fmt: skip
# One variant per data pipeline (the model size does not change it).
PIPELINES = [f"pretrain.py:dataset={d},model=tiny,folder=/data" for d in PRETRAIN_DATASETS] + [
    "digits.py", "fashion_mnist.py"]  # fmt: skip


@pytest.fixture
def fake_sources(monkeypatch):
    """Every spec of a known kind opens as 40 random 48x64 labelled images."""
    opened = []

    def fake_open(spec, **kwargs):
        assert spec.split(":")[0] in ("tfds", "digits", "folder", "npz", "idx"), spec
        opened.append(spec)
        rng = np.random.default_rng(len(opened))
        images = rng.integers(0, 256, (40, 48, 64, 3), dtype=np.uint8)
        return ArraySource(images, rng.integers(0, 10, 40))

    monkeypatch.setattr(data_lib, "open_source", fake_open)
    return opened


def _first_batch(config, model, source_spec):
    # A 16-colour palette: the batch's shape does not depend on it, and its colour table is
    # quick to build.
    palette = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
    iterator = data_lib.make_train_iterator(
        data_lib.open_source(source_spec),
        igpt.ColorTokenizer(palette),
        global_batch_size=min(config.batch_size, 8),
        image_size=model.image_side,
        seed=config.seed,
        augment=config.data.augment,
    )
    return next(iterator)


def test_every_pretraining_config_resolves():
    for spec in PRETRAIN:
        config = load_config(str(ROOT / "configs" / spec))
        validate(config)
        build_model_config(config)


@pytest.mark.parametrize("spec", PIPELINES)
def test_every_pretraining_pipeline_feeds_a_batch(spec, fake_sources):
    config = load_config(str(ROOT / "configs" / spec))
    model = build_model_config(config)
    batch = _first_batch(config, model, config.data.train)
    assert batch["tokens"].shape == (min(config.batch_size, 8), model.n_positions)
    assert fake_sources == [config.data.train]


@pytest.mark.parametrize("spec", FINETUNE)
def test_finetuning_configs_resolve_over_a_pretrained_model(spec, fake_sources):
    config = load_config(str(ROOT / "configs" / spec))
    validate(config)
    base = igpt.ModelConfig.preset("tiny", n_positions=64 if "fashion" not in spec else 196)
    model = build_model_config(config, base)
    assert model.num_labels == 10 and model.n_embd == base.n_embd
    assert config.data.val and config.data.test
    batch = _first_batch(config, model, config.data.train)
    assert batch["tokens"].shape[1] == model.n_positions


@pytest.mark.parametrize("spec", PROBE)
def test_probe_configs_name_every_split(spec):
    from igpt.probe import settings_from_config

    config = load_config(str(ROOT / "configs" / spec))
    settings_from_config(config.probe)
    assert config.data.train and config.data.val and config.data.test
    assert config.num_subsets >= 1


@pytest.mark.parametrize("side", [32, 48, 64])
def test_imagenet_presets_follow_the_papers_data_protocol(side):
    """Paper section 3.1: random resized crops to train, the centre crop to evaluate, 4% of
    train held out for validation, ILSVRC validation as the test set; no gradient clipping."""
    config = load_config(str(ROOT / "configs" / f"pretrain.py:dataset=imagenet{side},model=s"))
    assert config.data.train == "tfds:imagenet2012:train[:96%]"
    assert config.data.val == "tfds:imagenet2012:train[96%:]"
    assert config.data.test == "tfds:imagenet2012:validation"
    assert config.data.augment == "imagenet" and config.data.center_crop
    assert config.data.image_size == side and config.optimizer.grad_clip == 0
