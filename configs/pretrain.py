"""Pretraining with the paper's recipe (section 3.3 and REFERENCE.md "Training recipe").

ARG is comma-separated key=value pairs (all optional):
  dataset=cifar10|imagenet32|imagenet48|imagenet64|imagenet_resized32|imagenet_resized64|folder
                                (default cifar10)
  model=s|m|l|xl|tiny|mini|cifar-small   (default s; s/m/l/xl are the paper's sizes)
  folder=PATH                   full-size image folder (class subfolders) for dataset=folder
  runlocal                      shrink everything for a quick CPU check

  python scripts/train.py --config=configs/pretrain.py:dataset=imagenet32,model=m --workdir=W

ImageNet as the paper uses it (section 3.3): pretraining on random crops of the full-size
images (short side resized to U[256, 384], a random 224 x 224 crop, then down to the model
resolution: `augment="imagenet"`), evaluation on the centre crop (short side 224, centre 224:
`data.center_crop`), validation on 4% held out of train, the ILSVRC validation set as the
test set (`data.test`). `imagenet32/48/64` read tfds `imagenet2012` (the manual download,
prepared as array_record) and `folder` any folder of full-size images.
`imagenet_resized32/64` read tfds `imagenet_resized`, whole images already box-resized to
32 or 64: a fast approximation, not the paper's crops.
"""

from igpt.train.config import model_fields, parse_arg, pretrain_defaults

IMAGENET = ("tfds:imagenet2012:train[:96%]", "tfds:imagenet2012:train[96%:]",
            "tfds:imagenet2012:validation")  # fmt: skip
RESIZED = "tfds:imagenet_resized/{side}x{side}"
# dataset -> (train, val, test, side, augmentation, centre-crop evaluation)
DATASETS = {
    "cifar10": ("tfds:cifar10:train[:90%]", "tfds:cifar10:train[90%:]", "tfds:cifar10:test",
                32, "none", False),
    "imagenet32": (*IMAGENET, 32, "imagenet", True),
    "imagenet48": (*IMAGENET, 48, "imagenet", True),
    "imagenet64": (*IMAGENET, 64, "imagenet", True),
    "imagenet_resized32": (RESIZED.format(side=32) + ":train[:96%]",
                           RESIZED.format(side=32) + ":train[96%:]",
                           RESIZED.format(side=32) + ":validation", 32, "none", False),
    "imagenet_resized64": (RESIZED.format(side=64) + ":train[:96%]",
                           RESIZED.format(side=64) + ":train[96%:]",
                           RESIZED.format(side=64) + ":validation", 64, "none", False),
    "folder": ("folder:{folder}[:96%]", "folder:{folder}[96%:]", "", 32, "imagenet", True),
}  # fmt: skip

# Peak learning rates. The paper sweeps 0.01, 0.003, 0.001, ... per model (section 3.3) and
# reports 0.003 for iGPT-S; the others are igpt's guesses (smaller for larger models), to be
# swept again as the paper did.
LEARNING_RATES = {"s": 3e-3, "m": 1e-3, "l": 1e-3, "xl": 3e-4}


def get_config(arg=None):
    """The pretraining config for ARG (see the module docstring)."""
    arg = parse_arg(arg, dataset="cifar10", model="s", folder="", runlocal=False)
    if arg.dataset not in DATASETS:
        raise ValueError(f"dataset={arg.dataset!r}: choose one of {sorted(DATASETS)}")
    if arg.dataset == "folder" and not arg.folder:
        raise ValueError("dataset=folder needs folder=PATH (a folder of full-size images)")
    train, val, test, side, augment, center_crop = DATASETS[arg.dataset]
    config = pretrain_defaults()
    config.data.train = train.format(folder=arg.folder)
    config.data.val = val.format(folder=arg.folder)
    config.data.test = test
    config.data.image_size = side
    config.data.augment = augment
    config.data.center_crop = center_crop
    config.optimizer.learning_rate = LEARNING_RATES.get(arg.model, 3e-3)
    config.model = model_fields(arg.model, side)
    if arg.model == "xl":  # the paper's XL ran batch 64 for 2M steps (section 3.3)
        config.batch_size, config.num_steps = 64, 2_000_000
    if arg.runlocal:
        config.model = model_fields("tiny", side)
        config.batch_size = 8
        config.num_steps = 20
        config.log_every = config.eval_every = config.checkpoint_every = 10
        config.data.palette_pixels = 20_000
    return config
