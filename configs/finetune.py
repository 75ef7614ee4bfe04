"""Fine-tuning a pretrained iGPT as a classifier (paper: joint loss L_gen + L_clf, Adam at a
constant learning rate about 10x below pretraining, early stopping on validation accuracy).

The architecture is the `init_from` model's; `model` here only sets the classifier size and
what may change between pretraining and fine-tuning (dtypes, dropout, remat). The defaults
(igpt.train.config.finetune_defaults) are the paper's; `finetune.learning_rates` runs its
search of the rate, `finetune.refit_on` its refit on train+val.

ARG is comma-separated key=value pairs (all optional):
  dataset=digits|cifar10   digits (default): the splits of configs/digits.py and its test split;
                           cifar10: 45k/5k/10k with the paper's CIFAR augmentation (reflect-pad
                           4, random crop, flip), e.g. for the converted openai/imagegpt-small
  clf_only                 train on L_clf alone instead of the joint loss

  python scripts/finetune.py --config configs/finetune.py --config.init_from=runs/digits \
      --workdir runs/digits-finetune
"""

from igpt.train.config import finetune_defaults, parse_arg

# dataset -> (train, val, test, train+val for the refit, augmentation)
DATASETS = {
    # flips and 4-pixel crops would change 8x8 digits too much
    "digits": ("digits:train[:1100]", "digits:train[1100:]", "digits:test", "digits:train", "none"),
    "cifar10": (
        "tfds:cifar10:train[:90%]",
        "tfds:cifar10:train[90%:]",
        "tfds:cifar10:test",
        "tfds:cifar10:train",
        "cifar",
    ),
}


def get_config(arg=None):
    """The fine-tuning config for ARG (see the module docstring)."""
    arg = parse_arg(arg, dataset="digits", clf_only=False)
    if arg.dataset not in DATASETS:
        raise ValueError(f"dataset={arg.dataset!r}: choose one of {sorted(DATASETS)}")
    train, val, test, refit, augment = DATASETS[arg.dataset]
    c = finetune_defaults()
    c.data.train, c.data.val, c.data.test = train, val, test
    c.data.augment = augment
    c.finetune.generative_weight = 0.0 if arg.clf_only else 1.0
    c.finetune.refit_on = refit
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
        c.eval_every = 1000
        c.checkpoint_every = 1000
    return c
