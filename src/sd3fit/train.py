"""`sd3fit train`: check everything that can be checked cheaply, write the run folder, start the launcher.

All checks run before the run folder exists, so bad input leaves no trace and touches no earlier run. Training
itself runs in a child process (`python -m sd3fit.simpletuner.launcher`, or `accelerate launch` for several
processes) whose working directory is the run folder: SimpleTuner writes stray files (debug.log, caches) into its
working directory, and they belong to the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from sd3fit import datasets, fit, hub, presets, runs, schema


@dataclass
class Prepared:
    run: runs.Run
    preset: presets.Preset
    model_source: str
    record: dict  # what config.json holds
    backends: list[dict]  # what multidatabackend.json holds


def versions() -> dict[str, str | None]:
    """Python's and the training stack's versions, as records name them."""
    out = {"python": sys.version.split()[0]}
    for pkg in ("sd3fit", "simpletuner", "torch", "diffusers", "transformers", "peft", "accelerate", "optimum-quanto"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def prepare(preset_arg: str | None, overrides: list[str], name: str | None = None, runs_dir: str | None = None,
            check_fit: bool = True) -> Prepared:
    """Check preset, GPU memory, model and dataset; plan the run folder but create nothing (see `write`).
    `check_fit=False` skips refusing a GPU smaller than the configuration's measured peak."""
    preset = presets.load(preset_arg, overrides)
    if preset.uses_demo:
        from sd3fit.demo import ensure_demo_assets

        ensure_demo_assets(presets.demo_assets_dir())
    own, options = schema.split(preset.values)
    if check_fit:
        fit.check(preset.name, options, fit.gpu())
    source = hub.check_model(options["pretrained_model_name_or_path"])
    run = runs.plan(runs.runs_root(runs_dir), name, preset.name)
    dataset_dir = own.get("dataset_dir")
    backends = datasets.render(
        Path(options["data_backend_config"]),
        {"dataset_dir": str(Path(dataset_dir).expanduser().resolve()) if dataset_dir else "", "run_dir": str(run.dir)},
    )
    images = datasets.check(backends, options)
    options = {**options, "output_dir": str(run.output), "data_backend_config": str(run.datasets)}
    record = {
        "preset": presets.portable(preset.path),
        "overrides": [presets.portable_override(o) for o in preset.overrides],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_source": source,
        "images": images,
        "versions": versions(),
        "sd3fit": own,
        "simpletuner": options,
    }
    return Prepared(run=run, preset=preset, model_source=source, record=record, backends=backends)


def write(prepared: Prepared) -> runs.Run:
    """Create the run folder and write the resolved config and dataset definition into it."""
    run = prepared.run
    runs.create(run)
    run.datasets.write_text(json.dumps(prepared.backends, indent=2) + "\n")
    run.config.write_text(json.dumps(prepared.record, indent=2) + "\n")
    shutil.copyfile(prepared.preset.path, run.dir / "preset.json")
    return run


def child_env(prepared: Prepared) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not sys.stdout.isatty():
        env.setdefault("SIMPLETUNER_DISABLE_COLORS", "1")
    options = prepared.preset.values
    if prepared.model_source in ("local", "cached") and not options.get("push_to_hub"):
        # nothing in this run needs the Hub: don't let libraries stall on it
        env.setdefault("HF_HUB_OFFLINE", "1")
    if "wandb" in str(options.get("report_to", "")) and not _wandb_credentials(env):
        # no key: log to the run folder (sync later with `wandb sync`) instead of prompting or calling the network
        if not env.get("WANDB_MODE"):
            env["WANDB_MODE"] = "offline"
    return env


def _wandb_credentials(env: dict[str, str]) -> bool:
    if env.get("WANDB_API_KEY"):
        return True
    netrc = Path(env.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def launch(prepared: Prepared, num_processes: int = 1, env: dict[str, str] | None = None, echo: bool = True) -> int:
    """Run the launcher, copying its output to train.log (and to the console with `echo`); return its exit code.
    `env` adds variables for the trainer's process (the benchmark's memory cap)."""
    run = prepared.run
    module = ["-m", "sd3fit.simpletuner.launcher", str(run.dir)]
    if num_processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes), *module]
    else:
        cmd = [sys.executable, *module]
    with run.log.open("ab") as log:
        proc = subprocess.Popen(cmd, cwd=run.dir, env={**child_env(prepared), **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                log.write(chunk)
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
        except KeyboardInterrupt:
            proc.terminate()
        return proc.wait()


def shown(path) -> str:
    """A path as the user would type it: relative when it lies below the current directory."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def summary(run: runs.Run, elapsed: float) -> str:
    result = run.read_result() or {}
    lines = [f"run folder: {shown(run.dir)}"]
    for key, label in (("adapter", "LoRA adapter"), ("pipeline", "fine-tuned pipeline")):
        if key in result.get("artifacts", {}):
            lines.append(f"{label}: {shown(result['artifacts'][key])}")
    losses = [m["train_loss"] for m in run.read_metrics() if "train_loss" in m]
    if losses:
        lines.append(f"steps: {result.get('global_step')}, last train_loss: {losses[-1]}")
    lines.append(f"time: {elapsed:.0f} s in all, {result.get('wall_seconds', 0):.0f} s of it in SimpleTuner's run sequence")
    if result.get("status") == "finished" and result.get("caught_ooms"):
        lines.append(f"warning: SimpleTuner caught {result['caught_ooms']} out-of-memory error(s) and went on (see "
                     f"{shown(run.log)}): this preset does not fit this GPU as configured")
    return "\n".join(lines)
