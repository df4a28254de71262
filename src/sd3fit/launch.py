"""Start the trainer for a prepared run folder and report on it: the child process (`python -m
sd3fit.simpletuner.launcher`, or `accelerate launch` for several processes) runs with the run folder as its working
directory, because SimpleTuner writes stray files (debug.log, caches) there and they belong to the run; its output
goes to train.log and the console.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sd3fit import host, ranks, runs
from sd3fit.errors import UserError
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


def _die_with_parent() -> None:
    """In the trainer's process, before it starts: Linux sends it SIGTERM if sd3fit dies first (even by SIGKILL), so
    it saves a checkpoint and stops instead of training on unattended."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _end_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the trainer's process group (data workers it forked, say)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Forwarder:
    """While the trainer runs: the first SIGINT or SIGTERM is passed on to it (it stops at the next step with a
    checkpoint); a second ends its whole process group at once."""

    def __init__(self, proc: subprocess.Popen, say):
        self.proc, self.say = proc, say
        self.received: list[int] = []
        self._old = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._old[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc):
        for signum, old in self._old.items():
            signal.signal(signum, old)

    def handle(self, signum, frame) -> None:
        self.received.append(signum)
        if len(self.received) == 1:
            self.say(f"sd3fit: {signal.Signals(signum).name}: the trainer stops after this step and saves a "
                     "checkpoint; press Ctrl-C again to stop at once")
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass
        else:
            self.say("sd3fit: stopping at once")
            _end_group(self.proc)


def check_count(num_processes: int) -> None:
    """Refuse a number of processes below one (before a preset is chosen for that many cards)."""
    if num_processes < 1:
        raise UserError(f"--num-processes must be 1 or more, not {num_processes}")


def check_processes(values: dict, num_processes: int) -> None:
    """Refuse, before anything loads, more processes than GPUs, and several processes for a preset that cannot
    train in several."""
    check_count(num_processes)
    gpus = host.gpu_count() if num_processes > 1 else None
    if gpus and num_processes > gpus:  # no GPU at all: processes on the CPU (gloo), as many as asked
        raise UserError(f"--num-processes {num_processes} asks for one process per GPU, and nvidia-smi finds {gpus} "
                        f"visible GPU{'s' if gpus > 1 else ''}; use --num-processes {gpus} or fewer")
    if num_processes > 1 and values.get("optimizer_release_gradients"):
        # each process would step its own gradient before the processes have averaged them
        raise UserError("optimizer_release_gradients steps each parameter before the processes have averaged its "
                        "gradient; train with --num-processes 1 or set optimizer_release_gradients=false")


def launch(prepared: Prepared, num_processes: int = 1, env: dict[str, str] | None = None, echo: bool = True,
           forward_signals: bool = False, console=None, stop_at_once: bool = False) -> int:
    """Run the launcher, copying its output to train.log (and to the console with `echo`, or through `console`,
    which shows less); return its exit code. `env` adds variables for the trainer's process (the benchmark's memory
    cap, the checkpoint to resume from).

    The trainer runs in a process group of its own, so a Ctrl-C at the terminal reaches sd3fit only. A
    KeyboardInterrupt here sends it SIGTERM; with `forward_signals`, SIGINT and SIGTERM are passed on as they came
    (a second one kills it) and the return value is 128 + the signal's number unless training finished anyway.
    With `stop_at_once` (a benchmark's runs, which nobody resumes) a KeyboardInterrupt kills the trainer's group at
    once: a trainer still compiling its first step can take minutes to reach the step it would stop after.
    Whatever the trainer leaves running in its group when it exits is killed."""
    run = prepared.run
    module = ["-m", "sd3fit.simpletuner.launcher", str(run.dir)]
    if num_processes > 1:
        # --multi_gpu: one process per device through torch's launcher; accelerate infers it only where it counts
        # GPUs, and without it a CPU-only machine silently runs one process (each process then decides CPU or GPU
        # itself: sd3fit.simpletuner.launcher)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
               *module]
    else:
        cmd = [sys.executable, *module]
    run.pid.write_text(f"{os.getpid()}\n")
    try:
        code = _launch(run, cmd, {**child_env(prepared), **(env or {})}, echo, forward_signals, console, stop_at_once)
        if num_processes > 1:
            ranks.gather(run, num_processes)  # every process has ended: its record is complete
        return code
    finally:
        run.pid.unlink(missing_ok=True)


def _launch(run: runs.Run, cmd: list[str], env: dict[str, str], echo: bool, forward_signals: bool, console,
            stop_at_once: bool = False) -> int:
    # unbuffered: each chunk reaches train.log at once, so nothing is lost if sd3fit itself is killed
    with run.log.open("ab", buffering=0) as log:
        proc = subprocess.Popen(cmd, cwd=run.dir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        say = console.say if console is not None else (lambda line: print(line, flush=True))
        forwarder = _Forwarder(proc, say) if forward_signals else contextlib.nullcontext()
        with forwarder:
            terminated = False
            while True:
                try:
                    _copy_output(proc, log, echo, console)
                    break
                except KeyboardInterrupt:
                    if terminated or stop_at_once:
                        _end_group(proc)
                    else:
                        proc.terminate()
                        terminated = True
            code = proc.wait()
        _end_group(proc)
        proc.stdout.close()
        if console is not None:
            console.close()
    if forward_signals and forwarder.received and code != 0:
        return 128 + forwarder.received[0]
    return code


def _copy_output(proc: subprocess.Popen, log, echo: bool, console) -> None:
    """Copy the trainer's output until its end; once the trainer has exited, what it left running is ended, so
    nothing holds the pipe open."""
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            if selector.select(timeout=0.5):
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                log.write(chunk)
                if console is not None:
                    console.feed(chunk)
                elif echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
            elif proc.poll() is not None:
                _end_group(proc)
            if console is not None:
                console.tick()


def log_tail(run: runs.Run, lines: int) -> list[str]:
    """The last lines of train.log as a terminal showed them: of a progress bar redrawn with carriage returns, only
    its last state."""
    if not run.log.is_file():
        return []
    with run.log.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 256 * 1024))
        text = f.read().decode(errors="replace")
    shown_lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.splitlines()]
    return [line for line in shown_lines if line.strip()][-lines:]


def _out_of_memory(run: runs.Run, result: dict) -> str:
    from sd3fit import fit

    where = f" during {result['oom_phase']}" if result.get("oom_phase") else ""
    snapshot = run.dir / "memory" / "oom.pickle"
    seen = f" (allocator snapshot: {shown(snapshot)}, open it at pytorch.org/memory_viz)" if snapshot.is_file() else ""
    try:
        found = fit.smaller(run)
    except Exception:  # a config the fit check cannot read must not hide the out-of-memory line
        found = None
    then = f"; {found[0]} needs less ({found[1]:.2f} GiB measured for the whole run)" if found else ""
    return f"out of memory{where}{seen}{then}"


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
    if result.get("out_of_memory"):
        lines.append(_out_of_memory(run, result))
    if result.get("status") == "finished" and result.get("caught_ooms"):
        lines.append(f"warning: SimpleTuner caught {result['caught_ooms']} out-of-memory error(s) and went on (see "
                     f"{shown(run.log)}): this preset does not fit this GPU as configured")
    return "\n".join(lines)
