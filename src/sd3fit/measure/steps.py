"""Per-step ranges, timings and memory, recorded without making the GPU wait.

A training step is one trip through the trainer's loop: fetch a batch (`data`), predict (`forward`), compute the
loss (`loss`), `backward`, then clip / step / zero the gradients (`optimizer`). The trainer's seams call
`step_begin`, `begin`, `end`, `data_done` and `step_end`; the recorder keeps the five ranges siblings under one
`train_step` range (a new range closes the one still open, so none can nest in another) and, when the profiler is
on, mirrors them as `torch.profiler.record_function` ranges.

Timing marks are CUDA events on a GPU (recording one queues a timestamp; it does not wait) and
`time.perf_counter` on a CPU. A logged step's numbers are read only once its last event has completed, which the
next step's own synchronisation (SimpleTuner reads the loss with `.item()`) guarantees, so a step's row is usually
written one step late and measuring adds no synchronisation. `flush` waits for what is left at the end of
training.

Peak memory is torch's caching-allocator peak (allocated and reserved) inside training steps; the counters are
host-side, so reading them costs no synchronisation either. The peak outside steps (model loading, validation,
checkpoints) is folded into the run's peak before each step resets the counters. Every peak read before a reset is
also handed to the memory's listener (`sd3fit.measure.phases`), which charges it to the part of the run under way.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

RANGES = ("data", "forward", "loss", "backward", "optimizer")
STEP_RANGE = "train_step"
GIB = 1024**3

# one metrics row's keys, grouped like TensorBoard tags: group/name_unit
STEP_TIME = "time/step_s"
RANGE_TIME = {name: f"time/{name}_s" for name in RANGES}
OTHER_TIME = "time/other_s"
THROUGHPUT = "throughput/samples_per_s"
PEAK_ALLOCATED = "mem/peak_allocated_gib"
PEAK_RESERVED = "mem/peak_reserved_gib"
ALLOC_RETRIES = "mem/alloc_retries"
OOMS = "mem/ooms"
PEAK_RSS = "mem/peak_rss_gib"
MICRO_STEPS = "micro_steps"
PROFILED = "profiler/active"  # 1 when the profiler traced this step (its time includes the profiler's cost)
ROW_KEYS = (STEP_TIME, *RANGE_TIME.values(), OTHER_TIME, THROUGHPUT, PEAK_ALLOCATED, PEAK_RESERVED, ALLOC_RETRIES, OOMS,
            PEAK_RSS, MICRO_STEPS, PROFILED)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux


class HostClock:
    def mark(self) -> float:
        return time.perf_counter()

    def ready(self, mark) -> bool:
        return True

    def wait(self, mark) -> None:
        pass

    def seconds(self, start, end) -> float:
        return end - start


class CudaClock:
    """Marks are CUDA events on the current stream; they measure the GPU's timeline, not the host's."""

    def __init__(self, torch):
        self._torch = torch

    def mark(self):
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ready(self, mark) -> bool:
        return mark.query()

    def wait(self, mark) -> None:
        mark.synchronize()

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000.0


class _NoClock:
    """Step metrics off: no marks are taken and no rows are made."""

    def mark(self):
        return None

    def ready(self, mark) -> bool:
        return True

    def wait(self, mark) -> None:
        pass

    def seconds(self, start, end) -> float:
        return 0.0


class HostMemory:
    """No caching allocator on a CPU: report the process's peak resident memory instead."""

    listener = None
    outside_listener = None

    def fold(self, sample_outside: bool = False) -> None:
        pass

    def ooms(self) -> int:
        return 0

    def step_start(self) -> None:
        pass

    def step_end(self) -> dict[str, float | None]:
        return {"allocated": None, "reserved": None}

    def counters(self) -> dict[str, Any]:
        return {ALLOC_RETRIES: None, OOMS: None, PEAK_RSS: _peak_rss_gib()}

    def run_peaks(self) -> dict[str, float | None]:
        return {"peak_rss_gib": _peak_rss_gib()}


class CudaMemory:
    def __init__(self, torch):
        self._cuda = torch.cuda
        self._run = {"allocated": 0, "reserved": 0}
        self._outside_steps = {"allocated": 0, "reserved": 0}
        self._outside_allocator: int | None = None
        self.listener = None  # called with each peak (bytes) read before the counters are reset
        self.outside_listener = None  # called with each reading of the memory outside the allocator (bytes)

    def _sample_outside_allocator(self) -> None:
        """Device memory in use that PyTorch's allocator does not hold: the CUDA context, libraries' own buffers
        (and any other process on the GPU). A memory cap leaves it out, a real card does not; read at the first
        step (everything initialised) and at the end, not every step (it asks the driver)."""
        try:
            free, total = self._cuda.mem_get_info()
        except RuntimeError:
            return
        outside = total - free - self._cuda.memory_reserved()
        self._outside_allocator = max(self._outside_allocator or 0, outside)
        if self.outside_listener is not None:
            self.outside_listener(outside)

    def _peaks(self) -> dict[str, int]:
        stats = self._cuda.memory_stats()  # one host-side call for both peaks
        peaks = {"allocated": stats.get("allocated_bytes.all.peak", 0), "reserved": stats.get("reserved_bytes.all.peak", 0)}
        if self.listener is not None:
            self.listener(peaks)
        return peaks

    def fold(self, sample_outside: bool = False) -> None:
        """Count what happened since the last reset for the run (outside steps) and start afresh: called where the
        run moves from one part to the next (`sample_outside`: also read the memory outside the allocator) and
        before each step."""
        if sample_outside:
            self._sample_outside_allocator()
        for key, value in self._peaks().items():
            self._outside_steps[key] = max(self._outside_steps[key], value)
            self._run[key] = max(self._run[key], value)
        self._cuda.reset_peak_memory_stats()

    def ooms(self) -> int:
        return int(self._cuda.memory_stats().get("num_ooms", 0))

    def step_start(self) -> None:
        if self._outside_allocator is None:
            self._sample_outside_allocator()
        # whatever happened since the last step (loading, validation, checkpointing) counts for the run, not the step
        self.fold()

    def step_end(self) -> dict[str, float]:
        peaks = self._peaks()
        for key, value in peaks.items():
            self._run[key] = max(self._run[key], value)
        self._cuda.reset_peak_memory_stats()  # so the next step_start sees only what happened between steps
        return {key: value / GIB for key, value in peaks.items()}

    def counters(self) -> dict[str, Any]:
        stats = self._cuda.memory_stats()
        return {ALLOC_RETRIES: stats.get("num_alloc_retries", 0), OOMS: stats.get("num_ooms", 0), PEAK_RSS: _peak_rss_gib()}

    def run_peaks(self) -> dict[str, float]:
        for key, value in self._peaks().items():
            self._run[key] = max(self._run[key], value)
            self._outside_steps[key] = max(self._outside_steps[key], value)
        self._sample_outside_allocator()
        stats = self._cuda.memory_stats()
        return {
            "peak_allocated_gib": self._run["allocated"] / GIB,
            "peak_reserved_gib": self._run["reserved"] / GIB,
            "peak_allocated_outside_steps_gib": self._outside_steps["allocated"] / GIB,
            "peak_reserved_outside_steps_gib": self._outside_steps["reserved"] / GIB,
            "outside_allocator_gib": None if self._outside_allocator is None else self._outside_allocator / GIB,
            # out-of-memory errors in the whole run, including those the trainer caught and went on from
            "ooms": stats.get("num_ooms", 0),
            "peak_rss_gib": _peak_rss_gib(),  # CPU memory: what offloading presets need of the host
        }


@dataclass
class _MicroStep:
    start: Any
    end: Any = None
    ranges: dict[str, list[tuple[Any, Any]]] = field(default_factory=dict)
    memory: dict[str, float | None] = field(default_factory=dict)
    profiled: bool = False


@dataclass
class _Logged:
    step: int
    micro_steps: list[_MicroStep]
    counters: dict[str, Any]


class StepRecorder:
    def __init__(self, clock, memory, samples_per_micro_step: int, record_function=None, timing: bool = True,
                 profiling_now=None):
        """record_function: `torch.profiler.record_function` when the profiler is on, else None (no ranges).
        timing=False keeps only the ranges: no marks, no rows (step metrics off, profiler on).
        profiling_now: returns whether the profiler traces the step about to start."""
        self.timing = timing
        self._profiling_now = profiling_now or (lambda: False)
        self.clock = clock if timing else _NoClock()
        self.memory = memory
        self.samples_per_micro_step = samples_per_micro_step
        self._record_function = record_function
        self._micro: _MicroStep | None = None
        self._open: str | None = None  # the inner range now open
        self._open_start = None
        self._handles: list = []  # entered record_function objects, innermost last
        self._since_log: list[_MicroStep] = []
        self._pending: list[_Logged] = []
        self.skipped_fetches = 0

    # -- seams -------------------------------------------------------------------------------------------------
    def step_begin(self) -> None:
        if self._micro is not None:
            self.step_end()
        if self.timing:
            self.memory.step_start()
        self._micro = _MicroStep(start=self.clock.mark(), profiled=bool(self._profiling_now()))
        self._enter(STEP_RANGE)
        self.begin("data")

    def data_done(self, got_batch: bool) -> None:
        """After the batch is prepared. No batch means the epoch ended: that trip is not a training step."""
        if self._open != "data":
            return
        if got_batch:
            self.end("data")
            return
        self.end("data")
        self._exit_all()
        self._micro = None
        self.skipped_fetches += 1

    def begin(self, name: str) -> None:
        if self._micro is None:
            return  # outside a training step (evaluation, validation): not measured
        if self._open is not None:
            self.end(self._open)
        self._open, self._open_start = name, self.clock.mark()
        self._enter(name)

    def end(self, name: str) -> None:
        if self._micro is None or self._open != name:
            return
        self._micro.ranges.setdefault(name, []).append((self._open_start, self.clock.mark()))
        self._exit()
        self._open = self._open_start = None

    def switch(self, current: str, following: str) -> None:
        """End `current` and begin `following`, only if `current` is the open range."""
        if self._open == current:
            self.begin(following)

    def is_open(self, name: str) -> bool:
        return self._open == name

    def step_end(self) -> None:
        if self._micro is None:
            return
        if self._open is not None:
            self.end(self._open)
        self._micro.end = self.clock.mark()
        self._exit_all()
        if self.timing:
            self._micro.memory = self.memory.step_end()
            self._since_log.append(self._micro)
        self._micro = None

    # -- rows --------------------------------------------------------------------------------------------------
    def logged(self, step: int) -> list[tuple[int, dict[str, Any]]]:
        """The trainer logged optimizer step `step`: queue it; return the rows whose numbers are now readable."""
        if self._micro is not None and self._open != "data":
            self.step_end()  # the trainer skipped zero_grad (e.g. RamTorch): the step ends at the latest here
        if self._since_log:
            self._pending.append(_Logged(step, self._since_log, self.memory.counters()))
            self._since_log = []
        ready = []
        while self._pending and self.clock.ready(self._pending[0].micro_steps[-1].end):
            ready.append(self._resolve(self._pending.pop(0)))
        return ready

    def flush(self) -> list[tuple[int, dict[str, Any]]]:
        """All queued rows; waits for the GPU (once, at the end of training)."""
        rows = []
        for logged in self._pending:
            self.clock.wait(logged.micro_steps[-1].end)
            rows.append(self._resolve(logged))
        self._pending = []
        return rows

    def _resolve(self, logged: _Logged) -> tuple[int, dict[str, Any]]:
        seconds = self.clock.seconds
        step_time = sum(seconds(m.start, m.end) for m in logged.micro_steps)
        row: dict[str, Any] = {STEP_TIME: step_time}
        inside = 0.0
        for name in RANGES:
            spent = sum(seconds(s, e) for m in logged.micro_steps for s, e in m.ranges.get(name, []))
            row[RANGE_TIME[name]] = spent
            inside += spent
        row[OTHER_TIME] = max(step_time - inside, 0.0)
        samples = self.samples_per_micro_step * len(logged.micro_steps)
        row[THROUGHPUT] = samples / step_time if step_time > 0 else None
        allocated = [m.memory.get("allocated") for m in logged.micro_steps if m.memory.get("allocated") is not None]
        reserved = [m.memory.get("reserved") for m in logged.micro_steps if m.memory.get("reserved") is not None]
        row[PEAK_ALLOCATED] = max(allocated) if allocated else None
        row[PEAK_RESERVED] = max(reserved) if reserved else None
        row.update(logged.counters)
        row[MICRO_STEPS] = len(logged.micro_steps)
        row[PROFILED] = int(any(m.profiled for m in logged.micro_steps))
        return logged.step, row

    # -- profiler ranges ---------------------------------------------------------------------------------------
    def _enter(self, name: str) -> None:
        if self._record_function is not None:
            handle = self._record_function(name)
            handle.__enter__()
            self._handles.append(handle)

    def _exit(self) -> None:
        if self._handles:
            self._handles.pop().__exit__(None, None, None)

    def _exit_all(self) -> None:
        while self._handles:
            self._exit()
