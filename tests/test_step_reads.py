"""No host read of GPU values inside SimpleTuner's step (`defer_step_reads`: sd3fit.simpletuner.patches.step_reads,
sd3fit.speed.host_reads, and the metrics patch's late hand-over to the trackers). The tiny model's training with the
patch on is compared with stock in test_speed_patches.py (EXACT)."""

import dis
import inspect
import json
import math

import pytest
import torch

from sd3fit.errors import UserError
from sd3fit.measure.sink import MetricsSink
from sd3fit.simpletuner import compat
from sd3fit.simpletuner.patches import metrics_log, step_reads
from sd3fit.speed.host_reads import NonFiniteLoss, Pending, Queue, StepReads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU the copies and events run for real


def scalar(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype, device=DEVICE)


def test_pending_values_come_back_as_numbers():
    loss = scalar(0.25)
    pending = Pending({"loss": loss * 2, "lr": 1e-4, "name": "x", "image": torch.zeros(2, 2)})
    loss.add_(1)  # a later change on the stream does not reach the copy taken before it
    values = pending.read()
    assert values["loss"] == 0.5 and values["lr"] == 1e-4 and values["name"] == "x"
    assert torch.is_tensor(values["image"])  # only one-element tensors are read
    assert isinstance(values["loss"], float)


def test_a_queue_keeps_order_and_holds_at_most_its_lag():
    queue = Queue(lag=2)
    landed = []
    for step in range(1, 6):
        queue.put({"loss": scalar(float(step))}, step)
        landed += queue.ready()
        assert len(queue) <= 2
    landed += queue.ready(everything=True)
    assert [context for _, context in landed] == [1, 2, 3, 4, 5]
    assert [values["loss"] for values, _ in landed] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_a_non_finite_loss_stops_the_run_by_the_next_settle_at_the_latest():
    reads = StepReads()
    reads.check_finite(scalar(0.3), {"step": 1})
    with pytest.raises(NonFiniteLoss) as caught:
        reads.check_finite(scalar(math.nan), {"step": 2, "filepaths": ["a.png"], "data_backend_id": "images",
                                              "loss_logs": {"mse": scalar(math.nan)}})
        reads.check_finite(scalar(0.2), {"step": 3})
        reads.settle()
    message = str(caught.value)
    assert "Non-finite training loss detected at step 2" in message and "loss=nan" in message
    assert "filepaths=['a.png']" in message and "data_backend_id=images" in message
    assert isinstance(caught.value, RuntimeError)  # what upstream raises
    fine = StepReads()
    for step in range(5):
        fine.check_finite(scalar(0.1 * step), {"step": step})
    fine.settle()
    inf = StepReads()
    with pytest.raises(NonFiniteLoss, match="step 7"):
        inf.check_finite(torch.tensor([1.0, math.inf], device=DEVICE), {"step": 7})  # not one number: checked whole
        inf.settle()


def test_the_progress_bar_gets_numbers_never_tensors():
    class Bar:
        shown = []

        def set_postfix(self, **values):
            self.shown.append(values)

    bar, reads = Bar(), StepReads()
    for step in range(1, 5):
        reads.postfix(bar, {"step_loss": scalar(float(step)), "lr": 1e-5})
    reads.settle()
    assert bar.shown and all(isinstance(v["step_loss"], float) for v in bar.shown)
    assert [v["step_loss"] for v in bar.shown] == sorted(v["step_loss"] for v in bar.shown)


def test_the_sink_reads_tensors_when_it_writes_their_row(tmp_path):
    class Recorder:  # the step's timings are ready one log later, as on a GPU
        waiting = []

        def logged(self, step):
            ready, self.waiting = self.waiting, [(step, {"step_time_s": 0.1})]
            return ready

        def flush(self):
            ready, self.waiting = self.waiting, []
            return ready

    sink = MetricsSink(tmp_path / "metrics.jsonl", None, Recorder())
    for step in (1, 2, 3):
        sink.on_log(step, {"train_loss": scalar(step / 10), "optimization_loss": scalar(step / 10, torch.bfloat16),
                           "learning_rate": 1e-4, "flag": True})
    sink.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["train_loss"] for r in rows] == pytest.approx([0.1, 0.2, 0.3])
    assert all(r["step_time_s"] == 0.1 and r["learning_rate"] == 1e-4 and "flag" not in r for r in rows)


def test_deferred_tracker_logs_arrive_as_numbers_in_step_order():
    class Accelerator:
        def __init__(self):
            self.got, self.ended = [], False

        def log(self, values, step=None, log_kwargs=None):
            self.got.append((step, values))

        def end_training(self):
            self.ended = True

    class Measurement:
        def on_log(self, step, values):
            return [(step - 1, {"step_time_s": 0.1})] if step > 1 else []

        def close(self):
            return [(3, {"step_time_s": 0.1})]

    accelerator = Accelerator()
    metrics_log.apply(accelerator, Measurement(), defer=True)
    for step in (1, 2, 3):
        accelerator.log({"train_loss": scalar(float(step)), "epoch": 1}, step=step)
    accelerator.end_training()
    assert accelerator.ended
    assert [step for step, _ in accelerator.got] == [1, 1, 2, 2, 3, 3]
    losses = [values["train_loss"] for _, values in accelerator.got if "train_loss" in values]
    assert losses == [1.0, 2.0, 3.0] and all(isinstance(x, float) for x in losses)


def test_the_rewritten_loop_is_upstreams_own_without_its_reads():
    from simpletuner.helpers.training.trainer import Trainer

    step_reads.check(Trainer)
    upstream = Trainer.train
    rewritten = step_reads.train_without_reads(upstream)
    assert rewritten.__globals__ is upstream.__globals__  # upstream's module: its imports, its patched functions
    assert rewritten.__code__.co_filename == upstream.__code__.co_filename
    assert rewritten.__code__.co_firstlineno == upstream.__code__.co_firstlineno

    def lines(fn):
        return {i.positions.lineno for i in dis.get_instructions(fn) if i.positions and i.positions.lineno}

    assert max(lines(rewritten)) == max(lines(upstream))  # tracebacks name upstream's lines
    names = set(rewritten.__code__.co_names) | {n for c in rewritten.__code__.co_consts if inspect.iscode(c)
                                                for n in c.co_names}
    assert {"_sd3fit_reads", "check_finite", "postfix", "_sd3fit_keep_timesteps"} <= names
    assert "isfinite" not in names and "isfinite" in upstream.__code__.co_names


def test_the_patch_refuses_another_loop_and_another_version(monkeypatch):
    class Changed:
        def train(self):
            for timestep in []:
                pass

        def mark_optimizer_eval(self):
            pass

    with pytest.raises(RuntimeError, match="0 copies of the text this patch replaces .* needs updating"):
        step_reads.check(Changed)
    with pytest.raises(RuntimeError, match="lacks mark_optimizer_eval"):
        step_reads.check(type("NoEval", (), {"train": Changed.train}))
    monkeypatch.setattr(compat, "installed_version", lambda: "9.9.9")
    from simpletuner.helpers.training.trainer import Trainer

    with pytest.raises(UserError, match="9.9.9"):
        step_reads.check(Trainer)
    with pytest.raises(UserError, match="9.9.9"):
        metrics_log.apply(object(), object(), defer=True)


def test_deferred_reads_and_checkpointing_are_refused_beside_cuda_graphs():
    from sd3fit import presets

    with pytest.raises(UserError, match="defer_step_reads and cuda_graph_blocks are not verified together") as caught:
        presets.load("lora-24gb", ["defer_step_reads=true"])
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="not verified with gradient_checkpointing.*use recompute_budget"):
        presets.load("lora-24gb", ["gradient_checkpointing=true"])
    assert presets.load("lora-24gb", ["defer_step_reads=true", "cuda_graph_blocks=false"]).values["defer_step_reads"]
