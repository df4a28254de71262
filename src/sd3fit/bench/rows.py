"""One results row per benchmarked preset and budget, computed from its run folder alone; the results file.

    OUT/results.jsonl   one JSON object per row, appended as each run ends (a killed benchmark keeps its rows)
    OUT/results.csv     the same rows, rewritten after each run

Step statistics cover the steps after warm-up (`global step > warmup_steps`) and use sd3fit's step timing
(`time/step_s`: GPU timeline on a GPU). Peaks inside steps are the rows' maxima over all steps; run peaks are
result.json's (model loading, quantization, caching, validation and saving included).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from sd3fit.errors import UserError
from sd3fit.report.summary import largest, values
from sd3fit.runs import Run

RESULTS = "results.jsonl"
CSV = "results.csv"

FIELDS = (
    "preset", "budget", "budget_gib", "status", "error", "model_type", "lora_rank", "base_model_precision",
    "resolution", "batch_size", "warmup_steps", "measured_steps", "global_step",
    "step_s_median", "step_s_p10", "step_s_p90", "interval_s_median", "images_per_s",
    "model_tflop_per_image", "peak_tflops", "mfu",
    "step_peak_allocated_gib", "step_peak_reserved_gib", "run_peak_allocated_gib", "run_peak_reserved_gib",
    "outside_allocator_gib", "run_peak_device_gib", "alloc_retries", "parameters", "trainable_parameters", "quantized_modules", "wall_s",
    "model", "model_label", "run",
    "gpu", "gpu_memory_gib", "driver", "cuda", "cpu", "python", "sd3fit", "simpletuner", "torch", "diffusers",
    "transformers", "peft", "accelerate", "optimum_quanto", "date", "command",
)

_OOM = re.compile(r"CUDA out of memory\. (Tried to allocate [0-9.]+ [KMG]iB)")


def _oom_in_log(log: Path) -> str | None:
    """The first out-of-memory error in train.log, with what the trainer was doing, as one line."""
    if not log.is_file():
        return None
    for line in log.read_text(errors="replace").splitlines():
        match = _OOM.search(line)
        if match:
            before = line[:match.start()].rsplit("[ERROR]", 1)[-1]
            doing = re.sub(r"\[[^\]]*\]|torch\.OutOfMemoryError", "", before).strip(" :")
            return f"CUDA out of memory ({match.group(1)})" + (f" in: {doing}" if doing else "")
    return None


def _status(result: dict | None, log: Path, exit_code: int) -> tuple[str, str | None]:
    """finished, out_of_memory or failed. A run counts as out of memory when any out-of-memory error happened,
    also one SimpleTuner caught and went on from (a validation image): a card must survive the whole run."""
    result = result or {}
    memory = (result.get("measure") or {}).get("memory") or {}
    oom = _oom_in_log(log)
    if result.get("out_of_memory") or memory.get("ooms") or oom:
        stage = "the trainer caught it; the run went on to its last step" if result.get("status") == "finished" else "the run stopped"
        return "out_of_memory", f"{oom or result.get('error') or 'out of memory'} ({stage})"
    if result.get("status") == "finished" and exit_code == 0:
        return "finished", None
    error = result.get("error") or f"the trainer exited with status {exit_code}" + ("" if result else " and wrote no result")
    return "failed", error.splitlines()[0]


def from_run(run: Run, exit_code: int, warmup_steps: int, flops_per_image: float | None, peak: float | None) -> dict:
    result = run.read_result()
    config = run.read_config()
    options = config.get("simpletuner", {})
    status, error = _status(result, run.log, exit_code)
    result = result or {}
    metrics = [r for r in run.read_metrics() if "time/step_s" in r]
    measured = [r for r in metrics if r["step"] > warmup_steps]
    times = values(measured, "time/step_s")
    batch = int(options.get("train_batch_size") or 1)
    median = float(np.median(times)) if times else None
    intervals = [b["time"] - a["time"] for a, b in zip(metrics, metrics[1:]) if b["step"] > warmup_steps]
    images_per_s = batch / median if median else None
    memory = (result.get("measure") or {}).get("memory") or {}
    facts = result.get("transformer") or {}
    return {
        "status": status,
        "error": error,
        "model_type": options.get("model_type"),
        "lora_rank": options.get("lora_rank") if options.get("model_type") == "lora" else None,
        "base_model_precision": options.get("base_model_precision"),
        "resolution": options.get("resolution"),
        "batch_size": batch,
        "warmup_steps": warmup_steps,
        "measured_steps": len(times),
        "global_step": result.get("global_step"),
        "step_s_median": median,
        "step_s_p10": float(np.percentile(times, 10)) if times else None,
        "step_s_p90": float(np.percentile(times, 90)) if times else None,
        "interval_s_median": float(np.median(intervals)) if intervals else None,
        "images_per_s": images_per_s,
        "model_tflop_per_image": flops_per_image / 1e12 if flops_per_image else None,
        "peak_tflops": peak,
        "mfu": (flops_per_image * images_per_s / (peak * 1e12)) if (flops_per_image and images_per_s and peak) else None,
        "step_peak_allocated_gib": largest(metrics, "mem/peak_allocated_gib"),
        "step_peak_reserved_gib": largest(metrics, "mem/peak_reserved_gib"),
        "run_peak_allocated_gib": memory.get("peak_allocated_gib"),
        "run_peak_reserved_gib": memory.get("peak_reserved_gib"),
        "outside_allocator_gib": memory.get("outside_allocator_gib"),
        "run_peak_device_gib": (memory["peak_reserved_gib"] + memory["outside_allocator_gib"])
        if memory.get("peak_reserved_gib") is not None and memory.get("outside_allocator_gib") is not None else None,
        "alloc_retries": (values(metrics, "mem/alloc_retries") or [None])[-1],
        "parameters": facts.get("parameters"),
        "trainable_parameters": facts.get("trainable_parameters"),
        "quantized_modules": facts.get("quantized_modules"),
    }


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
        writer.writerows(found)
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
        sys.exit("usage: python -m sd3fit.bench.rows BENCH_DIR   (recompute its rows into results-rescanned.jsonl)")
    try:
        print(rescan(Path(sys.argv[1])))
    except UserError as exc:
        sys.exit(f"sd3fit: error: {exc}")
