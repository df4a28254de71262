"""`sd3fit runs`: one line per run folder, read from the folder's files only.

status is result.json's (finished, failed, interrupted); a run without one is `running` while the sd3fit process
that trains it is alive (`runs.Run.trainer_pid`) and `stopped` otherwise (killed before it could write a result:
`sd3fit train --resume` continues it from its last complete checkpoint).
"""

from __future__ import annotations

from pathlib import Path

from sd3fit import runs
from sd3fit.errors import UserError
from sd3fit.runs import shown

COLUMNS = ("run", "status", "steps", "last loss", "peak GiB", "weights")


def row(run: runs.Run) -> tuple[str, ...]:
    try:
        config = run.read_config()
        result = run.read_result() or {}
        metrics = run.read_metrics()
    except UserError as exc:
        return (run.name, "unreadable", "", "", "", str(exc))
    status = result.get("status") or ("running" if run.trainer_pid() else "stopped")
    total = config.get("simpletuner", {}).get("max_train_steps")
    step = result.get("global_step", metrics[-1]["step"] if metrics else 0)
    losses = [m["train_loss"] for m in metrics if isinstance(m.get("train_loss"), (int, float))]
    peak = ((result.get("measure") or {}).get("memory") or {}).get("peak_reserved_gib")
    artifacts = result.get("artifacts", {})
    weights = artifacts.get("adapter") or artifacts.get("pipeline")
    if not weights:
        checkpoint = runs.last_checkpoint(run)
        weights = str(checkpoint.path) if checkpoint else ""
    return (run.name, status, f"{step}/{total}" if total else str(step), f"{losses[-1]:.4f}" if losses else "",
            f"{peak:.2f}" if isinstance(peak, (int, float)) else "", shown(weights) if weights else "")


def table(root: Path) -> str:
    """The runs under `root`, by name, as aligned columns."""
    found = sorted(p for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    if not found:
        raise UserError(f"no runs in {shown(root)}; train one with `sd3fit train` (or give --runs-dir)")
    rows = [COLUMNS, *(row(runs.Run(p)) for p in found)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)
