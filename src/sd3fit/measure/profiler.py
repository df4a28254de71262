"""torch.profiler configured from the preset, writing traces that TensorBoard and Perfetto open.

Traces are Chrome-trace JSON files named `<worker>.<timestamp>.pt.trace.json`, the layout TensorBoard's PyTorch
profiler plugin (torch-tb-profiler) looks for under its log folder; Perfetto (ui.perfetto.dev or its trace
processor) opens the same files. The trainer drives the profiler: `start()` before the first step, `step()` after
each trip through the loop, `stop()` at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

from sd3fit.measure.settings import MeasureSettings


def worker_name() -> str:
    """One trace file family per process; the rank tells processes of one run apart."""
    return f"rank{os.environ.get('RANK', '0')}"


def make_profiler(settings: MeasureSettings, run_dir: Path, cuda_available: bool):
    """A started-later `torch.profiler.profile`, or None when the preset does not ask for one."""
    if not settings.enable_profiler:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] if "cpu" in settings.profiler_activities else []
    if "cuda" in settings.profiler_activities and cuda_available:
        activities.append(ProfilerActivity.CUDA)
    if not activities:
        activities = [ProfilerActivity.CPU]  # cuda alone asked for on a machine without one
    trace_dir = settings.trace_dir(run_dir)
    trace_dir.mkdir(parents=True, exist_ok=True)
    return profile(
        activities=activities,
        schedule=schedule(
            wait=settings.profiler_schedule_wait,
            warmup=settings.profiler_schedule_warmup,
            active=settings.profiler_schedule_active,
            repeat=settings.profiler_schedule_repeat,
        ),
        on_trace_ready=tensorboard_trace_handler(str(trace_dir), worker_name=worker_name()),
        record_shapes=settings.profiler_record_shapes,
        profile_memory=settings.profiler_profile_memory,
        with_stack=settings.profiler_with_stack,
    )


def traces(folder: Path) -> list[Path]:
    return sorted(Path(folder).rglob("*.pt.trace.json")) + sorted(Path(folder).rglob("*.pt.trace.json.gz"))


def tracing_now(profiler):
    """A function telling whether `profiler` traces the coming step (warm-up included: it costs the same)."""
    if profiler is None:
        return None
    from torch.profiler import ProfilerAction

    tracing = {ProfilerAction.WARMUP, ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE}
    return lambda: getattr(profiler, "current_action", ProfilerAction.NONE) in tracing
