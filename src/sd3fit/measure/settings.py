"""The preset keys that control measuring, with their defaults, read into one frozen settings object.

The profiler keys keep the names of the study's profiler patch (`enable_profiler`, `profiler_schedule_*`,
`profiler_output_dir`, `profiler_activities`); the schedule means what `torch.profiler.schedule` means.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sd3fit.errors import UserError

ACTIVITIES = ("cpu", "cuda")


@dataclass(frozen=True)
class MeasureSettings:
    step_metrics: bool = True
    enable_profiler: bool = False
    profiler_schedule_wait: int = 1
    profiler_schedule_warmup: int = 1
    profiler_schedule_active: int = 3
    profiler_schedule_repeat: int = 1
    profiler_output_dir: str = "tensorboard/profiler"
    profiler_activities: tuple[str, ...] = ACTIVITIES
    profiler_record_shapes: bool = True
    profiler_profile_memory: bool = False
    profiler_with_stack: bool = False
    memory_snapshot_steps: int = 0

    def trace_dir(self, run_dir: Path) -> Path:
        """Relative profiler_output_dir values live inside the run folder, so a run never writes elsewhere."""
        path = Path(self.profiler_output_dir).expanduser()
        return path if path.is_absolute() else Path(run_dir) / path


# key -> (type, help); the schema adds these to the keys a preset may use
KEYS: dict[str, tuple[str, str]] = {
    "step_metrics": ("bool", "Record per-step time, throughput and memory into metrics.jsonl and TensorBoard (default true)."),
    "enable_profiler": ("bool", "Run torch.profiler with named ranges data/forward/loss/backward/optimizer (default false)."),
    "profiler_schedule_wait": ("int", "Profiler schedule: steps skipped before each cycle (default 1)."),
    "profiler_schedule_warmup": ("int", "Profiler schedule: steps traced but discarded before recording (default 1)."),
    "profiler_schedule_active": ("int", "Profiler schedule: steps recorded per cycle (default 3)."),
    "profiler_schedule_repeat": ("int", "Profiler schedule: cycles; 0 repeats until training ends (default 1)."),
    "profiler_output_dir": ("str", "Where traces go; relative paths are inside the run folder (default tensorboard/profiler)."),
    "profiler_activities": ("str", "What to trace: cpu, cuda or both, as \"cpu cuda\" or a list (default both; cuda only on a GPU)."),
    "profiler_record_shapes": ("bool", "Record operator input shapes in traces (default true)."),
    "profiler_profile_memory": ("bool", "Record tensor allocations in traces (default false; costs time)."),
    "profiler_with_stack": ("bool", "Record Python stacks in traces (default false; large traces)."),
    "memory_snapshot_steps": (
        "int",
        "Record CUDA allocator history from start-up through this many training steps and save a pickle for "
        "pytorch.org/memory_viz (default 0: off; an out-of-memory error always saves one).",
    ),
}


def _activities(value: Any) -> tuple[str, ...]:
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    bad = [a for a in items if a not in ACTIVITIES]
    if bad or not items:
        raise UserError(f"option profiler_activities must name cpu and/or cuda, not {value!r}")
    return tuple(dict.fromkeys(items))


def check(own: dict[str, Any]) -> None:
    """Combination and range rules; raises a one-line UserError naming the key."""
    from_preset(own)


def from_preset(own: dict[str, Any]) -> MeasureSettings:
    values = {f.name: own[f.name] for f in fields(MeasureSettings) if own.get(f.name) is not None}
    if "profiler_activities" in values:
        values["profiler_activities"] = _activities(values["profiler_activities"])
    for key in ("profiler_schedule_wait", "profiler_schedule_warmup", "profiler_schedule_repeat", "memory_snapshot_steps"):
        if values.get(key, 0) < 0:
            raise UserError(f"option {key} must be 0 or more, not {values[key]}")
    if values.get("profiler_schedule_active", 1) < 1:
        raise UserError(f"option profiler_schedule_active must be 1 or more, not {values['profiler_schedule_active']}")
    return MeasureSettings(**values)
