"""The transformers (PyTorch) side of `benchmarks/bench.py`: the same config and the same
weights (converted with `params_to_hf`), dropout 0, the same thread count as XLA's CPU pool.

Imports torch and transformers, so the harness loads this module only with --vs-hf.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

from benchmarks.bench import BETAS, LEARNING_RATE, Case, random_ids
from igpt.config import ModelConfig
from igpt.convert import config_to_hf, params_to_hf
from igpt.flops import forward_flops


def set_threads(threads: int) -> None:
    """Intra-op threads of torch (XLA:CPU uses one thread per core)."""
    torch.set_num_threads(threads)


def hf_model(config: ModelConfig, params: dict) -> ImageGPTForCausalImageModeling:
    """transformers' ImageGPT with igpt's weights, in eval mode."""
    fields = config_to_hf(config)
    fields.pop("architectures")
    fields.pop("model_type")
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(**fields))
    state = {k: torch.tensor(v) for k, v in params_to_hf(config, params).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _autocast(config: ModelConfig):
    """bfloat16 compute under torch's CPU autocast when igpt computes in bfloat16 (float32
    weights on both sides); a no-op for float32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.dtype == "bfloat16")


def forward_case(config: ModelConfig, params: dict, batch: int) -> Case:
    """Forward pass to logits under `torch.inference_mode`."""
    model = hf_model(config, params)
    ids = torch.from_numpy(random_ids(config, batch)).long()

    def run():
        with torch.inference_mode(), _autocast(config):
            return model(ids).logits

    flops = batch * forward_flops(config, config.n_positions)
    return Case("transformers", run, batch * config.n_positions, flops)


def train_case(config: ModelConfig, params: dict, batch: int, micro_batches: int = 1) -> Case:
    """transformers' own loss (`labels=input_ids`) and backward pass over `micro_batches`
    micro-batches, their gradients accumulated, then an AdamW step."""
    model = hf_model(config, params).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE, betas=BETAS, weight_decay=0.0
    )
    chunks = torch.from_numpy(random_ids(config, batch)).long().chunk(micro_batches)

    def run():
        total = 0.0
        for ids in chunks:
            with _autocast(config):
                loss = model(ids, labels=ids).loss / micro_batches
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    flops = 3 * batch * forward_flops(config, config.n_positions)
    return Case("transformers", run, batch * config.n_positions, flops)


def sample_case(config: ModelConfig, params: dict, batch: int, tokens: int, top_k: int) -> Case:
    """`generate(do_sample=True, top_k=..., use_cache=True)` of exactly `tokens` new tokens
    after SOS."""
    model = hf_model(config, params)
    sos = torch.full((batch, 1), config.sos_id, dtype=torch.long)

    def run():
        with torch.inference_mode(), _autocast(config):
            # An explicit mask: without one, generate guesses padding from the token ids.
            return model.generate(
                sos,
                attention_mask=torch.ones_like(sos),
                do_sample=True,
                top_k=top_k,
                use_cache=True,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
            )

    return Case("transformers", run, batch * tokens, batch * forward_flops(config, tokens))


def tokenize_case(palette: np.ndarray, images: np.ndarray) -> Case:
    """`ImageGPTImageProcessor` (PIL backend) to input_ids at the images' own size."""
    try:
        from transformers import ImageGPTImageProcessorPil as Processor
    except ImportError:  # older transformers: the PIL processor has the plain name
        from transformers import ImageGPTImageProcessor as Processor
    height, width = images.shape[1:3]
    processor = Processor(clusters=palette, size={"height": height, "width": width})
    batch = list(images)
    return Case(
        "transformers",
        lambda: processor(images=batch, return_tensors="np")["input_ids"],
        len(images),
    )
