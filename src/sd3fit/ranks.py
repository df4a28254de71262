"""The processes of a run trained by several, side by side in its result.json.

Each process measures itself (`sd3fit.simpletuner.launcher`): rank 0 writes the run's files, every other rank its
own metrics.jsonl, TensorBoard scalars and result.json under ranks/rank<N>. Once the launch has ended, every
process has written its record; `gather` adds them to the run's result.json as `ranks`, one entry per process:
its status, whole-run memory peaks and median step time. No process waits for another to do this.
"""

from __future__ import annotations

import json
import statistics

from sd3fit.measure.steps import STEP_TIME
from sd3fit.runs import Run


def _entry(rank: int, result: dict, rows: list[dict]) -> dict:
    steps = [row[STEP_TIME] for row in rows if isinstance(row.get(STEP_TIME), (int, float))]
    return {"rank": rank, "status": result.get("status"), "wall_seconds": result.get("wall_seconds"),
            "memory": result.get("measure", {}).get("memory", {}),
            "step_s_median": statistics.median(steps) if steps else None}


def gather(run: Run, processes: int) -> list[dict] | None:
    """Add each process's record to the run's result.json (`ranks`) and return the entries; None when the run
    wrote no result (a process that wrote none is listed with status None)."""
    main = run.read_result()
    if main is None:
        return None
    entries = [_entry(0, main, run.read_metrics())]
    for rank in range(1, processes):
        own = Run(run.rank_dir(rank))
        entries.append(_entry(rank, own.read_result() or {}, own.read_metrics()))
    main["ranks"] = entries
    run.result.write_text(json.dumps(main, indent=2) + "\n")
    return entries
