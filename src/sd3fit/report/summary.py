"""One summary per run, computed from its `metrics.jsonl`, `result.json` and `config.json` alone.

Step statistics leave out the first logged step (warm-up: allocator growth, kernel selection, lazy imports) when a
run has more than one, and steps the profiler traced (they carry its cost; they get their own median). Time per
epoch is the median step time times the steps of a complete epoch (the most rows any epoch has), the study's
"runtime per epoch"; it leaves out what happens between steps (logging, checkpoints, validation).

Peak memory is given twice: inside training steps (the rows' maximum) and for the whole run (result.json: model
loading, text-encoder caching and validation included), which is what decides whether a run fits a card.

Two clocks: `time/step_s` is sd3fit's step timing (GPU timeline on a GPU) and exists only with step metrics on;
the interval between consecutive logged steps is the host's wall clock and exists for every run, so it is the
number that compares runs with measuring on and off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sd3fit.errors import UserError
from sd3fit.runs import Run, largest, values

# the step ranges as named in metrics.jsonl (time/<name>_s); kept here so reading files needs no measuring code
RANGES = ("data", "forward", "loss", "backward", "optimizer", "other")


@dataclass
class RunSummary:
    run: str
    preset: str
    device: str
    steps: int
    median_interval_s: float | None
    median_profiled_interval_s: float | None
    median_step_s: float | None
    p90_step_s: float | None
    median_profiled_step_s: float | None
    epoch_s: float | None
    samples_per_s: float | None
    peak_allocated_gib: float | None
    peak_reserved_gib: float | None
    peak_rss_gib: float | None
    run_peak_allocated_gib: float | None
    run_peak_reserved_gib: float | None
    range_share: dict[str, float] = field(default_factory=dict)

    @property
    def peak_memory(self) -> tuple[float | None, str]:
        """The peak a figure shows: the whole run's allocated peak on a GPU, the process's resident peak on a CPU."""
        if self.run_peak_allocated_gib is not None:
            return self.run_peak_allocated_gib, "peak allocated, whole run (GiB)"
        if self.peak_allocated_gib is not None:
            return self.peak_allocated_gib, "peak allocated in training steps (GiB)"
        return self.peak_rss_gib, "peak resident memory, CPU run (GiB)"

    def row(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "range_share"}
        for name in RANGES:
            out[f"{name}_share"] = self.range_share.get(name)
        return out


def read_rows(run_dir: Path) -> list[dict]:
    run = Run(Path(run_dir))
    if not run.metrics.is_file():
        raise UserError(f"{run_dir} is not a run folder with metrics.jsonl; give folders under runs/")
    return run.read_metrics()


def device_label(result: dict) -> str:
    """The GPU model, and the memory cap when the run had one: numbers under a cap are another card's."""
    device = (result.get("measure") or {}).get("device", "unknown device")
    budget = (result.get("gpu_budget") or {}).get("budget_gib")
    return f"{device}, capped at {budget:g} GiB" if budget else device


def summarize(run_dir: Path) -> RunSummary:
    run_dir = Path(run_dir)
    rows = read_rows(run_dir)
    run = Run(run_dir)
    result, config = run.read_result() or {}, run.read_config() if run.config.is_file() else {}
    intervals = [(b, b["time"] - a["time"]) for a, b in zip(rows, rows[1:])]  # skips the first row: warm-up
    steady_all = rows[1:] if len(rows) > 1 else rows
    steady = [r for r in steady_all if not r.get("profiler/active")]
    profiled = [r for r in steady_all if r.get("profiler/active")]
    step_times = values(steady, "time/step_s")
    plain_intervals = [dt for r, dt in intervals if not r.get("profiler/active")]
    profiled_intervals = [dt for r, dt in intervals if r.get("profiler/active")]
    median = lambda xs: float(np.median(xs)) if xs else None  # noqa: E731
    rows_per_epoch: dict[object, int] = {}
    for r in rows:
        rows_per_epoch[r.get("epoch")] = rows_per_epoch.get(r.get("epoch"), 0) + 1
    steps_per_epoch = max(rows_per_epoch.values()) if rows_per_epoch else 0
    total = sum(step_times)
    shares = {}
    if total > 0:
        for name in RANGES:
            shares[name] = sum(values(steady, f"time/{name}_s")) / total
    throughput = values(steady, "throughput/samples_per_s")
    run_memory = (result.get("measure") or {}).get("memory") or {}
    median_step = median(step_times)
    return RunSummary(
        run=run_dir.name,
        preset=Path(str(config.get("preset", ""))).stem or "?",
        device=device_label(result),
        steps=len(rows),
        median_interval_s=median(plain_intervals),
        median_profiled_interval_s=median(profiled_intervals),
        median_step_s=median_step,
        p90_step_s=float(np.percentile(step_times, 90)) if step_times else None,
        median_profiled_step_s=median(values(profiled, "time/step_s")),
        epoch_s=median_step * steps_per_epoch if median_step is not None else None,
        samples_per_s=median(throughput),
        peak_allocated_gib=largest(rows, "mem/peak_allocated_gib"),
        peak_reserved_gib=largest(rows, "mem/peak_reserved_gib"),
        peak_rss_gib=run_memory.get("peak_rss_gib", largest(rows, "mem/peak_rss_gib")),
        run_peak_allocated_gib=run_memory.get("peak_allocated_gib"),
        run_peak_reserved_gib=run_memory.get("peak_reserved_gib"),
        range_share=shares,
    )
