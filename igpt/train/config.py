"""The fields every training config has, with their defaults; configs/*.py start from these.

The defaults are the paper's pretraining recipe (REFERENCE.md "Training recipe"); a config file
changes what its experiment needs and `--config.KEY=VALUE` changes the rest. Every config uses
one vocabulary: `data.train` / `data.val` / `data.test` for the splits, `init_from` for the
model a run starts from.
"""

from __future__ import annotations

import ml_collections

from igpt.config import ModelConfig
from igpt.sharding import DEFAULT_RULES


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse a config file's argument "key=value,flag,..." over typed `defaults`.

    A bare `flag` sets a boolean default to True. Unknown keys are errors listing valid ones.
    """
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, has_value, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r}; valid: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            parsed[key] = value.lower() in ("1", "true", "yes") if has_value else True
        else:
            parsed[key] = type(default)(value)
    return parsed


def model_fields(preset: str, image_size: int, **overrides) -> ml_collections.ConfigDict:
    """`config.model`: every ModelConfig field of a preset, at `image_size` x `image_size`."""
    model = ModelConfig.preset(preset, n_positions=image_size * image_size, **overrides)
    fields = model.to_dict()
    if fields["n_inner"] is None:  # a ConfigDict field keeps its type: store the actual width
        fields["n_inner"] = model.mlp_dim
    return ml_collections.ConfigDict(fields)


def pretrain_defaults() -> ml_collections.ConfigDict:
    """A complete pretraining config with the paper's settings for an iGPT-S on CIFAR-10."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds parameters, data order, augmentation and dropout
    c.model = model_fields("s", 32)  # ModelConfig fields (transformers names)
    c.init_from = ""  # igpt model dir, training workdir or transformers dir to start from

    c.data = ml_collections.ConfigDict()
    c.data.train = "tfds:cifar10:train[:90%]"  # source spec (see igpt.data): training images
    c.data.val = "tfds:cifar10:train[90%:]"  # validation images ("" = no evaluation)
    c.data.test = ""  # test images, only ever reported (fine-tuning's best model)
    c.data.image_size = 32  # model resolution, checked against model.n_positions (0 = the model's)
    c.data.augment = "none"  # none | flip | imagenet (random resized crop) | cifar (pad-crop-flip)
    c.data.palette = "fit"  # "fit" (k-means on training pixels), "checkpoint" (init_from's),
    #                         a .npy, or a transformers dir
    c.data.palette_pixels = 1_000_000  # pixels sampled to fit the palette
    c.data.skip_corrupt = False  # count and skip unreadable images instead of failing
    c.data.worker_count = 0  # grain worker processes (0 = in the main process)

    c.batch_size = 128  # global batch, split over processes and the mesh's data axes
    c.grad_accum_steps = 1  # micro-batches per step (batch_size must divide evenly)
    c.num_steps = 1_000_000  # optimizer steps

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 3e-3  # peak learning rate (paper: 0.003 for iGPT-S)
    c.optimizer.b1 = 0.9  # Adam beta1
    c.optimizer.b2 = 0.95  # Adam beta2 (0.999 caused loss spikes in the paper)
    c.optimizer.eps = 1e-8  # Adam epsilon
    c.optimizer.weight_decay = 0.0  # decoupled weight decay (the paper uses none)
    c.optimizer.grad_clip = 1.0  # clip the global gradient norm (0 = off)
    c.optimizer.warmup_epochs = 1.0  # linear warmup length in epochs of the training set
    c.optimizer.schedule = "cosine"  # cosine (to 0 at num_steps) | constant (after warmup)

    c.mesh_shape = (-1, 1, 1)  # devices along (data, fsdp, tensor); -1 = all remaining
    # logical axis -> mesh axes (igpt.sharding); "" or () for replicated
    c.sharding_rules = rules_to_config(DEFAULT_RULES)

    c.log_every = 50  # steps between progress lines and metric records
    c.eval_every = 5000  # steps between validation passes and sample grids (0 = only at end)
    c.checkpoint_every = 1000  # steps between checkpoints (also on SIGTERM and at the end)
    c.keep_checkpoints = 3  # how many recent checkpoints to keep

    c.sample = ml_collections.ConfigDict()
    c.sample.num_samples = 16  # images in each sample grid (0 = no pictures at evaluations)
    c.sample.num_completions = 4  # half-image completions per validation image (4 images)
    c.sample.temperature = 1.0  # sampling temperature
    c.sample.top_k = 0  # sample among the k most likely colours (0 = all)
    return c


def rules_to_config(rules) -> tuple:
    """Sharding rules as config data: (logical axis, mesh axes) pairs with tuples for several
    axes and "" for replicated (a ConfigDict field cannot hold None inside a tuple)."""
    return tuple((name, "" if axes is None else axes) for name, axes in rules)


def rules_from_config(rules) -> tuple:
    """Inverse of `rules_to_config`."""
    return tuple((name, axes or None) for name, axes in rules)


def build_model_config(
    config: ml_collections.ConfigDict, base: ModelConfig | None = None
) -> ModelConfig:
    """The ModelConfig of a run config, checked against the data resolution.

    With `base` (the architecture of the model a fine-tuning run starts from), `config.model`
    holds only the fields the run changes (classifier size, dtypes, dropout, remat).
    """
    fields = config.model.to_dict()
    model = base.replace(**fields) if base is not None else ModelConfig.from_dict(fields)
    side = config.data.image_size
    if side and model.n_positions != side * side:
        raise ValueError(
            f"model.n_positions={model.n_positions} but data.image_size={side} gives {side * side}"
            f" tokens; set --config.data.image_size={model.image_side}"
        )
    return model
