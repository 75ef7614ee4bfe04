"""Run metrics: JSON lines, TensorBoard scalars and pictures, and human-readable progress lines."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Writes `metrics.jsonl` and TensorBoard events in a workdir (process 0 only)."""

    def __init__(self, workdir: str | os.PathLike):
        self._enabled = jax.process_index() == 0
        if self._enabled:
            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(workdir / METRICS_FILE, "a")  # noqa: SIM115 - see close()
            self._events = SummaryWriter(str(workdir / TENSORBOARD_DIR))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        """Record `values` for `split` ("train", "eval", ...) at `step`."""
        if not self._enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        record = {"step": step, "split": split, "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._events.add_scalar(f"{split}/{name}", value, step)
        self._events.flush()

    def image(self, step: int, name: str, picture: np.ndarray) -> None:
        """Log a (H, W, 3) uint8 picture (a sample grid) to TensorBoard under `name`."""
        if self._enabled:
            self._events.add_image(name, np.asarray(picture), step, dataformats="HWC")
            self._events.flush()

    def close(self) -> None:
        """Close the files."""
        if self._enabled:
            self._jsonl.close()
            self._events.close()


def format_duration(seconds: float) -> str:
    """'1h02m', '3m05s' or '42s'."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Throughput and ETA over the steps since the last report."""

    def __init__(self, first_step: int, last_step: int, tokens_per_step: int):
        self._last_step = last_step
        self._tokens_per_step = tokens_per_step
        self._mark_step, self._mark_time = first_step, time.perf_counter()

    def line(self, step: int, values: dict[str, float]) -> tuple[str, float]:
        """A progress line for `step` and the tokens/s since the previous call."""
        now = time.perf_counter()
        steps = max(step - self._mark_step, 1)
        seconds_per_step = (now - self._mark_time) / steps
        tokens_per_s = self._tokens_per_step / max(seconds_per_step, 1e-9)
        self._mark_step, self._mark_time = step, now
        eta = format_duration(seconds_per_step * (self._last_step - step))
        shown = " | ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
        )
        line = f"step {step}/{self._last_step} | {shown} | {tokens_per_s:,.0f} tok/s | ETA {eta}"
        return line, tokens_per_s
