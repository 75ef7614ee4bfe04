"""Models with random weights for tests: transformers' reference ImageGPT and igpt's own."""

import jax
import torch
from transformers import (
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
)

import igpt


def random_hf_model(seed: int = 0, num_labels: int = 0, noise: float = 0.1, **config):
    """A transformers ImageGPT in eval mode whose every weight, gain and bias has noise added,
    so no gain is 1 and no bias is 0 (a converter that dropped one would be caught)."""
    torch.manual_seed(seed)
    fields = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)
    fields |= dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0) | config
    if num_labels:
        hf_config = ImageGPTConfig(num_labels=num_labels, **fields)
        model = ImageGPTForImageClassification(hf_config)
    else:
        model = ImageGPTForCausalImageModeling(ImageGPTConfig(**fields))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(noise * torch.randn_like(param))
    return model.eval()


def random_igpt_params(config: igpt.ModelConfig, seed: int = 0, noise: float = 0.05) -> dict:
    """igpt's initialisation plus noise on every leaf, so the zero-initialised heads give
    non-trivial logits."""
    params = igpt.init_params(config, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [
        x + noise * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, noisy)
