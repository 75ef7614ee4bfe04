"""The README's main job (for now: what exists so far, end to end on this machine).

Builds a small igpt model, runs a forward pass, exports it as a transformers checkpoint and
an igpt model directory, and loads both back, under runs/demo/.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import igpt


def main() -> int:
    out = Path("runs/demo")
    for name in ("s", "m", "l"):
        n = igpt.count_params(igpt.param_shapes(igpt.ModelConfig.preset(name)))
        print(f"preset {name}: {n:,} parameters")
    config = igpt.ModelConfig.preset("tiny")
    params = igpt.init_params(config, jax.random.key(0))
    ids = jnp.full((2, config.n_positions), config.sos_id, jnp.int32)
    logits = igpt.ImageGPT(config).apply({"params": params}, ids).logits
    print(f"tiny model: {igpt.count_params(params):,} parameters, logits {logits.shape}")
    igpt.save_hf(config, params, out / "hf")
    igpt.save_model(out / "igpt", *igpt.load_hf(out / "hf")[:2], overwrite=True)
    config_back, params_back, _ = igpt.load_model(out / "igpt")
    final = igpt.ImageGPT(config).apply({"params": params}, ids).hidden_states[-1]
    final_back = igpt.ImageGPT(config_back).apply({"params": params_back}, ids).hidden_states[-1]
    error = float(np.max(np.abs(np.asarray(final) - np.asarray(final_back))))
    print(f"wrote {out}/hf (transformers) and {out}/igpt; max difference after round trip: {error}")
    return 0 if error < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
