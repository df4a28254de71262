"""Write a report folder: summary.md, summary.csv and the two figures per GPU model.

Runs on different devices are never drawn in one figure: each device gets its own pair of figures.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from sd3fit.report import figures
from sd3fit.report.summary import RANGES, RunSummary


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(runs: list[RunSummary]) -> str:
    head = ["run", "preset", "device", "steps", "median step (s)", "p90 step (s)", "profiled step (s)",
            "median log interval (s)", "profiled log interval (s)", "time per epoch (s)", "samples/s",
            "step peak allocated (GiB)", "step peak reserved (GiB)", "run peak allocated (GiB)",
            "run peak reserved (GiB)", "peak RSS (GiB)"] + [f"{r} %" for r in RANGES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [r.run, r.preset, r.device, r.steps, r.median_step_s, r.p90_step_s, r.median_profiled_step_s,
                 r.median_interval_s, r.median_profiled_interval_s, r.epoch_s, r.samples_per_s,
                 r.peak_allocated_gib, r.peak_reserved_gib, r.run_peak_allocated_gib, r.run_peak_reserved_gib,
                 r.peak_rss_gib]
        cells += [None if r.range_share.get(n) is None else 100 * r.range_share[n] for n in RANGES]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write(runs: list[RunSummary], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.md", out / "summary.csv"]
    notes = ("Step statistics leave out each run's first logged step (warm-up) and steps the profiler traced (shown\n"
             "apart as 'profiled'). Time per epoch is the median step time times the steps of a complete epoch. Step\n"
             "times are sd3fit's step timing (GPU timeline on a GPU); log intervals are the host's wall clock between\n"
             "logged steps, present with measuring off too. Step peaks are inside training steps; run peaks include\n"
             "model loading, text-encoder caching and validation. Shares are of the training step's time; `other` is\n"
             "time inside a step but outside the named ranges.\n")
    (out / "summary.md").write_text(markdown(runs) + "\n" + notes)
    with (out / "summary.csv").open("w", newline="") as f:
        rows = [r.row() for r in runs]
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    devices = sorted({r.device for r in runs})
    for device in devices:
        group = [r for r in runs if r.device == device]
        suffix = "" if len(devices) == 1 else f"-{slug(device)}"
        for name, draw in (("runtime_per_epoch", figures.runtime_per_epoch), ("peak_memory", figures.peak_memory)):
            path = out / f"{name}{suffix}.png"
            figures.save(draw(group, device), path)
            written.append(path)
    return written
