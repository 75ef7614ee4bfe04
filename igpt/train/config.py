"""The fields every training config has, with their defaults; configs/*.py start from these.

The defaults are the paper's pretraining recipe (REFERENCE.md "Training recipe"); a config file
changes what its experiment needs and `--config.KEY=VALUE` changes the rest. Every config uses
one vocabulary: `data.train` / `data.val` / `data.test` for the splits, `init_from` for the
model a run starts from.
"""

from __future__ import annotations

import math

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
    c.data.center_crop = False  # evaluate on the central square (the paper's ImageNet eval)
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
    c.optimizer.grad_clip = 0.0  # clip the global gradient norm (0 = off, the paper: no clipping)
    c.optimizer.warmup_epochs = 1.0  # linear warmup length in epochs of the training set
    c.optimizer.schedule = "cosine"  # cosine (to 0 at num_steps) | constant (after warmup)

    c.mesh_shape = (-1, 1, 1)  # devices along (data, fsdp, tensor); -1 = all remaining
    # logical axis -> mesh axes (igpt.sharding); "" or () for replicated
    c.sharding_rules = rules_to_config(DEFAULT_RULES)

    c.log_every = 50  # steps between progress lines and metric records
    c.eval_every = 5000  # steps between validation passes and sample grids (0 = only at end)
    c.checkpoint_every = 1000  # steps between checkpoints (also on SIGTERM and at the end)
    c.keep_checkpoints = 3  # how many recent checkpoints to keep (0 = all)

    c.sample = ml_collections.ConfigDict()
    c.sample.num_samples = 16  # images in each sample grid (0 = no pictures at evaluations)
    c.sample.num_completions = 4  # half-image completions per validation image (4 images)
    c.sample.temperature = 1.0  # sampling temperature
    c.sample.top_k = 0  # sample among the k most likely colours (0 = all)
    return c


def finetune_defaults() -> ml_collections.ConfigDict:
    """A fine-tuning config with the paper's settings (section 3.4): the joint loss, Adam at a
    constant rate with no warmup and no clipping, early stopping on validation accuracy. The
    architecture is the `init_from` model's: `model` only sets the classifier size and what
    may change from pretraining (dtypes, dropout, remat, scan unrolling, query blocks)."""
    c = pretrain_defaults()
    c.init_from = ""  # required: igpt model dir, training workdir or transformers dir
    defaults = c.model
    c.model = ml_collections.ConfigDict()  # changes to the init_from model (see above)
    c.model.num_labels = 10  # classes of the classifier head
    changeable = ("dtype", "param_dtype", "remat", "scan_unroll", "query_block")
    for field in changeable + ("attn_pdrop", "resid_pdrop", "embd_pdrop"):
        c.model[field] = defaults[field]
    c.data.val = ""  # required: early stopping and the choice of rate and step
    c.data.image_size = 0  # the init_from model's resolution
    c.data.palette = "checkpoint"  # the init_from model's colours (or a .npy / transformers dir)

    c.finetune = ml_collections.ConfigDict()
    c.finetune.generative_weight = 1.0  # weight of L_gen (0: L_clf alone)
    c.finetune.classification_weight = 1.0  # weight of L_clf
    c.finetune.patience = 5  # stop after this many evaluations without a better val accuracy
    # The paper searches the rate again: one run per rate in WORKDIR/lr_<rate>, the best on
    # val; () = one run at optimizer.learning_rate in WORKDIR.
    c.finetune.learning_rates = ()
    c.finetune.refit_on = ""  # train+val images for the final refit ("" = test the best run)
    # BERT models: test predictions average the class probabilities over this many random
    # masks (the paper's ensemble; validation passes use one mask).
    c.finetune.ensemble_masks = 4

    c.optimizer.schedule = "constant"  # no cosine when fine-tuning (paper)
    c.optimizer.warmup_epochs = 0.0  # and no warmup
    c.optimizer.learning_rate = 3e-4  # 10x below iGPT-S pretraining (0.003)
    c.sample.num_samples = 0  # no sample grids while fine-tuning
    return c


def probe_defaults() -> ml_collections.ConfigDict:
    """A linear-probe config with the paper's protocol (section 3.1, 4.7)."""
    c = ml_collections.ConfigDict()
    # igpt model dir, training workdir (latest checkpoint) or transformers dir / hub id
    c.init_from = ""
    c.layers = ()  # layers to probe, 0 (embeddings) .. n_layer (final norm); () = all
    c.concat_layers = ()  # also probe these layers' features concatenated (e.g. (2, 3, 4))
    c.labels_per_class = 0  # low-data probes: training labels kept per class; 0 = all
    c.num_subsets = 5  # low-data probes: random labelled subsets, reported as mean +- std
    c.baseline = True  # also probe the raw pixels of the same splits, at the model's resolution
    c.baseline_sizes = ()  # ... and at these resolutions too (e.g. (28,) for the originals)

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # source spec (see igpt.data) the probes are fitted on
    c.data.val = ""  # chooses each layer's L2 strength and the best layer
    c.data.test = ""  # reported only
    c.data.palette = ""  # "" = the checkpoint's own palette; or a .npy / transformers dir
    c.data.center_crop = False  # features of the central square (the paper's ImageNet eval)

    c.batch_size = 128  # global batch of the feature extraction forward passes
    c.mesh_shape = (-1, 1, 1)  # devices along (data, fsdp, tensor), as in training
    c.features_dir = ""  # feature stores ("" = WORKDIR/features); reused across runs
    # Host memory the probes' features may take: splits whose features fit (4 copies) are
    # read into memory, larger ones are streamed from their stores and fitted by SGD.
    c.host_memory_mb = 4096

    c.probe = ml_collections.ConfigDict()
    # L2 strengths on the mean loss (scikit-learn's C = 1 / (l2 * num_train)); best on val
    c.probe.l2_grid = (1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
    c.probe.solver = "auto"  # lbfgs (full batch) | sgd (mini-batch) | auto (by size)
    c.probe.full_batch_max = 1 << 28  # auto: lbfgs up to this many feature values
    c.probe.max_iter = 1000  # L-BFGS iterations at most
    c.probe.tol = 1e-5  # L-BFGS stops when the gradient norm is below this
    c.probe.sgd_epochs = 30  # SGD passes over the training features (the step count)
    c.probe.sgd_batch_size = 1024  # SGD mini-batch
    # SGD peak rates, cosine-decayed to 0, each tried with each L2 (the best pair on val). The
    # paper swept 30, 10, 3, 1, ... on raw features; igpt standardises features first.
    c.probe.sgd_learning_rates = (1.0, 0.3, 0.1, 0.03)
    c.probe.sgd_momentum = 0.9  # SGD momentum
    c.probe.seed = 0  # SGD batch order; low-data subsets are drawn with seeds seed, seed+1, ...
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


def _check(problems: list, ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def validate(config: ml_collections.ConfigDict) -> None:
    """Check every value of a run config whose mistake would otherwise surface late (after
    the palette fit, at the first checkpoint or evaluation) or not at all; one line naming
    each bad field. Runs before anything is written to the workdir."""
    from igpt.data.augment import Augment  # the data package imports nothing of this module

    p: list[str] = []
    c, opt = config, config.optimizer
    _check(p, c.batch_size >= 1, f"batch_size={c.batch_size} must be >= 1")
    _check(p, c.grad_accum_steps >= 1, f"grad_accum_steps={c.grad_accum_steps} must be >= 1")
    if c.batch_size >= 1 and c.grad_accum_steps >= 1:
        _check(
            p,
            c.batch_size % c.grad_accum_steps == 0,
            f"batch_size={c.batch_size} must divide into grad_accum_steps="
            f"{c.grad_accum_steps} micro-batches",
        )
    _check(p, c.num_steps >= 0, f"num_steps={c.num_steps} must be >= 0")
    _check(p, c.log_every >= 1, f"log_every={c.log_every} must be >= 1")
    _check(p, c.checkpoint_every >= 1, f"checkpoint_every={c.checkpoint_every} must be >= 1")
    _check(p, c.eval_every >= 0, f"eval_every={c.eval_every} must be >= 0 (0 = only at the end)")
    _check(
        p,
        c.keep_checkpoints >= 0,
        f"keep_checkpoints={c.keep_checkpoints} must be >= 0 (0 = keep all)",
    )
    for name in ("learning_rate", "eps", "weight_decay", "grad_clip", "warmup_epochs"):
        value = opt[name]
        _check(
            p,
            math.isfinite(value) and value >= 0,
            f"optimizer.{name}={value} must be finite and >= 0",
        )
    for name in ("b1", "b2"):
        _check(p, 0 <= opt[name] < 1, f"optimizer.{name}={opt[name]} must be in [0, 1)")
    _check(
        p,
        opt.schedule in ("cosine", "constant"),
        f"optimizer.schedule={opt.schedule!r}: choose 'cosine' or 'constant'",
    )
    try:
        Augment.parse(c.data.augment)
    except ValueError as e:
        p.append(f"data.augment: {e}")
    _check(p, c.data.palette_pixels >= 1, f"data.palette_pixels={c.data.palette_pixels} >= 1")
    _check(p, bool(c.data.train), "data.train is empty: set --config.data.train=SPEC")
    s = c.sample
    _check(
        p,
        s.num_samples >= 0 and s.num_completions >= 1 and s.temperature >= 0 and s.top_k >= 0,
        "sample: num_samples >= 0, num_completions >= 1, temperature "
        ">= 0 and top_k >= 0 are needed",
    )
    if "finetune" in c:
        m = c.finetune.ensemble_masks
        _check(p, m >= 1, f"finetune.ensemble_masks={m} must be >= 1")
    if p:
        raise ValueError("Invalid config: " + "; ".join(p))
