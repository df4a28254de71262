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
from sd3fit.simpletuner.patches import cpu_pin_memory, metrics_log


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

    def log(self, values, step=None, log_kwargs=None):
        self.seen.append((step, values))


def test_metrics_log_writes_scalars_once_per_call(tmp_path):
    acc = FakeAccelerator()
    path = tmp_path / "metrics.jsonl"
    metrics_log.apply(acc, path)
    metrics_log.apply(acc, path)  # init_trackers runs twice upstream: still one row per log call
    acc.log({"train_loss": torch.tensor(0.5), "learning_rate": 1e-4, "image": object(), "bad": math.nan}, step=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 1 and len(acc.seen) == 1
    assert rows[0]["step"] == 3 and rows[0]["train_loss"] == 0.5 and rows[0]["learning_rate"] == 1e-4
    assert "image" not in rows[0] and rows[0]["bad"] == "nan"
