"""Start the trainer for a prepared run folder and report on it: the child process (`python -m
sd3fit.simpletuner.launcher`, or `accelerate launch` for several processes) runs with the run folder as its working
directory, because SimpleTuner writes stray files (debug.log, caches) there and they belong to the run; its output
goes to train.log and the console.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sd3fit import runs
from sd3fit.runs import shown

if TYPE_CHECKING:
    from sd3fit.train import Prepared

# PyTorch's allocator grows segments in place instead of caching blocks of fixed sizes: far less memory reserved
# but unused (fragmentation) when a run's phases allocate differently (caching, training, validation); a value the
# user sets is kept
CUDA_ALLOC_CONF = "expandable_segments:True"


def child_env(prepared: Prepared) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
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
