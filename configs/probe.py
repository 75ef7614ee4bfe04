"""Linear probes on every layer of a checkpoint (the paper's figure of accuracy by layer).

ARG is comma-separated key=value pairs (all optional):
  dataset=digits|cifar10   digits (default): the splits of configs/digits.py and its test split;
                           cifar10: 45k/5k/10k, for the converted openai/imagegpt-small
  labels_per_class=N       the paper's low-data probes: N training labels per class (4 or 25)

  python scripts/probe.py --config=configs/probe.py --config.init_from=runs/digits \
      --workdir=runs/digits-probe
  python scripts/probe.py --config=configs/probe.py:dataset=cifar10,labels_per_class=4 \
      --config.init_from=models/igpt-s --workdir=runs/cifar10-probe-4
"""

from igpt.train.config import parse_arg, probe_defaults

# dataset -> (train, val, test, default checkpoint, batch size)
DATASETS = {
    "digits": ("digits:train[:1100]", "digits:train[1100:]", "digits:test", "", 128),
    "cifar10": (
        "tfds:cifar10:train[:90%]",
        "tfds:cifar10:train[90%:]",
        "tfds:cifar10:test",
        "openai/imagegpt-small",
        64,
    ),
}


def get_config(arg=None):
    """The probe config for ARG (see the module docstring)."""
    arg = parse_arg(arg, dataset="digits", labels_per_class=0)
    if arg.dataset not in DATASETS:
        raise ValueError(f"dataset={arg.dataset!r}: choose one of {sorted(DATASETS)}")
    train, val, test, checkpoint, batch_size = DATASETS[arg.dataset]
    c = probe_defaults()
    c.init_from = checkpoint
    c.labels_per_class = arg.labels_per_class
    c.data.train, c.data.val, c.data.test = train, val, test
    c.batch_size = batch_size
    return c
