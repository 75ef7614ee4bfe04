"""igpt: ImageGPT in JAX/Flax."""

from igpt.checkpoint import load_model, load_pretrained, save_model
from igpt.config import ModelConfig
from igpt.convert import CheckpointMismatchError, load_hf, save_hf
from igpt.model import (
    ImageGPT,
    ModelOutput,
    count_params,
    init_cache,
    init_params,
    param_shapes,
)

__all__ = [
    "CheckpointMismatchError",
    "ImageGPT",
    "ModelConfig",
    "ModelOutput",
    "count_params",
    "init_cache",
    "init_params",
    "load_hf",
    "load_model",
    "load_pretrained",
    "param_shapes",
    "save_hf",
    "save_model",
]
