"""One results row per benchmarked preset and budget, computed from its run folder alone (`sd3fit.bench.results`
keeps the rows in files).

Step statistics cover the steps after warm-up (`global step > warmup_steps`) and use sd3fit's step timing
(`time/step_s`: GPU timeline on a GPU). Peaks inside steps are the rows' maxima over all steps; run peaks are
result.json's (model loading, quantization, caching, validation and saving included).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sd3fit.runs import Run, largest, values  # not from sd3fit.report: bench never imports the report

FIELDS = (
    "preset", "budget", "budget_gib", "speed", "speed_patches", "round", "status", "error", "model_type", "lora_rank", "base_model_precision",
    "resolution", "batch_size", "processes", "warmup_steps", "measured_steps", "global_step",
    "step_s_median", "step_s_p10", "step_s_p90", "interval_s_median", "images_per_s",
    "model_tflop_per_image", "peak_tflops", "mfu",
    "step_peak_allocated_gib", "step_peak_reserved_gib", "run_peak_allocated_gib", "run_peak_reserved_gib",
    "outside_allocator_gib", "run_peak_device_gib", "largest_rank_device_gib", "allocator_cap_gib", "gpu_in_use_before_gib", "run_peak_rss_gib", "peak_phase", "phase_reserved_gib", "card", "alloc_retries", "parameters", "trainable_parameters", "quantized_modules", "wall_s",
    "model", "model_label", "run",
    "gpu", "gpu_memory_gib", "driver", "cuda", "cpu", "python", "sd3fit", "simpletuner", "torch", "diffusers",
    "transformers", "peft", "accelerate", "optimum_quanto", "torchao", "bitsandbytes", "torch_optimi", "ram_gib",
    "date", "command",
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
        where = f" during {result['oom_phase']}" if result.get("oom_phase") else ""
        return "out_of_memory", f"{oom or result.get('error') or 'out of memory'}{where} ({stage})"
    if result.get("status") == "finished" and exit_code == 0:
        return "finished", None
    error = result.get("error") or f"the trainer exited with status {exit_code}" + ("" if result else " and wrote no result")
    return "failed", error.splitlines()[0]


def _phase_peaks(phases: dict) -> str | None:
    """Each part of the run's reserved peak, in the order the parts ran: `loading=3.10 text_embeds=5.02 ...`."""
    shown = [f"{name}={part['peak_reserved_gib']:.2f}" for name, part in phases.items() if part.get("peak_reserved_gib") is not None]
    return " ".join(shown) or None


def _device_peak(memory: dict) -> float | None:
    """A process's whole-run device peak: reserved + outside the allocator; None where either was not measured."""
    if memory.get("peak_reserved_gib") is None or memory.get("outside_allocator_gib") is None:
        return None
    return memory["peak_reserved_gib"] + memory["outside_allocator_gib"]


def _largest_rank(ranks: list[dict] | None) -> float | None:
    """Of a run trained by several processes, the largest whole-run device peak of any one of them; None for one
    process."""
    peaks = [peak for r in ranks or [] if (peak := _device_peak(r.get("memory") or {})) is not None]
    return max(peaks) if peaks else None


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
    processes = int(result.get("processes") or 1)  # that trained together, each on its own batch
    median = float(np.median(times)) if times else None
    intervals = [b["time"] - a["time"] for a, b in zip(metrics, metrics[1:]) if b["step"] > warmup_steps]
    images_per_s = batch * processes / median if median else None
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
        "processes": processes,
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
        "run_peak_device_gib": _device_peak(memory),
        "largest_rank_device_gib": _largest_rank(result.get("ranks")),
        # what the allocator was held to at the end: the budget less the memory outside it (rows before: the budget)
        "allocator_cap_gib": (result.get("gpu_budget") or {}).get("allocator_cap_gib"),
        "run_peak_rss_gib": memory.get("peak_rss_gib"),
        "peak_phase": memory.get("peak_phase"),
        "phase_reserved_gib": _phase_peaks((result.get("measure") or {}).get("phases") or {}),
        "card": config.get("sd3fit", {}).get("card"),
        "alloc_retries": (values(metrics, "mem/alloc_retries") or [None])[-1],
        "parameters": facts.get("parameters"),
        "trainable_parameters": facts.get("trainable_parameters"),
        "quantized_modules": facts.get("quantized_modules"),
    }
