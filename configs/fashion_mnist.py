"""The paper's findings on real images, offline: Fashion-MNIST (60,000 + 10,000 28x28 grey
clothing images in 10 classes), pretrained, probed by layer and fine-tuned on 2 CPU cores.

ARG is comma-separated key=value pairs (all optional):
  task=pretrain|probe|finetune   which stage's config (default pretrain)
  dir=PATH                       the four IDX files (default: where Debian's
                                 dataset-fashion-mnist puts them)
  labels_per_class=N             probe: the low-data probe (5 subsets of N labels per class)
  objective=ar|bert              pretrain: the paper's two objectives (default ar); probing
                                 and fine-tuning follow the objective of the model they read

Splits: train[:54000] to train, train[54000:] (6,000) for every choice (steps, L2, layer,
fine-tuning rate and step), test (10,000) only reported. The paper's "context reduction":
28x28 images are modelled at 14x14 (196 tokens), a context at which two CPU cores pretrain
the model in under half an hour.

  make fashion   (every stage, writing runs/fashion/; see the README's results table)
"""

import ml_collections

from igpt.train.config import (
    finetune_defaults,
    model_fields,
    parse_arg,
    pretrain_defaults,
    probe_defaults,
)

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
SIDE = 14
PALETTE_SIZE = 16  # grey levels of the palette fitted to the training pixels


def splits(directory: str) -> dict[str, str]:
    """The data specs of the three splits."""
    spec = f"idx:{directory}"
    return {
        "train": f"{spec}:train[:54000]",
        "val": f"{spec}:train[54000:]",
        "test": f"{spec}:test",
    }


def pretrain_config(directory: str, objective: str) -> ml_collections.ConfigDict:
    """Pretraining at 14x14 with the paper's recipe (Adam 0.9/0.95, warmup then cosine); the
    BERT run has the same model, steps and rate (the paper compares them so)."""
    data = splits(directory)
    c = pretrain_defaults()
    c.data.train, c.data.val = data["train"], data["val"]
    c.data.image_size = SIDE
    c.data.palette_pixels = 200_000
    c.model = model_fields(
        "tiny", SIDE, vocab_size=PALETTE_SIZE + 1, n_embd=128, n_layer=4, n_head=4,
        objective=objective,
    )  # fmt: skip
    c.batch_size = 64
    # Four micro-batches of 16 images, their gradients accumulated in the same compiled step:
    # a micro-batch's activations (16 x 196 x 128 floats, 1.6 MB) stay in a core's L2 cache
    # between the step's kernels, where the whole batch's did not. On 2 cores the step ran
    # 1.13x as fast, the loop with its data pipeline 1.10x. The gradient is the whole batch's
    # for either objective, up to rounding ("bert" draws each micro-batch's masks from its own
    # key).
    c.grad_accum_steps = 4
    c.num_steps = 2_000  # 2.4 epochs, about 23 minutes on 2 CPU cores
    c.optimizer.learning_rate = 3e-3  # the paper's iGPT-S rate
    c.optimizer.warmup_epochs = 0.25
    c.log_every = 100
    c.eval_every = 1_000
    c.checkpoint_every = 500
    c.sample.num_samples = 36
    return c


def probe_config(directory: str, labels_per_class: int) -> ml_collections.ConfigDict:
    """Probes of every layer, the paper's protocol, against raw pixels at 14x14 and 28x28."""
    data = splits(directory)
    c = probe_defaults()
    c.labels_per_class = labels_per_class
    c.baseline_sizes = (28,)
    # d=128 features are few beside 196 or 784 pixels: also probe the blocks' features together
    # (512), as the paper does for ImageNet; single layer or concatenation, chosen on val.
    c.concat_layers = (1, 2, 3, 4)
    c.data.train, c.data.val, c.data.test = data["train"], data["val"], data["test"]
    c.batch_size = 256
    return c


def finetune_config(directory: str) -> ml_collections.ConfigDict:
    """Fine-tuning with the joint loss, the rate and step chosen on validation."""
    data = splits(directory)
    c = finetune_defaults()
    c.data.train, c.data.val, c.data.test = data["train"], data["val"], data["test"]
    c.finetune.patience = 2
    c.finetune.learning_rates = (1e-3, 3e-4)  # about 3x and 10x below pretraining's 3e-3
    # No refit on train + val: a third run would take the stage past half an hour on 2 cores;
    # the test figure is the validation-chosen checkpoint's, trained on 54,000 images.
    c.batch_size = 32
    # 1.4 epochs per rate, about 40 minutes each on 2 CPU cores: at 800 steps (half an epoch)
    # validation accuracy was still rising at both rates and below the probes'.
    c.num_steps = 2400
    c.log_every = 100
    c.eval_every = 200
    c.checkpoint_every = 200
    return c


def get_config(arg=None):
    """The config of one stage (see the module docstring)."""
    arg = parse_arg(arg, task="pretrain", dir=DEBIAN_DIR, labels_per_class=0, objective="ar")
    if arg.task == "pretrain":
        return pretrain_config(arg.dir, arg.objective)
    if arg.task == "probe":
        return probe_config(arg.dir, arg.labels_per_class)
    if arg.task == "finetune":
        return finetune_config(arg.dir)
    raise ValueError(f"task={arg.task!r}: choose pretrain, probe or finetune")
