"""One summary per run, computed from its `metrics.jsonl`, `result.json` and `config.json` alone.

Step statistics leave out the first logged step (warm-up: allocator growth, kernel selection, lazy imports) when a
run has more than one, and steps the profiler traced (they carry its cost; they get their own median). Time per
epoch counts every step, because an epoch's wall time includes them all.

Two clocks: `time/step_s` is sd3fit's step timing (GPU timeline on a GPU) and exists only with step metrics on;
the interval between consecutive logged steps is the host's wall clock and exists for every run, so it is the
number that compares runs with measuring on and off.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

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
    range_share: dict[str, float] = field(default_factory=dict)

    @property
    def peak_memory(self) -> tuple[float | None, str]:
        """The peak a figure shows: torch's allocated peak on a GPU, the process's resident peak on a CPU."""
        if self.peak_allocated_gib is not None:
            return self.peak_allocated_gib, "peak allocated (GiB)"
        return self.peak_rss_gib, "peak resident memory, CPU run (GiB)"

    def row(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "range_share"}
        for name in RANGES:
            out[f"{name}_share"] = self.range_share.get(name)
        return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl; is it a run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _values(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if isinstance(r.get(key), (int, float))]


def summarize(run_dir: Path) -> RunSummary:
    run_dir = Path(run_dir)
    rows = read_rows(run_dir)
    result, config = _read_json(run_dir / "result.json"), _read_json(run_dir / "config.json")
    intervals = [(b, b["time"] - a["time"]) for a, b in zip(rows, rows[1:])]  # skips the first row: warm-up
    steady_all = rows[1:] if len(rows) > 1 else rows
    steady = [r for r in steady_all if not r.get("profiler/active")]
    profiled = [r for r in steady_all if r.get("profiler/active")]
    step_times = _values(steady, "time/step_s")
    plain_intervals = [dt for r, dt in intervals if not r.get("profiler/active")]
    profiled_intervals = [dt for r, dt in intervals if r.get("profiler/active")]
    median = lambda xs: float(np.median(xs)) if xs else None  # noqa: E731
    per_epoch: dict[object, float] = {}
    for r in rows:
        if isinstance(r.get("time/step_s"), (int, float)):
            per_epoch[r.get("epoch")] = per_epoch.get(r.get("epoch"), 0.0) + r["time/step_s"]
    total = sum(step_times)
    shares = {}
    if total > 0:
        for name in RANGES:
            shares[name] = sum(_values(steady, f"time/{name}_s")) / total
    throughput = _values(steady, "throughput/samples_per_s")
    peak = lambda key: max(_values(rows, key)) if _values(rows, key) else None  # noqa: E731
    return RunSummary(
        run=run_dir.name,
        preset=Path(config.get("preset", "")).stem or "?",
        device=(result.get("measure") or {}).get("device", "unknown"),
        steps=len(rows),
        median_interval_s=median(plain_intervals),
        median_profiled_interval_s=median(profiled_intervals),
        median_step_s=median(step_times),
        p90_step_s=float(np.percentile(step_times, 90)) if step_times else None,
        median_profiled_step_s=median(_values(profiled, "time/step_s")),
        epoch_s=float(np.mean(list(per_epoch.values()))) if per_epoch else None,
        samples_per_s=median(throughput),
        peak_allocated_gib=peak("mem/peak_allocated_gib"),
        peak_reserved_gib=peak("mem/peak_reserved_gib"),
        peak_rss_gib=peak("mem/peak_rss_gib"),
        range_share=shares,
    )
