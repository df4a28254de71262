"""Everything that measures one training process, built from the preset's settings before the model loads.

The SimpleTuner glue (`sd3fit.simpletuner.patches.step_measure`, `metrics_log`) feeds it the trainer's events;
`summary()` is what result.json records about measuring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sd3fit.measure import profiler as profiling
from sd3fit.measure.memory import MemorySnapshots
from sd3fit.measure.phases import Phases
from sd3fit.measure.settings import MeasureSettings
from sd3fit.measure.sink import MetricsSink
from sd3fit.measure.steps import CudaClock, CudaMemory, HostClock, HostMemory, StepRecorder


class Measurement:
    def __init__(self, settings: MeasureSettings, run_dir: Path, metrics_path: Path, samples_per_micro_step: int, is_main: bool,
                 own_dir: Path | None = None):
        """`own_dir`: where this process's TensorBoard scalars and memory snapshots go (the run folder when None; the
        other processes of a run trained by several have their own). Profiler traces go to the run's trace folder
        from every process, one file family per rank, as TensorBoard's profiler shows workers."""
        import torch

        self.settings = settings
        self.run_dir = Path(run_dir)
        own = Path(own_dir) if own_dir is not None else self.run_dir
        self.cuda = torch.cuda.is_available()
        self.device = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.profiler = profiling.make_profiler(settings, self.run_dir, self.cuda)
        self.memory = CudaMemory(torch) if self.cuda else HostMemory()
        self.phases = Phases(self.memory, device=self.cuda, release=torch.cuda.empty_cache if self.cuda else None)
        self.recorder = None
        if settings.step_metrics or self.profiler is not None:
            self.recorder = StepRecorder(
                clock=CudaClock(torch) if self.cuda else HostClock(),
                memory=self.memory,
                samples_per_micro_step=samples_per_micro_step,
                record_function=torch.profiler.record_function if self.profiler is not None else None,
                timing=settings.step_metrics,
                profiling_now=profiling.tracing_now(self.profiler),
            )
        self.sink = MetricsSink(
            metrics_path,
            own / "tensorboard",
            recorder=self.recorder if settings.step_metrics else None,
            is_main=is_main,
        )
        self.snapshots = MemorySnapshots(own, settings.memory_snapshot_steps, torch)
        self.snapshots.start()

    def on_log(self, step: int, values: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
        ready = self.sink.on_log(step, values)
        self.snapshots.after_step(step)
        return ready

    def write_images(self, step: int, images: dict) -> int:
        from sd3fit.measure import images as tensorboard_images

        return tensorboard_images.write(self.run_dir / "tensorboard", step, images)

    def close(self) -> list[tuple[int, dict[str, Any]]]:
        return self.sink.close()

    def on_oom(self) -> Path | None:
        return self.snapshots.on_oom()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": self.device, "clock": "cuda" if self.cuda else "host"}
        out["phases"] = self.phases.summary()
        if self.recorder is not None and self.settings.step_metrics:
            out["memory"] = self.memory.run_peaks()
            out["memory"]["peak_phase"] = self.phases.peak_phase()
            out["empty_fetches"] = self.recorder.skipped_fetches
        if self.profiler is not None:
            out["traces"] = [str(p) for p in profiling.traces(self.settings.trace_dir(self.run_dir))]
        if self.snapshots.saved:
            out["memory_snapshots"] = list(self.snapshots.saved)
        return out
