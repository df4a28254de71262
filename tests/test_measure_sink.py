"""The metrics sink: one row per step in step order, trainer scalars merged with late step timings, TensorBoard
scalars readable by TensorBoard's own loader."""

import json

import torch

from sd3fit.measure.sink import MetricsSink, scalar


class LateRecorder:
    """Step timings arrive one log later, as they do from a GPU."""

    def __init__(self):
        self.queued = []

    def logged(self, step):
        ready = [(s, {"time/step_s": 0.5 * s}) for s in self.queued]
        self.queued = [step]
        return ready

    def flush(self):
        ready = [(s, {"time/step_s": 0.5 * s}) for s in self.queued]
        self.queued = []
        return ready


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_merge_trainer_values_with_late_timings(tmp_path):
    sink = MetricsSink(tmp_path / "metrics.jsonl", tmp_path / "tb", recorder=LateRecorder())
    assert sink.on_log(1, {"train_loss": torch.tensor(0.25), "lr": 1e-4, "image": object()}) == []
    assert sink.on_log(2, {"train_loss": 0.5, "lr": 1e-4}) == [(1, {"time/step_s": 0.5})]
    assert sink.close() == [(2, {"time/step_s": 1.0})]
    written = rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in written] == [1, 2]
    assert written[0]["train_loss"] == 0.25 and written[0]["time/step_s"] == 0.5 and "image" not in written[0]
    assert written[1]["time/step_s"] == 1.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train_loss", "lr", "time/step_s"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("time/step_s")] == [(1, 0.5), (2, 1.0)]


def test_without_recorder_rows_are_written_at_once(tmp_path):
    sink = MetricsSink(tmp_path / "metrics.jsonl", None)
    assert sink.on_log(3, {"train_loss": float("nan")}) == [(3, {})]
    assert rows(tmp_path / "metrics.jsonl") == [{"step": 3, "time": rows(tmp_path / "metrics.jsonl")[0]["time"], "train_loss": "nan"}]
    assert sink.close() == []


def test_other_processes_write_their_own_rows_without_the_trainers_scalars(tmp_path):
    sink = MetricsSink(tmp_path / "metrics.jsonl", tmp_path / "tb", is_main=False)
    sink.on_log(1, {"train_loss": torch.tensor(1.0)})  # a copy of the main process's: never read
    sink.close()
    found = rows(tmp_path / "metrics.jsonl")
    assert [set(row) for row in found] == [{"step", "time"}] and found[0]["step"] == 1
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_scalar():
    assert scalar(torch.tensor([2.0])) == 2.0 and scalar(True) is None and scalar("x") is None and scalar(torch.ones(2)) is None
