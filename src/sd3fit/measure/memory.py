"""CUDA memory snapshots that pytorch.org/memory_viz opens.

With `memory_snapshot_steps: N` the allocator records every allocation's stack from start-up (model loading and
quantization included) through training step N, then saves `memory/snapshot-step-N.pickle` and stops recording.
The first out-of-memory error saves `memory/oom.pickle` from the allocator's own out-of-memory observer, so also
when the trainer catches the error and goes on or exits quietly; with recording off that snapshot still shows every
segment and block the allocator held, without stacks. Processes other than rank 0 add
`-rank<N>` to the names.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

MAX_ENTRIES = 100_000  # allocation events kept; bounds the recorder's own memory


class MemorySnapshots:
    def __init__(self, run_dir: Path, steps: int, torch_module=None):
        self.folder = Path(run_dir) / "memory"
        self.steps = steps
        self._torch = torch_module
        self.recording = False
        self.saved: list[str] = []

    @property
    def available(self) -> bool:
        return self._torch is not None and self._torch.cuda.is_available()

    def start(self) -> None:
        if not self.available:
            return
        if self.steps > 0:
            self._torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES)
            self.recording = True
        attach = getattr(self._torch._C, "_cuda_attach_out_of_memory_observer", None)
        if attach is not None:
            attach(self._observe_oom)

    def _observe_oom(self, device, alloc, device_allocated, device_free) -> None:
        """Called by the allocator on every out-of-memory error, before it raises: the first one is saved."""
        if not self._oom_saved():
            self._dump("oom.pickle")

    def _oom_saved(self) -> Path | None:
        return next((Path(p) for p in self.saved if Path(p).name.startswith("oom")), None)

    def after_step(self, global_step: int) -> None:
        if self.recording and global_step >= self.steps:
            self._dump(f"snapshot-step-{global_step}.pickle")
            self._torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False

    def on_oom(self) -> Path | None:
        """An out-of-memory error reached sd3fit: save the snapshot unless the observer already did."""
        if not self.available:
            return None
        return self._oom_saved() or self._dump("oom.pickle")

    def _dump(self, name: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        rank = os.environ.get("RANK", "0")
        path = self.folder / (name if rank == "0" else name.replace(".pickle", f"-rank{rank}.pickle"))
        with path.open("wb") as f:
            pickle.dump(self._torch.cuda.memory._snapshot(), f)
        self.saved.append(str(path))
        return path


class GpuCap:
    """This process's CUDA caching allocator held within a budget, so a large GPU answers whether a run fits a
    smaller card: beyond the cap allocations fail with the same out-of-memory error, after the allocator has given
    back its cached blocks and tried again, as on a card that is full.

    A real card must also hold what lies outside the allocator (the CUDA context, libraries' buffers: 0.75-0.85 GiB
    measured on an H200), so the cap is the budget less that memory: read once CUDA is up, and lowered each time
    the run reads more of it (`leave_room`, called at every part of the run and the first step)."""

    def __init__(self, torch_module, budget_gib: float):
        self._cuda = torch_module.cuda
        self.device = int(os.environ.get("LOCAL_RANK", "0"))  # the GPU this process trains on under accelerate
        self.total = self._cuda.get_device_properties(self.device).total_memory
        self.budget = budget_gib * 1024**3
        self.outside = 0
        self._set(self.budget)  # starts CUDA, so what lies outside the allocator can be read
        free, total = self._cuda.mem_get_info(self.device)
        self.leave_room(total - free - self._cuda.memory_reserved(self.device))

    def _set(self, allowed: float) -> None:
        self.fraction = min(max(allowed, 0.0) / self.total, 1.0)
        self._cuda.set_per_process_memory_fraction(self.fraction, self.device)

    def leave_room(self, outside_bytes: int) -> None:
        """Lower the cap so that the allocator and `outside_bytes` together stay within the budget."""
        if outside_bytes > self.outside:
            self.outside = outside_bytes
            self._set(self.budget - outside_bytes)

    def facts(self) -> dict:
        return {"budget_gib": self.budget / 1024**3, "fraction": self.fraction, "device_total_gib": self.total / 1024**3,
                "allocator_cap_gib": self.fraction * self.total / 1024**3, "outside_allocator_gib": self.outside / 1024**3}
