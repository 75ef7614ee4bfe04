"""igpt model directories: the exported form of a model that sampling, probing, fine-tuning and
`init_from` load.

Layout of a directory:
    config.json    the ModelConfig
    params/        orbax checkpoint of the parameter tree
    clusters.npy   (K, 3) colour palette, when known

The directory is written beside its destination and renamed into place, so a crash never
leaves a half-written model where a complete one was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from igpt.checkpointing import is_workdir, load_workdir
from igpt.config import ModelConfig
from igpt.convert import load_hf
from igpt.model import param_shapes

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
CLUSTERS_FILE = "clusters.npy"


def is_model_dir(path: str | os.PathLike) -> bool:
    """True if `path` is an igpt model directory."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save_model(
    directory: str | os.PathLike,
    config: ModelConfig,
    params: dict,
    clusters: np.ndarray | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write an igpt model directory (atomically: built beside it, then renamed).

    With several processes, call it from one of them only, with the whole parameters."""
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True or choose another path")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        config.save(staging / CONFIG_FILE)
        if clusters is not None:
            np.save(staging / CLUSTERS_FILE, np.asarray(clusters, np.float32))
        # Only the calling process writes (host arrays), so orbax must not wait for the others.
        me = jax.process_index()
        only_me = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        checkpointer = ocp.StandardCheckpointer(multiprocessing_options=only_me)
        checkpointer.save(staging / PARAMS_DIR, jax.device_get(params))
        checkpointer.wait_until_finished()
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old / "model")
            os.replace(staging, directory)
            shutil.rmtree(old)
        else:
            os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


def load_model(
    directory: str | os.PathLike, *, shardings=None
) -> tuple[ModelConfig, dict, np.ndarray | None]:
    """Read an igpt model directory as `(config, params, clusters)`.

    `shardings` (a tree of `jax.sharding.Sharding` matching the parameters) places each array
    as it is read; by default arrays land on the default device.
    """
    directory = Path(directory).absolute()
    if not is_model_dir(directory):
        raise FileNotFoundError(
            f"{directory} is not an igpt model directory (no config.json + params/)"
        )
    config = ModelConfig.load(directory / CONFIG_FILE)
    shapes = nn.meta.unbox(param_shapes(config))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    try:
        params = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, target)
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"The parameters in {directory / PARAMS_DIR} do not match the config beside them "
            f"({CONFIG_FILE}): {e}"
        ) from None
    clusters_path = directory / CLUSTERS_FILE
    clusters = np.load(clusters_path) if clusters_path.exists() else None
    return config, params, clusters


def load_pretrained(path: str | os.PathLike) -> tuple[ModelConfig, dict, np.ndarray | None]:
    """`(config, params, clusters)` from an igpt model directory, a training workdir (its
    latest checkpoint), a transformers checkpoint directory or a hub id such as
    "openai/imagegpt-small"."""
    if is_model_dir(path):
        return load_model(path)
    if is_workdir(path):
        return load_workdir(path)
    return load_hf(path)
