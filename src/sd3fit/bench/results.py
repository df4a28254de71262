"""The results files of a benchmark, and recomputing their rows from the run folders.

    OUT/results.jsonl   one JSON object per row, appended as each run ends (a killed benchmark keeps its rows)
    OUT/results.csv     the same rows, rewritten after each run

    python -m sd3fit.bench.results BENCH_DIR    recompute every row into results-rescanned.jsonl (and .csv)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from sd3fit.bench.rows import FIELDS, from_run
from sd3fit.errors import UserError
from sd3fit.runs import Run

RESULTS = "results.jsonl"
CSV = "results.csv"


def append(out: Path, row: dict) -> None:
    row = {key: row.get(key) for key in FIELDS}
    with (out / RESULTS).open("a") as f:
        f.write(json.dumps(row) + "\n")
    _write_csv(out / CSV, read(out / RESULTS))


def _write_csv(path: Path, found: list[dict]) -> None:
    partial = path.with_name(path.name + ".partial")  # renamed into place: an interrupt never leaves half a table
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(FIELDS))
        writer.writeheader()
        # lists (speed_patches) as words, not Python's repr: a spreadsheet cell `compile_blocks fused_optimizer`
        writer.writerows({k: " ".join(v) if isinstance(v, list) else v for k, v in row.items()} for row in found)
    partial.replace(path)


def read(path: Path) -> list[dict]:
    """The rows of a results file (or of OUT/results.jsonl when given the folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        raise UserError(f"{path} not found; give a benchmark's results.jsonl or its folder")
    rows = []
    text = path.read_text()
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and not text.endswith("\n"):
                break  # cut short by a killed benchmark: that run has no row and --resume runs it again
            raise UserError(f"{path} line {n} is not JSON; the file was changed or damaged") from None
        if not isinstance(row, dict) or "preset" not in row or "status" not in row:
            raise UserError(f"{path} line {n} is not a benchmark row (needs preset and status)")
        rows.append(row)
    return rows


def rescan(out: Path) -> Path:
    """Recompute every row of OUT/results.jsonl from its run folder under OUT/runs/ with the current rules, into
    OUT/results-rescanned.jsonl (and .csv); the benchmark's own file stays as it was written. Machine facts,
    timings of the whole process and the model FLOPs are kept from the original rows."""
    out = Path(out)
    target = out / "results-rescanned.jsonl"
    if target.exists():
        raise UserError(f"{target} already exists; move it away to rescan again")
    written = []
    for row in read(out):
        run = Run(out / "runs" / Path(row["run"]).name)
        if not run.config.is_file():
            raise UserError(f"{run.dir} is missing; rescanning needs the run folders beside {RESULTS}")
        result = run.read_result() or {}
        code = 0 if result.get("status") == "finished" else 1
        flops = row["model_tflop_per_image"] * 1e12 if row.get("model_tflop_per_image") else None
        fresh = from_run(run, code, row["warmup_steps"], flops, row.get("peak_tflops"))
        written.append({key: fresh.get(key, row.get(key)) for key in FIELDS})
    target.write_text("".join(json.dumps(r) + "\n" for r in written))
    _write_csv(target.with_suffix(".csv"), written)
    return target


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m sd3fit.bench.results BENCH_DIR   (recompute its rows into results-rescanned.jsonl)")
    try:
        print(rescan(Path(sys.argv[1])))
    except UserError as exc:
        sys.exit(f"sd3fit: error: {exc}")
