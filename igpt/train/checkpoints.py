"""Training checkpoints: orbax CheckpointManager over a run's workdir.

Each step directory holds four items: `params`, `train` (step, optimizer state, rng),
`data` (the data iterator's state, so a resumed run reads exactly the batches an uninterrupted
one would) and `model` (the ModelConfig, so the parameters load without the run config).
orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoint as the latest restorable one.

The data state is saved as JSON by process 0, not with grain's orbax handler: that handler
writes one file per process named by the process count, so a run could not resume on another
number of hosts, while igpt's iterator state (the next global batch) is the same for every
process and independent of their number (igpt.data.pipeline).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from igpt.config import ModelConfig
from igpt.sharding import abstract_params

CHECKPOINTS_DIR = "checkpoints"


class Checkpointer:
    """Saves and restores TrainStates and data iterator states under `workdir/checkpoints`."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3):
        """`keep`: how many of the newest checkpoints to keep; 0 keeps them all."""
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None, create=True, cleanup_tmp_directories=True
        )
        self.directory = Path(workdir).absolute() / CHECKPOINTS_DIR
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, state, data_state: dict, model_config: ModelConfig) -> None:
        """Start an asynchronous save of `state` at its step (returns once arrays are copied)."""
        step = int(state.step)
        train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train=ocp.args.StandardSave(train),
                data=ocp.args.JsonSave(data_state),
                model=ocp.args.JsonSave(model_config.to_dict()),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """`(state, data_state)` of checkpoint `step`, placed like `abstract_state`."""
        train = {
            "step": abstract_state.step,
            "opt_state": abstract_state.opt_state,
            "rng": abstract_state.rng,
        }
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state.params),
                train=ocp.args.StandardRestore(train),
                data=ocp.args.JsonRestore(),
            ),
        )
        t = restored["train"]
        state = abstract_state.replace(
            step=t["step"], params=restored["params"], opt_state=t["opt_state"], rng=t["rng"]
        )
        return state, restored["data"]

    def restore_latest(self, abstract_state) -> tuple[object, dict] | None:
        """`restore` of the newest checkpoint that restores, or None if there is none.

        A damaged checkpoint (a truncated array file, a missing item, garbled metadata) is
        reported, moved aside to `<step>.damaged` (kept for inspection, out of orbax's sight,
        so the step can be written again) and the next older one is tried.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return self.restore(step, abstract_state)
            except Exception as error:  # noqa: BLE001 - any failure to read means damage
                aside = self.directory / f"{step}.damaged"
                print(
                    f"checkpoint {step} in {self.directory} is damaged ({describe(error)}); "
                    f"moved it to {aside.name} and trying the one before",
                    flush=True,
                )
                if jax.process_index() == 0:
                    os.replace(self.directory / str(step), aside)
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils

                    multihost_utils.sync_global_devices(f"igpt checkpoint {step} moved aside")
                self._manager.reload()
        return None

    def wait(self) -> None:
        """Block until any save in flight is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.close()


def is_workdir(path: str | os.PathLike) -> bool:
    """True if `path` is a training workdir with at least one checkpoint directory."""
    return (Path(path) / CHECKPOINTS_DIR).is_dir()


def _read_only_manager(workdir: Path) -> ocp.CheckpointManager:
    # Read-only: never creates directories or cleans up a save another process has in flight.
    return ocp.CheckpointManager(
        workdir / CHECKPOINTS_DIR, options=ocp.CheckpointManagerOptions(read_only=True)
    )


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The newest complete checkpoint's step in a workdir (safe while a run is writing)."""
    steps = all_steps(workdir)
    return steps[-1] if steps else None


def all_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of a workdir's complete checkpoints, oldest first."""
    if not (Path(workdir) / CHECKPOINTS_DIR).is_dir():
        return []
    manager = _read_only_manager(Path(workdir).absolute())
    steps = sorted(manager.all_steps())
    manager.close()
    return steps


def describe(error: Exception) -> str:
    """An exception as a short one-line description (orbax's can run to many lines)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def read_model_config(workdir: str | os.PathLike, step: int) -> ModelConfig:
    """The ModelConfig stored with checkpoint `step` of a workdir."""
    manager = _read_only_manager(Path(workdir).absolute())
    try:
        model = manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))
    finally:
        manager.close()
    return ModelConfig.from_dict(model["model"])


def read_params(workdir: str | os.PathLike, step: int, config: ModelConfig, shardings) -> dict:
    """The parameters of checkpoint `step` of a workdir, restored into `shardings`."""
    target = abstract_params(config, shardings)
    manager = _read_only_manager(Path(workdir).absolute())
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
        )
    finally:
        manager.close()
    return restored["params"]
