"""Pretraining with the paper's recipe.

ARG is comma-separated key=value pairs (all optional):
  dataset=cifar10|imagenet32|imagenet64|folder   (default cifar10)
  model=s|m|l|xl|tiny|mini|cifar-small          (default s; the paper's sizes)
  folder=PATH                                    image folder for dataset=folder
  runlocal                                       shrink everything for a quick CPU check

  python scripts/train.py --config configs/pretrain.py:dataset=imagenet32,model=m --workdir W
"""

from igpt.train.config import model_fields, parse_arg, pretrain_defaults

# dataset -> (train spec, eval spec, side, augmentation, warmup epochs)
DATASETS = {
    "cifar10": ("tfds:cifar10:train[:90%]", "tfds:cifar10:train[90%:]", 32, "none", 1.0),
    "imagenet32": (
        "tfds:imagenet_resized/32x32:train",
        "tfds:imagenet_resized/32x32:validation",
        32,
        "none",
        1.0,
    ),
    "imagenet64": (
        "tfds:imagenet_resized/64x64:train",
        "tfds:imagenet_resized/64x64:validation",
        64,
        "none",
        1.0,
    ),
    "folder": ("folder:{folder}[:95%]", "folder:{folder}[95%:]", 32, "random_resized_crop", 1.0),
}

# Peak learning rates from the paper's sweep (iGPT-S: 0.003; larger models use smaller ones).
LEARNING_RATES = {"s": 3e-3, "m": 1e-3, "l": 1e-3, "xl": 3e-4}


def get_config(arg=None):
    """The pretraining config for ARG (see the module docstring)."""
    arg = parse_arg(arg, dataset="cifar10", model="s", folder="", runlocal=False)
    if arg.dataset not in DATASETS:
        raise ValueError(f"dataset={arg.dataset!r}: choose one of {sorted(DATASETS)}")
    train, eval_, side, augment, warmup = DATASETS[arg.dataset]
    config = pretrain_defaults()
    config.data.train = train.format(folder=arg.folder)
    config.data.val = eval_.format(folder=arg.folder)
    config.data.image_size = side
    config.data.augment = augment
    config.optimizer.warmup_epochs = warmup
    config.optimizer.learning_rate = LEARNING_RATES.get(arg.model, 3e-3)
    config.model = model_fields(arg.model, side)
    if arg.model == "xl":  # the paper's XL ran batch 64 for 2M steps
        config.batch_size, config.num_steps = 64, 2_000_000
    if arg.runlocal:
        config.model = model_fields("tiny", side)
        config.batch_size = 8
        config.num_steps = 20
        config.log_every = config.eval_every = config.checkpoint_every = 10
        config.data.palette_pixels = 20_000
    return config
