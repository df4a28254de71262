"""Would a run fit this GPU? Refuse, before anything is loaded, a configuration whose measured peak is more than
the card holds.

The measured peaks come from the committed benchmark of SD3 Medium's architecture (`REFERENCE`): a run is checked
only when every option that changes memory equals that of a benchmarked run (the model must be SD3 Medium too), so
an edited preset is never judged by another configuration's numbers. The rule is conservative: it refuses only when
the GPU's whole memory is below the peak PyTorch allocated in the benchmark run, which no card can serve (the
CUDA context and the allocator's cache need more on top).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sd3fit import sd3_medium
from sd3fit.bench.machine import nvidia_smi
from sd3fit.errors import UserError
from sd3fit.presets import PROJECT_DIR, portable

REFERENCE = PROJECT_DIR / "results" / "2026-11-28-bench-h200" / "all-presets"
SD3_MEDIUM_ID = "stabilityai/stable-diffusion-3-medium-diffusers"
# SimpleTuner options that change GPU memory (paths, step counts, learning rates and seeds do not)
MEMORY_KEYS = (
    "model_family", "model_type", "lora_type", "lora_rank", "peft_lora_target_modules", "base_model_precision",
    "resolution", "resolution_type", "train_batch_size", "gradient_checkpointing", "mixed_precision", "optimizer",
    "validation_disable", "validation_resolution", "text_encoder_1_precision", "text_encoder_2_precision",
    "text_encoder_3_precision", "vae_batch_size", "quantize_via", "attention_mechanism", "use_ema",
    "offload_during_startup", "tokenizer_max_length",
)


def _memory_options(options: dict) -> dict:
    return {key: options.get(key) for key in MEMORY_KEYS}


def _is_sd3_medium(model: str) -> bool:
    return model == SD3_MEDIUM_ID or (Path(model).expanduser() / sd3_medium.MARKER).is_file()


def measured_need(options: dict, reference: Path = REFERENCE) -> tuple[float, str] | None:
    """(peak GiB allocated, the run folder it was measured in) of a benchmarked run with the same memory options."""
    results = reference / "results-rescanned.jsonl"
    if not results.is_file() or not _is_sd3_medium(str(options.get("pretrained_model_name_or_path", ""))):
        return None
    wanted = _memory_options(options)
    for line in results.read_text().splitlines():
        row = json.loads(line)
        if row.get("budget_gib") is not None or row.get("status") != "finished" or row.get("run_peak_allocated_gib") is None:
            continue
        config = reference / "runs" / Path(row["run"]).name / "config.json"
        if config.is_file() and _memory_options(json.loads(config.read_text())["simpletuner"]) == wanted:
            return row["run_peak_allocated_gib"], portable(config.parent)
    return None


def gpu() -> tuple[str, float] | None:
    """Name and total memory (GiB) of the visible GPU with the most memory, from nvidia-smi. The largest: nvidia-smi's numbering may differ from CUDA's, and a refusal must never be wrong."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    select = ["-i", visible] if visible and all(part.strip().isdigit() for part in visible.split(",")) else []
    found = []
    for *name, mib in nvidia_smi("name,memory.total", select) or []:
        try:
            found.append((",".join(name), float(mib) / 1024))
        except ValueError:  # "[N/A]" on some shared-memory and MIG systems: no verdict
            return None
    return max(found, key=lambda item: item[1]) if found else None


def check(preset_name: str, options: dict, device: tuple[str, float] | None) -> None:
    if device is None:
        return
    found = measured_need(options)
    if found is None:
        return
    need, where = found
    name, total = device
    if total < need:
        raise UserError(
            f"preset {preset_name} needs at least {need:.2f} GiB of GPU memory (peak allocated in a benchmark run of "
            f"the same configuration, {where}), but this GPU ({name}) has {total:.2f} GiB; choose a preset that fits "
            "(docs/results.md) or pass --skip-fit-check to try anyway"
        )
