"""MetricsWriter: CSV readable by read_metrics (header widens with new keys) and TensorBoard event files."""

from __future__ import annotations

import math

import numpy as np
from tensorboardX.proto import event_pb2

from bp_ray.train.metrics import MetricsWriter, read_metrics


def test_csv_and_events_are_written(tmp_path):
    with MetricsWriter(tmp_path / "metrics") as writer:
        writer.log(1, {"loss/train": 2.5, "lr": 1e-5})
        writer.log(2, {"loss/train": np.float32(2.0), "lr": 2e-5})
        writer.log(2, {"loss/eval": 2.25})  # new key: header widens, earlier rows get empty cells
        writer.log(3, {"loss/train": 1.5, "lr": 3e-5})
    frame = read_metrics(tmp_path / "metrics" / "metrics.csv")
    assert list(frame.columns) == ["step", "loss/train", "lr", "loss/eval"]
    assert frame["step"].tolist() == [1, 2, 2, 3]
    assert frame["loss/train"].tolist()[:2] == [2.5, 2.0]
    assert math.isnan(frame["loss/train"][2]) and frame["loss/eval"][2] == 2.25
    assert frame["loss/eval"].isna().tolist() == [True, True, False, True]
    assert list((tmp_path / "metrics").glob("events.out.tfevents.*"))


def test_events_hold_the_scalars(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.log(5, {"reward/mean": 0.25})
    writer.close()
    (events,) = tmp_path.glob("events.out.tfevents.*")
    scalars = _read_scalars(events)
    assert scalars == [("reward/mean", 5, 0.25)]


def _read_scalars(path):
    """TFRecord framing: u64 length, u32 crc, payload, u32 crc."""
    data, offset, found = path.read_bytes(), 0, []
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 8], "little")
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        found += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return found


def test_resumed_run_keeps_earlier_rows(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.log(1, {"loss/train": 3.0})
    with MetricsWriter(tmp_path) as writer:
        writer.log(2, {"loss/train": 2.0, "lr": 0.1})
    frame = read_metrics(tmp_path / "metrics.csv")
    assert frame["step"].tolist() == [1, 2]
    assert frame["loss/train"].tolist() == [3.0, 2.0]


def test_restart_from_an_earlier_step_drops_the_rows_that_run_again(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.log(step, {"loss/train": float(step)})
    with MetricsWriter(tmp_path, start_step=3) as writer:
        writer.log(4, {"loss/train": 0.5})
    frame = read_metrics(tmp_path / "metrics.csv")
    assert frame["step"].tolist() == [1, 2, 3, 4]
    assert frame["loss/train"].tolist() == [1.0, 2.0, 3.0, 0.5]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "rank1", enabled=False)
    writer.log(1, {"loss/train": 1.0})
    writer.close()
    assert not (tmp_path / "rank1").exists()
