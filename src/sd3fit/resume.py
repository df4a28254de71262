"""`sd3fit train --resume runs/NAME`: continue a run in its own folder from its last complete checkpoint.

The run's config.json is its configuration: nothing is chosen or checked again. An override may lengthen the run
(`max_train_steps` above the recorded value) or repeat a recorded value; any other change is refused, naming the
key, before anything is written. Resuming then
- records the resume in config.json (`resumes`: when, from which checkpoint and step, to how many steps),
- removes incomplete checkpoints after that one (`checkpoint-<step>-tmp`, or a folder without its completion marker),
- drops the rows of metrics.jsonl for steps after the checkpoint's (they are trained again, and every step number
  stays in the file once); the launcher tells TensorBoard to drop them too (`tensorboard_purge`),
- and starts the trainer in the same folder with `resume_from_checkpoint` set to the checkpoint's absolute path
  (passed as `RESUME_ENV`): train.log is appended to, result.json rewritten when the run ends.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from sd3fit import presets, runs
from sd3fit.errors import UserError
from sd3fit.runs import shown

RESUME_ENV = "SD3FIT_RESUME_FROM"  # the checkpoint the launcher resumes from


def _recorded(config: dict, key: str):
    for part in ("simpletuner", "sd3fit", "defaults"):
        if key in config.get(part, {}):
            return True, config[part][key]
    return False, None


def prepare(run_arg: str, overrides: list[str]):
    """A `train.Prepared` for continuing the run in `run_arg`; nothing is written."""
    from sd3fit.train import Prepared

    path = Path(run_arg).expanduser()
    if not path.is_dir() and (runs.runs_root() / run_arg).is_dir():
        path = runs.runs_root() / run_arg  # a run's name: `--resume cats` means runs/cats
    run = runs.Run(path.resolve())
    if not run.config.is_file():
        raise UserError(f"{run_arg} is not a run folder (it has no config.json); give a folder under runs/")
    busy = run.trainer_pid()
    if busy:
        raise UserError(f"{shown(run.dir)} is being trained now (process {busy}); stop that first")
    config = run.read_config()
    options = dict(config["simpletuner"])
    steps = int(options.get("max_train_steps") or 0)
    for text in overrides:
        key, value = presets.parse_override(text)
        if key == "max_train_steps":
            if isinstance(value, bool) or not isinstance(value, int) or value < steps:
                raise UserError(f"option max_train_steps can only grow when resuming {shown(run.dir)}: it is {steps}, "
                                f"not {value!r}")
            options["max_train_steps"] = value
            continue
        known, old = _recorded(config, key)
        if not known or old != value:
            was = f"it was {json.dumps(old)}" if known else "it was not set"
            raise UserError(f"option {key} cannot change when resuming {shown(run.dir)} ({was}); only a longer "
                            f"max_train_steps can: start a new run to train with other options")
    checkpoint = runs.last_checkpoint(run)
    if checkpoint is None:
        every = options.get("checkpointing_steps")
        raise UserError(f"{shown(run.dir)} has no complete checkpoint to resume from (checkpointing_steps is {every}); "
                        "start a new run instead")
    result = run.read_result() or {}
    if result.get("status") == "finished" and options.get("max_train_steps") == steps:
        raise UserError(f"{shown(run.dir)} already finished its {steps} steps; give max_train_steps=N with N above "
                        f"{steps} to train it longer")
    if checkpoint.step >= int(options.get("max_train_steps") or 0) > 0:
        raise UserError(f"{shown(run.dir)}'s last checkpoint is at step {checkpoint.step}, the run's end; give "
                        f"max_train_steps=N with N above {checkpoint.step} to train it longer")
    record = dict(config)
    record["simpletuner"] = options
    record["resumes"] = [*config.get("resumes", []), {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": checkpoint.path.name, "step": checkpoint.step,
        "max_train_steps": options.get("max_train_steps"),
    }]
    own = config.get("sd3fit", {})
    preset_path = run.dir / "preset.json"
    preset = presets.Preset(path=preset_path if preset_path.is_file() else Path(config.get("preset", "run")),
                            values={**own, **options})
    backends = json.loads(run.datasets.read_text()) if run.datasets.is_file() else []
    return Prepared(run=run, preset=preset, model_source=config.get("model_source", "hub"), record=record,
                    backends=backends, named=True), checkpoint


def write(prepared, checkpoint: runs.Checkpoint) -> dict[str, str]:
    """Record the resume and drop metrics rows past the checkpoint; return the trainer's extra environment."""
    run = prepared.run
    # incomplete checkpoints after the one resumed from: the steps they were cut off saving are trained again, and
    # saving them again would fail on the folder left behind
    stale = [c.path for c in runs.checkpoints(run) if c.step > checkpoint.step and not c.complete]
    stale += [p for p in run.output.glob("checkpoint-*-tmp") if p.is_dir()]
    if stale:
        prepared.record["resumes"][-1]["removed_incomplete"] = sorted(p.name for p in stale)
    _replace(run.config, json.dumps(prepared.record, indent=2) + "\n")
    for path in stale:
        shutil.rmtree(path)
    kept = [row for row in run.read_metrics() if row["step"] <= checkpoint.step]
    if run.metrics.is_file():
        _replace(run.metrics, "".join(json.dumps(row) + "\n" for row in kept))
    run.result.unlink(missing_ok=True)  # how the earlier attempt ended; the trainer writes a new one when it ends
    return {RESUME_ENV: str(checkpoint.path)}


def _replace(path: Path, text: str) -> None:
    """Write a file whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoint_step(path: str) -> int:
    return int(Path(path).name.removeprefix("checkpoint-"))


def tensorboard_purge(tensorboard_dir: Path, step: int, rows: list[dict] = ()) -> None:
    """Make TensorBoard show each step up to `step` once, as `rows` (metrics.jsonl, already cut at `step`) have it.

    Readers drop every earlier event at or after the step of a session-start marker (`purge_step`): a marker at
    `step + 1` forgets what an earlier attempt logged past the checkpoint. An attempt that was killed also loses
    the scalars its writer had not flushed yet (it flushes every few seconds), which may be steps the checkpoint
    already holds and no attempt trains again: the marker then goes to the first such step, and the rows from
    there to `step` are written again from metrics.jsonl."""
    from torch.utils.tensorboard import SummaryWriter

    from sd3fit.measure.sink import tensorboard_scalars

    kept = [row for row in rows if row["step"] <= step]
    logged = _tensorboard_steps(tensorboard_dir) if kept else {}
    missing = [row["step"] for row in kept
               if any(row["step"] not in logged.get(tag, ()) for tag, _ in tensorboard_scalars(row))]
    purge_from = min(missing) if missing else step + 1
    writer = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=purge_from)
    for row in kept:
        if row["step"] >= purge_from:
            for tag, value in tensorboard_scalars(row):
                writer.add_scalar(tag, value, global_step=row["step"], walltime=row.get("time"))
    writer.close()


def _tensorboard_steps(tensorboard_dir: Path) -> dict[str, set[int]]:
    """The steps TensorBoard shows for each scalar tag (nothing when there is no event file yet)."""
    if not Path(tensorboard_dir).is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={SCALARS: 0})
    events.Reload()
    return {tag: {event.step for event in events.Scalars(tag)} for tag in events.Tags().get("scalars", [])}
