"""Where a run's per-step numbers go: `metrics.jsonl` and TensorBoard scalars in the run folder.

The trainer's own scalars for a step (loss, learning rate, ...) arrive when it logs that step; sd3fit's timings
for the same step may arrive a step later (see `steps`). The sink holds the trainer's scalars until both are in
and writes one row per optimizer step: `{"step", "time", <trainer scalars>, <sd3fit scalars>}`, in step order.
Scalars that arrive as GPU tensors are copied to host memory when they arrive and read when their row is written
(`sd3fit.speed.host_reads`): taking them makes the host wait for nothing.
When several processes train together each writes its own rows to its own files; only the main process's carry the
trainer's scalars (the others' would be copies, read at the cost of a GPU synchronisation each).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from sd3fit.speed.host_reads import Pending


def scalar(value) -> float | int | str | None:
    """A JSON-ready number from a Python or 0-d tensor value; None for anything that is not one number."""
    if hasattr(value, "numel") and value.numel() == 1:
        value = value.detach().float().item()
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else str(value)  # keep nan/inf visible: JSON has no literal for them
    return None


def tensorboard_scalars(row: dict[str, Any]) -> list[tuple[str, float | int]]:
    """The (tag, value) pairs of a metrics row that TensorBoard gets: its numbers but the step and the time."""
    return [(key, value) for key, value in row.items()
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool)]


QUEUE_EVENTS = 100_000  # scalar events waiting for TensorBoard's writer thread (~10 MB at most)


class MetricsSink:
    def __init__(self, jsonl: Path, tensorboard_dir: Path | None, recorder=None, is_main: bool = True):
        self.jsonl = Path(jsonl)
        self.recorder = recorder
        self.is_main = is_main
        self._held: dict[int, dict[str, Any]] = {}
        self._arrived: dict[int, list[Pending]] = {}  # the trainer's values per step, read when the row is written
        self._writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # the writer's thread writes and flushes: no file work inside the training loop. Its queue must hold
            # many steps' scalars: with torch's default (10 events, fewer than one row) every row blocked the
            # training loop on handing events one by one to that thread (~0.1 s a step on an H200 host)
            self._writer = SummaryWriter(log_dir=str(tensorboard_dir), flush_secs=10, max_queue=QUEUE_EVENTS)

    def on_log(self, step: int, values: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
        """Take the trainer's values for `step`; return (step, sd3fit scalars) for every row completed now."""
        self._held.setdefault(step, {"time": time.time()})
        if self.is_main:  # the other processes' trainer values are copies: don't read their tensors
            self._arrived.setdefault(step, []).append(Pending(dict(values)))
        ready = self.recorder.logged(step) if self.recorder is not None else [(step, {})]
        return self._emit(ready)

    def close(self) -> list[tuple[int, dict[str, Any]]]:
        """Write what is still held (waiting for the GPU once), in step order; return the rows completed now.
        Safe to call twice."""
        ready = dict(self.recorder.flush() if self.recorder is not None else [])
        for step in self._held:  # logged steps that never got timings (no step ran since the last log)
            ready.setdefault(step, {})
        out = self._emit(sorted(ready.items()))
        self._arrived.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return out

    def _emit(self, ready: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
        for step, ours in ready:
            row = {"step": step, **self._held.pop(step, {"time": time.time()})}
            for pending in self._arrived.pop(step, []):
                for key, value in pending.read().items():
                    number = scalar(value)
                    if number is not None:
                        row[key] = number
            row.update(ours)
            with self.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self._writer is not None:
                for key, value in tensorboard_scalars(row):
                    self._writer.add_scalar(key, value, global_step=step, walltime=row["time"])
        return ready
