"""What a training workdir records about its run, and the rules for starting it again.

`config.json` is the config the run was started with, written once and never overwritten. A
restart compares its config with it: a change that alters what the run computes (model, data,
palette, batch, optimizer and schedule, seed, loss weights) is refused with the list of
differences; the ones that do not (logging, evaluation and checkpoint intervals, the number of
steps, pictures, placement on the mesh) are allowed and recorded in `resumes.jsonl`, one line
per restart. `palette.npy` is the palette the run's tokens refer to.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from igpt import files
from igpt.config import ModelConfig
from igpt.kmeans import fit_palette, sample_pixels
from igpt.loading import PALETTE_FILE, read_palette
from igpt.train.config import finetune_defaults, pretrain_defaults

CONFIG_FILE = "config.json"
RESUMES_FILE = "resumes.jsonl"

# Settings a restart may change: how the run is watched, saved and placed, not what it computes.
MAY_CHANGE = (
    "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "num_steps", "sample",
    "mesh_shape", "sharding_rules", "data.worker_count", "data.skip_corrupt", "finetune.patience",
    "data.test", "model.remat", "model.attention", "model.scan_unroll",
    "model.query_block",
)  # fmt: skip


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _as_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())  # tuples become lists, as stored


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)


def _added_later(key: str, value) -> bool:
    """A setting the workdir's stored config lacks because igpt added it later, now at its
    default: the older code computed what that default computes (model.objective "ar")."""
    defaults = [_flat(_as_json(make())) for make in (pretrain_defaults, finetune_defaults)]
    return any(key in flat and flat[key] == value for flat in defaults)


def check_restart(
    config: ml_collections.ConfigDict, workdir: Path, latest_step: int | None
) -> None:
    """Compare `config` with the one `workdir` was started with (if any); raise a one-line
    ValueError for a change that alters the run, record the restart otherwise. On a first
    start, store the config."""
    path = workdir / CONFIG_FILE
    new = _as_json(config)
    if not path.exists():
        if jax.process_index() == 0:
            files.write_json(path, new)
        return
    old_flat, new_flat = _flat(json.loads(path.read_text())), _flat(new)
    changed = {
        key: [old_flat.get(key), new_flat.get(key)]
        for key in sorted(set(old_flat) | set(new_flat))
        if old_flat.get(key) != new_flat.get(key)
        and not (key not in old_flat and _added_later(key, new_flat[key]))
    }
    refused = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items() if not _may_change(k)]
    if latest_step is not None and config.num_steps < latest_step:
        refused.append(f"num_steps={config.num_steps} is below the workdir's step {latest_step}")
    if refused:
        start_over = "" if latest_step is not None else " (it has no checkpoint yet)"
        raise ValueError(
            f"cannot resume {workdir}{start_over} with a config that changes what the run "
            f"computes: {'; '.join(refused)}. Set those back, or use another --workdir"
        )
    if jax.process_index() == 0:
        record = {
            "time": time.time(),
            "host": socket.gethostname(),
            "step": latest_step,
            "changes": changed,
        }
        with open(workdir / RESUMES_FILE, "a") as file:
            file.write(json.dumps(record) + "\n")


def resolve_palette(
    config: ml_collections.ConfigDict, workdir: Path, model: ModelConfig, train_source
) -> np.ndarray:
    """The run's palette: the workdir's on a restart, else `data.palette`: "fit" (k-means on
    the training pixels), "checkpoint" (the palette of `init_from`) or a path (`read_palette`).

    Written to `workdir/palette.npy` so every later stage (resume, sampling, probing) uses
    exactly the palette the model was trained on. A restart whose requested palette file
    differs from the workdir's is an error, not a silent choice.
    """
    path = workdir / PALETTE_FILE
    spec, palette_size = config.data.palette, model.palette_size
    if spec == "fit":
        requested = None  # the same data, seed and pixel count fit the same palette
    elif spec == "checkpoint":
        if not config.init_from:
            raise ValueError("data.palette='checkpoint' needs --config.init_from=DIR")
        requested = read_palette(config.init_from)
    else:
        requested = read_palette(spec)
    if path.exists():
        palette = read_palette(path)
        if requested is not None and not np.array_equal(requested, palette):
            raise ValueError(
                f"data.palette={spec} differs from the palette {path} was trained with; "
                "use that palette, or another --workdir"
            )
    elif requested is not None:
        palette = requested
    else:
        pixels = sample_pixels(
            train_source, config.data.palette_pixels, size=model.image_side, seed=config.seed
        )
        palette, inertia = fit_palette(pixels, palette_size, seed=config.seed)
        print(f"fitted a {palette_size}-colour palette (inertia {inertia:.4g})", flush=True)
    if palette.shape[0] != palette_size:
        raise ValueError(
            f"The palette has {palette.shape[0]} colours but model.vocab_size="
            f"{palette_size + 1} needs {palette_size}; set --config.model.vocab_size="
            f"{palette.shape[0] + 1} or use another palette"
        )
    if jax.process_index() == 0 and not path.exists():
        files.save_npy(path, palette)
    return palette
