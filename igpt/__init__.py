"""igpt: ImageGPT in JAX/Flax."""

from igpt.checkpoint import load_model, load_pretrained, save_model
from igpt.config import ModelConfig
from igpt.convert import CheckpointMismatchError, load_hf, save_hf
from igpt.kmeans import fit_clusters, sample_pixels
from igpt.model import (
    ImageGPT,
    ModelOutput,
    count_params,
    init_cache,
    init_params,
    param_shapes,
)
from igpt.sampling import complete, sample
from igpt.tokenizer import ColorTokenizer

__all__ = [
    "CheckpointMismatchError",
    "ColorTokenizer",
    "ImageGPT",
    "ModelConfig",
    "ModelOutput",
    "count_params",
    "complete",
    "fit_clusters",
    "init_cache",
    "init_params",
    "load_hf",
    "load_model",
    "load_pretrained",
    "param_shapes",
    "sample",
    "sample_pixels",
    "save_hf",
    "save_model",
]
