"""The SimpleTuner-facing package: version gate, option table, patches."""

import json
import math
import subprocess
import sys

import pytest
import torch

from sd3fit import schema
from sd3fit.errors import UserError
from sd3fit.simpletuner import compat, launcher
from sd3fit.measure.sink import MetricsSink
from sd3fit.simpletuner.patches import (compiled_blocks, cpu_pin_memory, gradient_release, interrupt, metrics_log,
                                        optimizer_offload, phases, step_measure, vae_tiles, validation_images)


def test_version_gate_names_both_versions(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda: "4.11.0")
    with pytest.raises(UserError, match=r"metrics patch was written for simpletuner 4\.10\.1 but 4\.11\.0 is installed"):
        compat.require("4.10.1", "metrics patch")


def test_every_patch_refuses_another_version(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda: "9.9.9")
    with pytest.raises(UserError):
        cpu_pin_memory.apply()
    with pytest.raises(UserError):
        metrics_log.apply(object(), "unused")
    with pytest.raises(UserError):
        step_measure.check(object)
    with pytest.raises(UserError):
        gradient_release.check(object)
    for check in (optimizer_offload.check, phases.check):
        with pytest.raises(UserError):
            check(object)
    with pytest.raises(UserError):
        phases.apply(object())
    with pytest.raises(UserError):
        vae_tiles.apply(512)
    with pytest.raises(UserError):
        compiled_blocks.apply(True)
    with pytest.raises(UserError):
        validation_images.apply(None)
    with pytest.raises(UserError):
        interrupt.check(object)
    with pytest.raises(UserError):
        interrupt.install()


def test_launcher_stops_with_one_line_on_a_version_mismatch(monkeypatch, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"simpletuner": {"output_dir": str(tmp_path / "out")}}))
    monkeypatch.setattr(compat, "installed_version", lambda: "4.9.0")
    assert launcher.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written for simpletuner 4.10.1 but 4.9.0 is installed" in err[0]


def test_installed_simpletuner_is_the_pinned_one():
    assert compat.installed_version() == schema.SIMPLETUNER_VERSION


def test_option_table_matches_the_installed_simpletuner(tmp_path):
    # SimpleTuner writes debug.log into its working directory on import: run it in a scratch folder
    proc = subprocess.run([sys.executable, "-m", "sd3fit.simpletuner.options"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == json.loads(schema._OPTIONS_FILE.read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fix only applies without CUDA")
def test_cpu_fix_makes_pin_memory_a_no_op():
    assert cpu_pin_memory.apply() is True
    t = torch.ones(3)
    assert t.pin_memory() is t


class FakeAccelerator:
    is_main_process = True

    def __init__(self):
        self.seen = []
        self.ended = False

    def log(self, values, step=None, log_kwargs=None):
        self.seen.append((step, dict(values)))

    def end_training(self):
        self.ended = True


class OneStepLate:
    """Timings for a step become readable at the next log, as CUDA events do."""

    def __init__(self):
        self.queued = []

    def logged(self, step):
        ready, self.queued = [(s, {"time/step_s": float(s)}) for s in self.queued], [step]
        return ready

    def flush(self):
        ready, self.queued = [(s, {"time/step_s": float(s)}) for s in self.queued], []
        return ready


def test_metrics_log_passes_late_timings_to_trackers_in_step_order(tmp_path):
    acc = FakeAccelerator()
    path = tmp_path / "metrics.jsonl"
    sink = MetricsSink(path, None, recorder=OneStepLate())
    metrics_log.apply(acc, sink)
    metrics_log.apply(acc, sink)  # init_trackers runs twice upstream: still one row per log call
    acc.log({"train_loss": torch.tensor(0.5), "learning_rate": 1e-4, "image": object(), "bad": math.nan}, step=1)
    acc.log({"train_loss": 0.25}, step=2)
    assert [step for step, _ in acc.seen] == [1, 1, 2]  # step 1's timing goes out before step 2's values
    assert acc.seen[1][1] == {"time/step_s": 1.0}
    acc.end_training()
    assert acc.ended and acc.seen[-1] == (2, {"time/step_s": 2.0})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["train_loss"] == 0.5 and rows[0]["learning_rate"] == 1e-4 and rows[0]["time/step_s"] == 1.0
    assert "image" not in rows[0] and rows[0]["bad"] == "nan"


def test_step_measure_refuses_a_trainer_without_its_seams():
    class Moved:
        def train(self):
            pass

    with pytest.raises(RuntimeError, match="lacks _write_train_stage_breadcrumb"):
        step_measure.check(Moved)


def test_gradient_release_refuses_a_trainer_without_its_seams():
    class Moved:
        def train(self):
            pass

        def init_optimizer(self):
            pass

    with pytest.raises(RuntimeError, match="lacks _max_grad_value"):
        gradient_release.check(Moved)


def test_gradient_release_checks_the_training_loop_it_relies_on():
    from simpletuner.helpers.training.trainer import Trainer

    gradient_release.check(Trainer)  # the pinned release has every seam

    class Rewritten(Trainer):
        def train(self):  # a loop without upstream's gradient-release branch
            self.optimizer.step()

    with pytest.raises(RuntimeError, match="gradient-release branch"):
        gradient_release.check(Rewritten)


@pytest.mark.parametrize("config, expected", [
    (dict(max_grad_norm=2.0, optimizer="ao-adamw8bit"), 2.0),
    (dict(max_grad_norm=0.0, optimizer="ao-adamw8bit"), None),
    (dict(max_grad_norm=2.0, optimizer="optimi-stableadamw"), None),  # upstream does not clip it either
])
def test_released_gradients_are_clipped_as_upstream_would(config, expected):
    from types import SimpleNamespace

    assert gradient_release.clip_value(SimpleNamespace(**config)) == expected


class _Upstream:
    """Stands in for SimpleTuner's Trainer: records checkpoint saves and aborts."""

    def __init__(self, output_dir, step, sync=True):
        self.config = type("C", (), {"output_dir": str(output_dir)})()
        self.state = {"global_step": step}
        self.accelerator = type("A", (), {"sync_gradients": sync, "is_main_process": True, "num_processes": 1})()
        self.should_abort = False
        self.calls = []

    def _exit_on_signal(self):
        if self.should_abort:
            raise StopIteration("Training run received abort signal.")

    def abort(self):
        self.calls.append("abort")
        self.should_abort = True

    def checkpoint_state_cleanup_temp(self, output_dir):
        self.calls.append("cleanup")

    def checkpoint_state_save(self, output_dir):
        self.calls.append(f"save {self.state['global_step']}")


class _Trainer(interrupt.InterruptibleTrainer, _Upstream):
    pass


@pytest.mark.parametrize("signalled, sync, existing, calls", [
    (False, True, None, []),  # no signal: upstream's check only
    (True, False, None, None),  # gradient accumulation half done: not a step boundary yet
    (True, True, None, ["cleanup", "save 5", "abort"]),
    (True, True, "complete", ["abort"]),  # the step's scheduled checkpoint is there already
    (True, True, "half", ["cleanup", "save 5", "abort"]),  # a half-written one of this step is replaced
])
def test_interrupt_saves_a_checkpoint_at_a_step_boundary_then_aborts(tmp_path, signalled, sync, existing, calls):
    trainer = _Trainer(tmp_path, step=5, sync=sync)
    trainer.sd3fit_interrupt = interrupt.Interrupt()
    if signalled:
        trainer.sd3fit_interrupt.signum = 2
    if existing:
        (tmp_path / "checkpoint-5").mkdir()
        if existing == "complete":
            (tmp_path / "checkpoint-5" / ".guard").write_text("complete\n")
    if calls and "abort" in calls:
        with pytest.raises(StopIteration):
            trainer._exit_on_signal()
        assert trainer.calls == calls
        assert (tmp_path / "checkpoint-5").exists() == (existing == "complete")  # a half one was removed first
    else:
        trainer._exit_on_signal()
        assert trainer.calls == []


def test_interrupt_signal_before_training_or_twice_stops_at_once():
    stop = interrupt.Interrupt()
    with pytest.raises(KeyboardInterrupt):
        stop.handle(15, None)  # while loading: nothing trained to keep
    stop = interrupt.Interrupt()
    stop.training = True
    stop.handle(15, None)
    assert stop.signum == 15
    with pytest.raises(KeyboardInterrupt):
        stop.handle(2, None)
    assert stop.signum == 15


def test_with_ramtorch_the_models_zero_grad_ends_the_step():
    """Upstream zeroes the trained model's gradients instead of the optimizer's when RamTorch is on (text encoders
    included): the step must end there, not run on through checkpoints and validation."""
    from types import SimpleNamespace

    class Recorder:
        def __init__(self):
            self.open, self.ended = None, 0

        def begin(self, name):
            self.open = name

        def is_open(self, name):
            return self.open == name

        def step_end(self):
            self.open, self.ended = None, self.ended + 1

    recorder = Recorder()
    component = torch.nn.Linear(2, 2)
    trainer = step_measure.MeasuredTrainer()
    trainer.sd3fit_measurement = SimpleNamespace(recorder=recorder)
    trainer.accelerator = SimpleNamespace(backward=lambda loss: None)
    trainer.optimizer = torch.optim.SGD(component.parameters(), lr=0.1)
    trainer.model = SimpleNamespace(get_trained_component=lambda unwrap_model=True: component)
    trainer._wrap_step_seams()
    for zero in (trainer.optimizer.zero_grad, component.zero_grad):  # without RamTorch, then with it
        trainer.accelerator.backward(None)
        assert recorder.is_open("optimizer")
        zero(set_to_none=True)
        assert recorder.open is None
    assert recorder.ended == 2
    component.zero_grad()  # zeroing outside a step (no backward before it) ends nothing
    assert recorder.ended == 2


def test_a_full_run_lists_its_model_only_when_the_export_wrote_weights(tmp_path):
    from sd3fit.runs import Run

    run = Run(tmp_path / "run")
    options = {"model_type": "full", "output_dir": str(run.output)}
    transformer = run.output / "pipeline" / "transformer"
    transformer.mkdir(parents=True)
    (transformer / "config.json").write_text("{}")
    assert "transformer" not in launcher._artifacts(run, options)  # a folder without weights is no model
    (transformer / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert launcher._artifacts(run, options)["transformer"] == str(transformer)
