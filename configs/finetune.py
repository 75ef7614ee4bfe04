"""Fine-tuning a pretrained iGPT as a classifier (paper: joint loss L_gen + L_clf, Adam at a
constant learning rate about 10x below pretraining, early stopping on validation accuracy).

The architecture is the `init_from` model's; `model` here only sets the classifier size and
what may change between pretraining and fine-tuning (dtypes, dropout, remat).

ARG is comma-separated key=value pairs (all optional):
  dataset=digits|cifar10   digits (default): the splits of configs/digits.py and its test split;
                           cifar10: 45k/5k/10k with the paper's CIFAR augmentation (reflect-pad
                           4, random crop, flip), e.g. for the converted openai/imagegpt-small
  clf_only                 train on L_clf alone instead of the joint loss

  python scripts/finetune.py --config configs/finetune.py --config.init_from=runs/digits \
      --workdir runs/digits-finetune
"""

import ml_collections

from igpt.train.config import parse_arg, pretrain_defaults

# dataset -> (train, val, test, augmentation)
DATASETS = {
    # flips and 4-pixel crops would change 8x8 digits too much
    "digits": ("digits:train[:1100]", "digits:train[1100:]", "digits:test", "none"),
    "cifar10": (
        "tfds:cifar10:train[:90%]",
        "tfds:cifar10:train[90%:]",
        "tfds:cifar10:test",
        "cifar",
    ),
}


def get_config(arg=None):
    """The fine-tuning config for ARG (see the module docstring)."""
    arg = parse_arg(arg, dataset="digits", clf_only=False)
    if arg.dataset not in DATASETS:
        raise ValueError(f"dataset={arg.dataset!r}: choose one of {sorted(DATASETS)}")
    train, val, test, augment = DATASETS[arg.dataset]
    c = pretrain_defaults()
    c.init_from = ""  # required: igpt model dir, training workdir or transformers dir
    defaults = c.model
    c.model = ml_collections.ConfigDict()  # changes to the init_from model (see above)
    c.model.num_labels = 10  # classes of the classifier head
    for field in ("dtype", "param_dtype", "remat", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
        c.model[field] = defaults[field]
    c.data.train = train
    c.data.val = val  # validation split: early stopping and the best model
    c.data.test = test  # the best model's accuracy is reported on it ("" = none)
    c.data.image_size = 0  # the init_from model's resolution
    c.data.augment = augment
    c.data.palette = "checkpoint"  # the init_from model's colours (or a .npy / transformers dir)

    c.finetune = ml_collections.ConfigDict()
    c.finetune.generative_weight = 0.0 if arg.clf_only else 1.0  # weight of L_gen
    c.finetune.classification_weight = 1.0  # weight of L_clf
    c.finetune.patience = 5  # stop after this many evaluations without a better val accuracy

    c.optimizer.schedule = "constant"  # no cosine when fine-tuning (paper)
    c.sample.num_samples = 0  # no sample grids while fine-tuning
    c.optimizer.warmup_epochs = 1.0
    if arg.dataset == "digits":
        c.batch_size = 64
        c.num_steps = 1000
        c.optimizer.learning_rate = 3e-4  # 10x below configs/digits.py
        c.eval_every = 50
        c.checkpoint_every = 50
        c.log_every = 50
    else:
        c.batch_size = 128
        c.num_steps = 20_000  # about 57 epochs of 45k images; early stopping ends sooner
        c.optimizer.learning_rate = 3e-4  # 10x below iGPT-S pretraining (0.003)
        c.eval_every = 1000
        c.checkpoint_every = 1000
    return c
