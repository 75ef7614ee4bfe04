"""Run metrics (igpt/train/metrics.py): JSON lines and TensorBoard events."""

import json

import numpy as np

from igpt.train.metrics import MetricsWriter


def test_metrics_are_json_lines_and_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path)
    writer.write(10, "train", {"loss": 2.5, "bits_per_token": 3.6})
    writer.write(20, "eval", {"loss": 2.25})
    picture = np.zeros((6, 9, 3), np.uint8)
    picture[:, :3] = 255
    writer.image(20, "samples", picture)
    writer.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["split"], x["loss"]) for x in lines] == [
        (10, "train", 2.5),
        (20, "eval", 2.25),
    ]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/loss", "train/bits_per_token", "train/loss"]
    (train_loss,) = events.Scalars("train/loss")
    assert (train_loss.step, train_loss.value) == (10, 2.5)
    (image,) = events.Images("samples")
    assert (image.step, image.width, image.height) == (20, 9, 6)
