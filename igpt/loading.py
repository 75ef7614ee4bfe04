"""Opening whatever model a user points at, and writing igpt model directories.

`load_model(path)` takes any of:
    an igpt model directory   config.json, params/ (orbax), palette.npy (written by save_model)
    a training workdir        its latest checkpoint (or a given step) and its palette.npy
    a transformers checkpoint a directory, or a hub id such as "openai/imagegpt-small"
and returns one `LoadedModel`, optionally with the parameters placed on a device mesh.
`read_palette(path)` reads the palette of any of those, or of a `.npy` file.

A model directory is written beside its destination and renamed into place, so a crash never
leaves a half-written model where a complete one was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn
from jax.sharding import Mesh

from igpt import convert, files
from igpt.config import ModelConfig
from igpt.model import param_shapes
from igpt.sharding import Rules, abstract_params, param_shardings, place
from igpt.tokenizer import ColorTokenizer
from igpt.train import checkpoints

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
PALETTE_FILE = "palette.npy"
_OLD_PALETTE_FILE = "clusters.npy"  # model directories written before the palette rename

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model as `load_model` found it.

    config: the architecture. params: the parameter tree (on the mesh when one was given).
    palette: (K, 3) float32 colours the ids refer to, or None when the source has none.
    kind: "model_dir", "workdir" or "transformers". step: the training step of a workdir.
    """

    config: ModelConfig
    params: dict
    palette: np.ndarray | None
    path: str
    kind: str
    step: int | None = None


def is_model_dir(path: str | os.PathLike) -> bool:
    """True if `path` is an igpt model directory."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def is_workdir(path: str | os.PathLike) -> bool:
    """True if `path` is a training workdir: it has a checkpoints directory, or a run's
    config.json (a run killed before its first checkpoint)."""
    path = Path(path)
    if (path / checkpoints.CHECKPOINTS_DIR).is_dir():
        return True
    try:
        return "optimizer" in json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False


def load_model(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    step: int | None = None,
) -> LoadedModel:
    """Open an igpt model dir, a training workdir or a transformers checkpoint (dir or hub id).

    With `mesh`, parameters are placed in their shardings (by the model's logical axes and
    `rules`, default `igpt.sharding.DEFAULT_RULES`) as they are read; otherwise they land on
    the first local device. `step` picks a workdir checkpoint (default: the latest).
    """
    path = Path(path)

    def shardings_for(config: ModelConfig):
        if mesh is not None:
            return param_shardings(config, mesh, rules)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: device, nn.meta.unbox(param_shapes(config)))

    if is_model_dir(path):
        config = ModelConfig.load(path / CONFIG_FILE)
        params = _restore(path / PARAMS_DIR, config, shardings_for(config))
        return LoadedModel(config, params, _model_dir_palette(path), str(path), "model_dir")
    if is_workdir(path):
        step, config, params = _read_workdir(path, step, shardings_for)
        return LoadedModel(config, params, _model_dir_palette(path), str(path), "workdir", step)
    text = str(path)
    if not path.exists() and not (_HUB_ID.match(text) and not Path(path.parts[0]).exists()):
        raise FileNotFoundError(
            f"{text!r} does not exist (expected an igpt model dir, a training workdir, a "
            "transformers checkpoint dir or a hub id such as openai/imagegpt-small)"
        )
    config, params, palette = convert.load_hf(path)
    return LoadedModel(config, place(params, shardings_for(config)), palette, text, "transformers")


def _read_workdir(path: Path, step: int | None, shardings_for):
    """`(step, config, params)` of checkpoint `step`, or of the newest one that reads (saying
    which damaged ones it passed over)."""
    steps = [step] if step is not None else sorted(checkpoints.all_steps(path), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{path} is a training workdir without a checkpoint yet")
    for candidate in steps:
        try:
            config = checkpoints.read_model_config(path, candidate)
            return (
                candidate,
                config,
                checkpoints.read_params(path, candidate, config, shardings_for(config)),
            )
        except Exception as error:  # noqa: BLE001 - any failure to read means damage
            if step is not None:
                raise ValueError(f"checkpoint {step} of {path} cannot be read: "
                                 f"{checkpoints.describe(error)}") from None  # fmt: skip
            print(
                f"checkpoint {candidate} of {path} is damaged "
                f"({checkpoints.describe(error)}); trying the one before",
                flush=True,
            )
    raise ValueError(f"no checkpoint of {path} can be read (steps {sorted(steps)})")


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The architecture of whatever `load_model` would open, without reading parameters."""
    path = Path(path)
    if is_model_dir(path):
        return ModelConfig.load(path / CONFIG_FILE)
    if is_workdir(path) and checkpoints.latest_step(path) is not None:
        return checkpoints.read_model_config(path, checkpoints.latest_step(path))
    return load_model(path).config  # a transformers checkpoint (or an error saying why not)


def _restore(directory: Path, config: ModelConfig, shardings) -> dict:
    try:
        return ocp.StandardCheckpointer().restore(directory, abstract_params(config, shardings))
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"The parameters in {directory} do not match the config beside them "
            f"({CONFIG_FILE}): {e}"
        ) from None


def _model_dir_palette(directory: Path) -> np.ndarray | None:
    for name in (PALETTE_FILE, _OLD_PALETTE_FILE):
        if (directory / name).exists():
            return _npy_palette(directory / name)
    return None


def _npy_palette(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"palette file {path} does not exist")
    return ColorTokenizer.from_npy(path).palette


def read_palette(path: str | os.PathLike) -> np.ndarray:
    """The palette of a `.npy` file, an igpt model dir, a training workdir or a transformers
    dir (or its preprocessor_config.json); a one-line error when there is none."""
    path = Path(path)
    if path.suffix == ".npy":
        return _npy_palette(path)
    if is_model_dir(path) or is_workdir(path):
        found = _model_dir_palette(path)  # a workdir keeps palette.npy at its top too
        if found is None:
            raise FileNotFoundError(f"{path} holds no palette ({PALETTE_FILE})")
        return found
    return ColorTokenizer.from_pretrained(path).palette


def save_model(
    directory: str | os.PathLike,
    config: ModelConfig,
    params: dict,
    palette: np.ndarray | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write an igpt model directory (atomically: built beside it, then renamed).

    With several processes, call it from one of them only, with the whole parameters."""
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True or choose another path")
    with files.atomic_path(directory) as staging:
        staging.mkdir()
        config.save(staging / CONFIG_FILE)
        if palette is not None:
            np.save(staging / PALETTE_FILE, np.asarray(palette, np.float32))
        # Only the calling process writes (host arrays), so orbax must not wait for the others.
        me = jax.process_index()
        only_me = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        checkpointer = ocp.StandardCheckpointer(multiprocessing_options=only_me)
        checkpointer.save(staging / PARAMS_DIR, jax.device_get(params))
        checkpointer.wait_until_finished()
    return directory
