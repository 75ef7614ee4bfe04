"""Linear probes on every layer of a checkpoint (the paper's figure of accuracy by layer).

ARG is comma-separated key=value pairs (all optional):
  dataset=digits|cifar10   digits (default): the splits of configs/digits.py and its test split;
                           cifar10: 45k/5k/10k, for the converted openai/imagegpt-small
  labels_per_class=N       the paper's low-data probes: N training labels per class (4 or 25)

  python scripts/probe.py --config configs/probe.py --config.init_from=runs/digits \
      --workdir runs/digits-probe
  python scripts/probe.py --config configs/probe.py:dataset=cifar10,labels_per_class=4 \
      --config.init_from=models/igpt-s --workdir runs/cifar10-probe-4
"""

import ml_collections

from igpt.train.config import parse_arg

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
    c = ml_collections.ConfigDict()
    # igpt model dir, training workdir (latest checkpoint) or transformers dir / hub id
    c.init_from = checkpoint
    c.layers = ()  # layers to probe, 0 (embeddings) .. n_layer (final norm); () = all
    c.labels_per_class = arg.labels_per_class  # training labels kept per class; 0 = all
    c.baseline = True  # also probe the raw pixels of the same splits

    c.data = ml_collections.ConfigDict()
    c.data.train = train  # source spec (see igpt.data) the probes are fitted on
    c.data.val = val  # chooses each layer's L2 strength and the best layer
    c.data.test = test  # reported only
    c.data.palette = ""  # "" = the checkpoint's own palette; or a .npy / transformers dir

    c.batch_size = batch_size  # global batch of the feature extraction forward passes
    c.mesh_shape = (-1, 1, 1)  # devices along (data, fsdp, tensor), as in training
    c.features_dir = ""  # feature cache ("" = WORKDIR/features); reused across runs

    c.probe = ml_collections.ConfigDict()
    # L2 strengths on the mean loss (scikit-learn's C = 1 / (l2 * num_train)); best on val
    c.probe.l2_grid = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
    c.probe.solver = "auto"  # lbfgs (full batch) | sgd (mini-batch) | auto (by size)
    c.probe.full_batch_max = 1 << 28  # auto: lbfgs up to this many feature values
    c.probe.max_iter = 1000  # L-BFGS iterations at most
    c.probe.tol = 1e-5  # L-BFGS stops when the gradient norm is below this
    c.probe.sgd_epochs = 30  # SGD passes over the training features
    c.probe.sgd_batch_size = 1024  # SGD mini-batch
    c.probe.sgd_learning_rate = 0.1  # SGD peak rate, cosine-decayed to 0
    c.probe.sgd_momentum = 0.9  # SGD momentum
    c.probe.seed = 0  # SGD batch order and the labels_per_class subsample
    return c
