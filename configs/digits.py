"""The README main job: a tiny iGPT on scikit-learn's 8x8 digits, fully offline on a CPU.

A 16-colour palette is fitted to the digits' grey levels, then a 4-layer model is pretrained
at 8x8 (64 tokens per image) for about 3 minutes on 2 cores.

  python scripts/train.py --config configs/digits.py --workdir runs/digits
"""

from igpt.train.config import model_fields, pretrain_defaults


def get_config(arg=None):
    """The digits config (`arg` is unused)."""
    del arg
    config = pretrain_defaults()
    config.data.train = "digits:train[:1100]"
    config.data.val = "digits:train[1100:]"  # the digits test split is kept for probing
    config.data.image_size = 8
    config.data.palette_pixels = 50_000
    # 1,100 training images overfit a model without dropout within a few hundred steps (the
    # paper's no-dropout recipe assumes millions of images): small and with dropout 0.1.
    config.model = model_fields(
        "tiny", 8, vocab_size=17, n_embd=64, n_layer=4, n_head=4,
        attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1,
    )  # fmt: skip
    config.batch_size = 64
    config.num_steps = 800
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_epochs = 3.0
    config.optimizer.grad_clip = 1.0  # igpt's choice for this tiny, dropout-regularised job
    config.log_every = 100
    config.eval_every = 400
    config.checkpoint_every = 200
    config.sample.num_samples = 36
    return config
