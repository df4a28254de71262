"""Long runs on the tiny SD3, trained for real: one run's trainer is killed with SIGKILL right after its second
checkpoint, the run is left with a half-written checkpoint, stopped by SIGTERM and by SIGINT, and sd3fit itself is
killed; it is continued with `--resume` each time until it finishes with every step logged once and an adapter that
loads into diffusers. Also what the demo prints."""

import json
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from conftest import ROOT, SD3FIT, run_sd3fit
from sd3fit import runs

STEPS, EVERY = 40, 4


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([*SD3FIT, "train", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"training ended before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def logged_steps(run: runs.Run) -> list[int]:
    return [row["step"] for row in run.read_metrics()]


def leftovers(run: runs.Run) -> list[str]:
    """Processes still training in the run's folder."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "sd3fit.simpletuner.launcher" in cmdline and str(run.dir) in cmdline:
            found.append(" ".join(cmdline))
    return found


def test_killed_then_interrupted_twice_then_finished(tmp_path, demo_assets):
    run = runs.Run(tmp_path / "drill")
    proc = start(f"max_train_steps={STEPS}", f"checkpointing_steps={EVERY}", "validation_disable=true",
                 "--name", "drill", "--runs-dir", str(tmp_path))
    wait_for(lambda: len([c for c in runs.checkpoints(run) if c.complete]) >= 2, proc, "a second checkpoint")
    trainer = psutil.Process(proc.pid).children()[0]
    trainer.kill()  # SIGKILL: no handler runs, nothing is saved
    code, out = finish(proc)
    assert code != 0, out
    killed_at = max(logged_steps(run))
    resumed_from = runs.last_checkpoint(run).step
    assert resumed_from >= 2 * EVERY and killed_at - resumed_from <= EVERY  # at most one interval is trained twice
    assert run.read_result() is None and not leftovers(run)

    # a later checkpoint cut off while saving, in both shapes: renamed without its completion marker, and a -tmp one
    half = run.output / f"checkpoint-{resumed_from + 1}"
    shutil.copytree(run.output / f"checkpoint-{resumed_from}", half)
    (half / runs.CHECKPOINT_GUARD).unlink()
    (run.output / f"checkpoint-{resumed_from + 2}-tmp").mkdir()
    assert runs.last_checkpoint(run).step == resumed_from

    listing = run_sd3fit("runs", "--runs-dir", str(tmp_path)).stdout.splitlines()
    assert listing[1].split()[:2] == ["drill", "stopped"]

    # SIGTERM, then SIGINT, each a few steps into a resumed attempt
    for signum, expected in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        before = max(logged_steps(run))
        proc = start("--resume", str(run.dir))
        wait_for(lambda: run.metrics.is_file() and max(logged_steps(run) or [0]) >= before + 3, proc, "three new steps")
        proc.send_signal(signum)
        code, out = finish(proc)
        assert code == expected, out
        result = run.read_result()
        assert result["status"] == "interrupted" and result["signal"] == signal.Signals(signum).name, result
        assert runs.last_checkpoint(run).step == result["global_step"]  # saved at the step it stopped
        assert logged_steps(run) == list(range(1, result["global_step"] + 1))
        assert f"continue with: sd3fit train --resume {run.dir}" in out
        assert not leftovers(run)
    # sd3fit itself killed: the trainer gets SIGTERM from Linux and stops with a checkpoint, logging to train.log
    before = max(logged_steps(run))
    proc = start("--resume", str(run.dir))
    wait_for(lambda: max(logged_steps(run) or [0]) > before + 3, proc, "three new steps")
    proc.kill()
    finish(proc)
    deadline = time.time() + 120
    while (leftovers(run) or run.read_result() is None) and time.time() < deadline:
        time.sleep(0.2)
    result = run.read_result()
    assert result["status"] == "interrupted" and result["signal"] == "SIGTERM" and not leftovers(run), result
    assert runs.last_checkpoint(run).step == result["global_step"]
    # what the trainer printed after sd3fit was gone reached train.log too: its clean-up at the end
    assert "Model components unloaded successfully" in run.log.read_text().rsplit("Loading states from", 1)[1]

    first_resume = run.read_config()["resumes"][0]
    assert first_resume["checkpoint"] == f"checkpoint-{resumed_from}"
    assert first_resume["removed_incomplete"] == sorted([half.name, f"checkpoint-{resumed_from + 2}-tmp"])

    code, out = finish(start("--resume", str(run.dir)))
    assert code == 0, out
    result = run.read_result()
    assert result["status"] == "finished" and result["global_step"] == STEPS
    assert logged_steps(run) == list(range(1, STEPS + 1))  # every step once
    assert run.log.read_text().count("Loading states from") == 4  # train.log kept every attempt
    assert not leftovers(run)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == list(range(1, STEPS + 1))

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(demo_assets["model"])
    pipe.load_lora_weights(result["artifacts"]["adapter"], adapter_name="resumed")
    assert "resumed" in pipe.get_active_adapters()


def test_demo_prints_little_and_is_listed(tmp_path):
    # first use: the demo model is built too, and what its libraries print goes to a log, not the terminal
    runs_dir = tmp_path / "runs"
    proc = run_sd3fit("train", "--runs-dir", str(runs_dir), env={"SD3FIT_CACHE_DIR": str(tmp_path / "cache")}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 25, "\n".join(lines)
    assert lines[0].startswith("sd3fit: building the offline demo's tiny model")
    assert lines[1].startswith("sd3fit: training demo.json in ") and "step 8/8" in proc.stdout
    assert not any("warn" in line.lower() for line in lines), "\n".join(lines)
    assert (tmp_path / "cache" / "demo-v1" / "build.log").is_file()
    (folder,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    log = runs.Run(folder).log.read_text()
    for trainer_output in ("[INFO]", "Epoch 1/"):  # SimpleTuner's log lines and progress bar: in train.log only
        assert trainer_output in log and trainer_output not in proc.stdout + proc.stderr
    listing = run_sd3fit("runs", "--runs-dir", str(runs_dir)).stdout.splitlines()
    assert listing[1].split()[:4] == [folder.name, "finished", "8/8", listing[1].split()[3]]
    assert listing[1].endswith(str(folder / "output" / "pytorch_lora_weights.safetensors"))
