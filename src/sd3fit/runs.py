"""What a run folder holds and where: one folder per run under `runs/`, never reused.

    runs/<name>/
      config.json            the resolved config: sd3fit keys, SimpleTuner options, preset, overrides, versions
      multidatabackend.json  the dataset definition with sd3fit's placeholders filled in
      train.log              everything the trainer printed
      metrics.jsonl          one JSON object per logged optimizer step
      result.json            how the run ended and what it produced
      sd3fit.pid             the id of the sd3fit process training it, while it does
      output/                SimpleTuner's output_dir: adapter or pipeline, checkpoints (checkpoint-<step>/)
      cache/                 text-embedding and VAE-latent caches (unless the dataset definition says otherwise)
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from sd3fit.errors import UserError
from sd3fit.host import GPU_BUSY_GIB

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def runs_root(arg: str | None = None) -> Path:
    return Path(arg or os.environ.get("SD3FIT_RUNS_DIR") or "runs").expanduser().resolve()


@dataclass(frozen=True)
class Run:
    dir: Path

    config = property(lambda self: self.dir / "config.json")
    datasets = property(lambda self: self.dir / "multidatabackend.json")
    log = property(lambda self: self.dir / "train.log")
    metrics = property(lambda self: self.dir / "metrics.jsonl")
    result = property(lambda self: self.dir / "result.json")
    output = property(lambda self: self.dir / "output")
    cache = property(lambda self: self.dir / "cache")
    pid = property(lambda self: self.dir / "sd3fit.pid")  # the sd3fit process training it, while it does
    ranks = property(lambda self: self.dir / "ranks")  # with several processes: each other one's own records

    def rank_dir(self, rank: int) -> Path:
        """Where process `rank` writes its own metrics, TensorBoard scalars and result: rank 0 in the run folder
        (the run's files), every other in ranks/rank<N>."""
        return self.dir if rank == 0 else self.ranks / f"rank{rank}"

    def trainer_pid(self) -> int | None:
        """The id of the live sd3fit process that trains this run, or None."""
        try:
            pid = int(self.pid.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    @property
    def name(self) -> str:
        return self.dir.name

    def read_config(self) -> dict:
        return _read_object(self.config)

    def read_result(self) -> dict | None:
        return _read_object(self.result) if self.result.is_file() else None

    def read_metrics(self) -> list[dict]:
        """The rows of metrics.jsonl; a last line cut short by a killed run is left out, any other bad line is an error."""
        if not self.metrics.is_file():
            return []
        lines = [line for line in self.metrics.read_text().splitlines() if line.strip()]
        rows = []
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):
                    break
                raise UserError(f"{self.metrics} line {n} is not JSON; the file was changed or damaged") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int) or not isinstance(row.get("time"), (int, float)):
                raise UserError(f"{self.metrics} line {n} is not a metrics row (needs step and time)")
            rows.append(row)
        return rows


def values(rows: list[dict], key: str) -> list[float]:
    """The numbers under `key` in metrics rows (rows without it, or with null, are skipped)."""
    return [r[key] for r in rows if isinstance(r.get(key), (int, float))]


def largest(rows: list[dict], key: str) -> float | None:
    found = values(rows, key)
    return max(found) if found else None


def shared_gpu(row: dict) -> bool:
    """Whether another process held GPU memory when a benchmark row's run started: its device-wide figures are then
    not its own."""
    return (row.get("gpu_in_use_before_gib") or 0) > GPU_BUSY_GIB


def _read_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; was the run cut short?") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data


def require_free_folder(path: Path, option: str) -> None:
    """An output folder must be new or empty: sd3fit never writes over earlier results."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path} already exists and is not empty; choose another {option}")


def plan(root: Path, name: str | None, preset_name: str) -> Run:
    """Choose the run folder without creating it. An explicit name must be free; a generated one always is."""
    if name is not None:
        if not _NAME.match(name):
            raise UserError(f"run name {name!r} may hold only letters, digits, '.', '_' and '-'")
        run = Run(root / name)
        if run.dir.exists() and any(run.dir.iterdir()):
            raise UserError(f"run folder {run.dir} already holds a run; choose another --name or move that folder away")
        return run
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{preset_name}-{stamp}"
    candidate, n = root / base, 2
    while candidate.exists():
        candidate, n = root / f"{base}-{n}", n + 1
    return Run(candidate)


def create(run: Run, named: bool = True) -> Run:
    """Create the folder and return the run that owns it; never share a folder with another run started at the same
    moment. A generated name (`named=False`) is claimed by `mkdir`, which only one process can win; the loser moves
    on to the next free suffix (`<name>-2`, `<name>-3`, ...). A folder the user named may already exist empty; it
    is claimed by creating its config.json exclusively, and the loser is refused."""
    run.dir.parent.mkdir(parents=True, exist_ok=True)
    if not named:
        base, n = run.dir.name, 2
        while True:
            try:
                run.dir.mkdir()
                return run
            except FileExistsError:
                run, n = Run(run.dir.parent / f"{base}-{n}"), n + 1
    run.dir.mkdir(exist_ok=True)
    try:
        run.config.open("x").close()  # written in full by the caller next
    except FileExistsError:
        raise UserError(f"run folder {run.dir} already holds a run; choose another --name") from None
    if any(p.name != run.config.name for p in run.dir.iterdir()):
        run.config.unlink()
        raise UserError(f"run folder {run.dir} already holds a run; choose another --name")
    return run


# SimpleTuner 4.10.1 (helpers/utils/checkpoint_manager.py) writes this file last into a checkpoint being saved, after
# the weights, optimizer state and manifest; with checkpointing_use_tempdir the folder is then renamed from
# `checkpoint-<step>-tmp`. A checkpoint without it was cut off while saving.
CHECKPOINT_GUARD = ".guard"
CHECKPOINT_MANIFEST = "checkpoint_manifest.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    problem: str | None  # None when complete

    @property
    def complete(self) -> bool:
        return self.problem is None


def _checkpoint_problem(path: Path) -> str | None:
    if not (path / CHECKPOINT_GUARD).is_file():
        return f"no {CHECKPOINT_GUARD} file: saving was cut off"
    manifest = path / CHECKPOINT_MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text()).get("files", [])
        except (json.JSONDecodeError, AttributeError):
            return f"{CHECKPOINT_MANIFEST} is damaged"
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            return f"{len(missing)} file(s) listed in {CHECKPOINT_MANIFEST} are missing, e.g. {missing[0]}"
    return None


def checkpoints(run: Run) -> list[Checkpoint]:
    """The run's step checkpoints (`output/checkpoint-<step>`), oldest first, each marked complete or not. Folders
    still being written (`checkpoint-<step>-tmp`) and other suffixes (`-rolling`) are not listed."""
    if not run.output.is_dir():
        return []
    found = []
    for path in run.output.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            found.append(Checkpoint(int(match.group(1)), path, _checkpoint_problem(path)))
    return sorted(found, key=lambda c: c.step)


def last_checkpoint(run: Run) -> Checkpoint | None:
    """The complete checkpoint of the highest step, or None."""
    complete = [c for c in checkpoints(run) if c.complete]
    return complete[-1] if complete else None


def shown(path) -> str:
    """A path as the user would type it: relative when it lies below the current directory."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
