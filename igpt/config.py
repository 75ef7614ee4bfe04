"""Model configuration: transformers' ImageGPTConfig field names plus what JAX training needs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp

PALETTE_SIZE = 512  # colour palette of the released models; vocab_size = PALETTE_SIZE + 1 (SOS)

# name -> (n_embd, n_layer, n_head, n_positions). S/M/L are the released openai/imagegpt-* models;
# XL was never released (its head count is not published: 24 heads keeps head_dim = 128).
# The research sizes are igpt's own, for CPU work and tests; cifar-small is minGPT's
# play_image CIFAR-10 model, not one of the paper's.
_PRESETS = {
    "s": (512, 24, 8, 1024),
    "m": (1024, 36, 8, 1024),
    "l": (1536, 48, 16, 1024),
    "xl": (3072, 60, 24, 4096),
    "tiny": (128, 4, 4, 256),
    "mini": (256, 8, 8, 1024),
    "cifar-small": (256, 12, 8, 1024),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of an ImageGPT model.

    Field names follow transformers' `ImageGPTConfig` so a config.json maps one to one.
    """

    vocab_size: int = PALETTE_SIZE + 1  # palette colours + 1 start-of-sequence token (last id)
    n_positions: int = 1024  # sequence length = image height * width
    n_embd: int = 512  # model width d
    n_layer: int = 24  # number of transformer blocks
    n_head: int = 8  # attention heads; head_dim = n_embd // n_head
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5  # added to mean(x^2) inside the RMS norm
    scale_attn_by_inverse_layer_idx: bool = False  # also divide scores by (layer index + 1)
    reorder_and_upcast_attn: bool = False  # kept for transformers parity; scores are fp32 anyway
    attn_pdrop: float = 0.0  # dropout on attention probabilities (the paper uses none)
    resid_pdrop: float = 0.0  # dropout on each residual branch output
    embd_pdrop: float = 0.0  # dropout on the input embeddings
    use_bias: bool = False  # dense biases: False for models trained here, True for HF checkpoints
    num_labels: int = 0  # classifier head size; 0 = no classifier head
    # The dtype every matrix product rounds its inputs to; products accumulate and return
    # float32, in the gradient too, and activations, norms and softmax stay float32
    # (igpt.precision). bfloat16 trains and evaluates fastest on accelerators and on CPUs with
    # AVX-512 BF16 (there, XLA:CPU samples faster in float32: README, Benchmarks).
    dtype: str = "float32"
    param_dtype: str = "float32"  # storage dtype of parameters
    remat: bool = False  # recompute each block's activations in the backward pass to save memory
    # Blocks per iteration of the layer scan. A speed setting, not the maths. 1 compiles one
    # block however deep the model, which deep models on accelerators need; more compile longer
    # and spare XLA the scan's per-layer slicing and stacking. 0 is automatic (`layer_unroll`):
    # on CPUs every block; elsewhere every block of models of up to 12 layers (the research
    # sizes) and the scan for deeper ones, the released S/M/L. On 2-core CPUs unrolled d=128
    # models trained 19-24% faster at 4 layers, 24-34% at 8 and 4-27% at 12, the 8-layer d=256
    # `mini` 15-21%; S 30% faster in float32 and 71% in bfloat16 (Intel Xeon with AMX; 8% in
    # float32 on an AMD EPYC), where writing each layer's residuals into the scan's stacks took
    # as long as copying them whole, for 2.5-5 s more compilation. Unrolled, XLA keeps more
    # temporaries: 13-17% more for mini and cifar-small at batch 8, 5% more for S at batch 2 in
    # float32 and 13% fewer in bfloat16.
    scan_unroll: int = 0
    # Queries per block of training-length attention (a causal block reads keys only up to its
    # own end). A speed setting, not the maths. 0 stands for a quarter of the sequence (four
    # blocks), rounded up, but at least 64 and at most 256 (`attention_block`): on 2-core CPUs
    # that was the fastest of 64, 128 and 256 at every length measured. A d=128 model at 14x14
    # and 16x16 trains 15-35% faster in blocks of 64 than of 256 (less masked work, smaller
    # score blocks); at 529 tokens blocks of 128 were 2-5% faster than 64 and 3-15% than 256;
    # S at 1,024 tokens trained 13% slower in blocks of 64 than of 256.
    query_block: int = 0
    # "auto": igpt's fused CPU kernel (igpt/cpu_kernels.cc, built on first use; float32
    # whatever the compute dtype) for programs on CPUs without attention dropout, else "xla";
    # "xla": igpt's blockwise attention in XLA; "dot_product": jax.nn.dot_product_attention,
    # cuDNN's fused kernel on GPUs (no attention dropout or inverse-layer scaling there).
    attention: str = "auto"
    # The pretraining objective (paper section 2.1): "ar" predicts each pixel from the ones
    # before it (causal attention, SOS first); "bert" predicts masked pixels from all the
    # others (no causal mask, no SOS; see igpt.losses.bert_masks).
    objective: str = "ar"
    mask_prob: float = 0.15  # bert: probability that each position is masked (paper: 0.15)

    def __post_init__(self):
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.vocab_size < 2:
            problems.append(f"vocab_size={self.vocab_size} must be >= 2 (palette colours + SOS)")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                problems.append(f"{name}={getattr(self, name)!r} is not one of {sorted(_DTYPES)}")
        for name in ("attn_pdrop", "resid_pdrop", "embd_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.attention not in ("auto", "xla", "dot_product"):
            problems.append(f"attention={self.attention!r} is not 'auto', 'xla' or 'dot_product'")
        if self.attention == "dot_product" and (
            self.attn_pdrop or self.scale_attn_by_inverse_layer_idx
        ):
            problems.append(
                "attention='dot_product' supports neither attn_pdrop nor "
                "scale_attn_by_inverse_layer_idx; use attention='xla'"
            )
        if self.objective not in ("ar", "bert"):
            problems.append(f"objective={self.objective!r} is not 'ar' or 'bert'")
        if not 0.0 < self.mask_prob < 1.0:
            problems.append(f"mask_prob={self.mask_prob} must be in (0, 1)")
        if self.scan_unroll < 0:
            problems.append(f"scan_unroll={self.scan_unroll} must be >= 0 (0: automatic)")
        if self.query_block < 0:
            problems.append(f"query_block={self.query_block} must be >= 0 (0: automatic)")
        if self.num_labels < 0:
            problems.append(f"num_labels={self.num_labels} must be >= 0")
        if problems:
            raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

    def layer_unroll(self, platform: str) -> int:
        """Blocks per iteration of the layer scan in a program for `platform` ("cpu", "gpu",
        "tpu"): `scan_unroll`, or for 0 all of them on CPUs and elsewhere all of them up to 12
        layers and 1 beyond."""
        if self.scan_unroll:
            return self.scan_unroll
        return self.n_layer if platform == "cpu" or self.n_layer <= 12 else 1

    @property
    def attention_block(self) -> int:
        """Queries per attention block: `query_block`, or for 0 a quarter of the sequence
        (rounded up) within [64, 256]."""
        if self.query_block:
            return self.query_block
        return min(256, max(64, -(-self.n_positions // 4)))

    @property
    def palette_size(self) -> int:
        """Number of palette colours (output logits); the SOS token is id `palette_size`."""
        return self.vocab_size - 1

    @property
    def sos_id(self) -> int:
        """Id of the start-of-sequence token, the last row of the input embedding."""
        return self.vocab_size - 1

    @property
    def causal(self) -> bool:
        """Whether a position attends only to itself and earlier positions (objective "ar")."""
        return self.objective == "ar"

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        """Hidden width of the MLP."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def image_side(self) -> int:
        """Side of the square image whose raster fills the context."""
        side = math.isqrt(self.n_positions)
        if side * side != self.n_positions:
            raise ValueError(f"n_positions={self.n_positions} is not a square image size")
        return side

    @property
    def compute_dtype(self) -> jnp.dtype:
        """`dtype` as a jnp dtype."""
        return _DTYPES[self.dtype]

    @property
    def storage_dtype(self) -> jnp.dtype:
        """`param_dtype` as a jnp dtype."""
        return _DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named size: 's', 'm', 'l' (openai/imagegpt-*), 'xl', or 'tiny', 'mini', 'cifar-small'.

        `overrides` replace any field, e.g. `ModelConfig.preset("s", use_bias=True)`.
        """
        key = name.lower()
        if key not in _PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
        n_embd, n_layer, n_head, n_positions = _PRESETS[key]
        return cls(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions).replace(
            **overrides
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; an unknown field is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"Unknown ModelConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**fields)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read a config written by `save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))
