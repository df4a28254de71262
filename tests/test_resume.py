"""`sd3fit train --resume`: what is refused before anything is written, and what a resume changes in the folder.
The drills that train, kill and resume for real are in test_long_runs.py."""

import json

import pytest

from conftest import one_line_error, run_sd3fit, tree_snapshot
from sd3fit import resume, runs


def fake_run(tmp_path, steps=8, checkpoints=(3, 6), finished=False):
    run = runs.Run(tmp_path / "r")
    run.dir.mkdir()
    run.config.write_text(json.dumps({
        "simpletuner": {"max_train_steps": steps, "lora_rank": 4, "checkpointing_steps": 3,
                        "output_dir": str(run.output)},
        "sd3fit": {"dataset_dir": "/data"}, "defaults": {"checkpointing_use_tempdir": True}, "model_source": "local",
    }))
    run.datasets.write_text("[]")
    for step in checkpoints:
        path = run.output / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / runs.CHECKPOINT_GUARD).write_text("complete\n")
    run.metrics.write_text("".join(json.dumps({"step": s, "time": 1.0 + s, "train_loss": 0.5}) + "\n" for s in range(1, 8)))
    if finished:
        run.result.write_text(json.dumps({"status": "finished", "global_step": steps}))
    return run


@pytest.mark.parametrize("override, message", [
    ("lora_rank=8", r"option lora_rank cannot change when resuming .*r \(it was 4\)"),
    ("learning_rate=0.1", r"option learning_rate cannot change when resuming .*\(it was not set\)"),
    ("max_train_steps=5", r"option max_train_steps can only grow when resuming .*: it is 8, not 5"),
])
def test_changed_options_are_refused_and_nothing_is_written(tmp_path, override, message):
    run = fake_run(tmp_path)
    before = tree_snapshot(run.dir)
    line = one_line_error(run_sd3fit("train", "--resume", str(run.dir), override))
    assert __import__("re").search(message, line), line
    assert tree_snapshot(run.dir) == before


def test_a_recorded_value_may_be_repeated_and_a_run_named(tmp_path):
    run = fake_run(tmp_path)
    # by its name under SD3FIT_RUNS_DIR
    proc = run_sd3fit("train", "--resume", "r", "lora_rank=4", "max_train_steps=12", "--dry-run",
                      env={"SD3FIT_RUNS_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "would resume from checkpoint-6 (step 6 of 12)" in proc.stdout


@pytest.mark.parametrize("case, message", [
    ("no checkpoint", r"has no complete checkpoint to resume from \(checkpointing_steps is 3\); start a new run"),
    ("finished", r"already finished its 8 steps; give max_train_steps=N with N above 8"),
    ("not a run", r"is not a run folder \(it has no config.json\)"),
    ("with a preset", r"--resume continues a run with its own config and folder; drop a preset, --name"),
])
def test_runs_that_cannot_resume(tmp_path, case, message):
    run = fake_run(tmp_path, checkpoints=() if case == "no checkpoint" else (3, 6), finished=case == "finished")
    args = ["train", "--resume", str(tmp_path if case == "not a run" else run.dir)]
    if case == "with a preset":
        args += ["demo", "--name", "x"]
    before = tree_snapshot(run.dir)
    line = one_line_error(run_sd3fit(*args))
    assert __import__("re").search(message, line), line
    assert tree_snapshot(run.dir) == before


def test_resuming_records_itself_and_drops_metrics_past_the_checkpoint(tmp_path):
    run = fake_run(tmp_path, finished=True)
    (run.output / "checkpoint-9-tmp").mkdir()  # cut off while saving: never resumed from
    prepared, checkpoint = resume.prepare(str(run.dir), ["max_train_steps=12"])
    assert checkpoint.step == 6
    env = resume.write(prepared, checkpoint)
    assert env == {resume.RESUME_ENV: str(run.output / "checkpoint-6")}
    assert [row["step"] for row in run.read_metrics()] == [1, 2, 3, 4, 5, 6]
    config = run.read_config()
    assert config["simpletuner"]["max_train_steps"] == 12
    assert config["resumes"][0]["checkpoint"] == "checkpoint-6" and config["resumes"][0]["step"] == 6
    assert not run.result.exists()


def test_a_trainer_failure_reaches_the_console(tmp_path):
    # the trainer fails at once (the config lacks every SimpleTuner option it needs): the console, which shows only
    # sd3fit's lines while training, shows the end of train.log and the error
    run = fake_run(tmp_path)
    proc = run_sd3fit("train", "--resume", str(run.dir), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    log_tail = [line for line in run.log.read_text().splitlines() if line.strip()][-3:]
    assert all(line in proc.stderr for line in log_tail), (log_tail, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1].startswith("sd3fit: error: training failed: ")
    assert f"full log: {run.log}" in proc.stderr
    assert run.read_result()["status"] == "failed"


def test_tensorboard_shows_every_step_once_after_a_killed_attempt(tmp_path):
    """A killed attempt loses the scalars its writer had not flushed, some of them at or before the checkpoint that
    the next attempt starts after: the resume writes those again from metrics.jsonl, and forgets what the killed
    attempt logged past the checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    rows = [{"step": s, "time": 1000.0 + s, "train_loss": 1.0 / s, "time/step_s": 0.1} for s in range(1, 11)]
    board = tmp_path / "tensorboard"
    writer = SummaryWriter(log_dir=str(board))
    for row in rows:
        if row["step"] not in (7, 8):  # never flushed before the kill; 9 and 10 came after the checkpoint at 8
            writer.add_scalar("train_loss", row["train_loss"], global_step=row["step"], walltime=row["time"])
            writer.add_scalar("time/step_s", row["time/step_s"], global_step=row["step"], walltime=row["time"])
    writer.close()

    def steps(tag="train_loss"):
        events = EventAccumulator(str(board))
        events.Reload()
        return [e.step for e in events.Scalars(tag)]

    assert steps() == [1, 2, 3, 4, 5, 6, 9, 10]
    resume.tensorboard_purge(board, 8, rows[:8])
    assert steps() == steps("time/step_s") == list(range(1, 9))
    resume.tensorboard_purge(board, 8, rows[:8])  # nothing missing now: only what lies past the checkpoint goes
    assert steps() == list(range(1, 9))
