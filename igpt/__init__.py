"""igpt: ImageGPT in JAX/Flax.

The names below are imported on first use, so `import igpt` (and the entry points, which must
set up the process before JAX starts) stay fast.
"""

import importlib

_EXPORTS = {
    "CheckpointMismatchError": "igpt.convert",
    "ColorTokenizer": "igpt.tokenizer",
    "ImageGPT": "igpt.model",
    "ModelConfig": "igpt.config",
    "ModelOutput": "igpt.model",
    "complete": "igpt.sampling",
    "count_params": "igpt.model",
    "fit_palette": "igpt.kmeans",
    "init_cache": "igpt.model",
    "init_params": "igpt.model",
    "load_hf": "igpt.convert",
    "LoadedModel": "igpt.loading",
    "load_model": "igpt.loading",
    "read_palette": "igpt.loading",
    "param_shapes": "igpt.model",
    "sample": "igpt.sampling",
    "sample_pixels": "igpt.kmeans",
    "save_hf": "igpt.convert",
    "save_model": "igpt.loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'igpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return __all__
