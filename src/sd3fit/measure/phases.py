"""Which part of a run is under way, and what each part cost: seconds, peak device memory, out-of-memory errors.

A run moves through parts that hold different things on the GPU: `loading` (models read, quantized, moved),
`text_embeds` and `latents` (the caches are filled), `training` (steps), `validation` (images generated) and
`saving` (checkpoints and the final adapter or pipeline). The trainer glue calls `enter` where the run moves on;
each move folds the allocator's peak since the last reset into the part being left, so the parts' peaks together
explain the run's whole peak (which part needs a bigger card) and an out-of-memory error can name where it
happened. On a CPU only the seconds are kept.

Each move also hands the allocator's cached free blocks back to the driver (`release`, `torch.cuda.empty_cache` on a
GPU) before the next part starts: otherwise what one part cached stays reserved through the next (a lora-8gb run kept
6.6 GiB reserved while caching text embeddings that needed 1.2 GiB), and on a small card the kernels and library
buffers the next part loads outside the allocator find no room; the allocator frees its cache itself only when one
of its own allocations fails, never for them. Once per part, so it costs nothing measurable.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

GIB = 1024**3
NAMES = ("loading", "text_embeds", "latents", "training", "validation", "saving")


class Phases:
    def __init__(self, memory, device: bool, clock=time.monotonic, first: str = "loading", release=None):
        self._memory = memory
        self._release = release  # gives cached free device memory back, at each move
        self._device = device  # a GPU's allocator peaks; a CPU has none
        self._clock = clock
        self.current = first
        self._since = clock()
        self._ooms_at_entry = memory.ooms()
        self._records: dict[str, dict[str, float]] = {}
        memory.listener = self._charge

    def _record(self, name: str) -> dict[str, float]:
        return self._records.setdefault(name, {"seconds": 0.0, "allocated": 0, "reserved": 0, "ooms": 0})

    def _charge(self, peaks: dict[str, int]) -> None:
        record = self._record(self.current)
        for key in ("allocated", "reserved"):
            record[key] = max(record[key], peaks.get(key) or 0)

    def _close_current(self) -> None:
        self._memory.fold(sample_outside=True)  # charges the peak since the last reset to the current part, resets
        now = self._clock()
        record = self._record(self.current)
        record["seconds"] += now - self._since
        ooms = self._memory.ooms()
        record["ooms"] += ooms - self._ooms_at_entry
        self._since, self._ooms_at_entry = now, ooms

    def enter(self, name: str) -> str:
        """Move to part `name`; returns the part left, for `during`."""
        if name not in NAMES:
            raise ValueError(f"unknown run phase {name!r}")
        previous = self.current
        if name != previous:
            if self._release is not None:
                self._release()  # before the fold, so the next part's peak starts from what is in use
            self._close_current()
            self.current = name
        return previous

    @contextlib.contextmanager
    def during(self, name: str):
        previous = self.enter(name)
        try:
            yield
        finally:
            self.enter(previous)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per part, in the order parts first ran: seconds, peaks (GiB; None on a CPU) and out-of-memory errors."""
        self._close_current()
        out = {}
        for name, record in self._records.items():
            out[name] = {
                "seconds": round(record["seconds"], 3),
                "peak_allocated_gib": record["allocated"] / GIB if self._device else None,
                "peak_reserved_gib": record["reserved"] / GIB if self._device else None,
                "ooms": int(record["ooms"]),
            }
        return out

    def peak_phase(self) -> str | None:
        """The part with the largest reserved peak: where a bigger card is needed."""
        records = {name: r for name, r in self._records.items() if r["reserved"]}
        return max(records, key=lambda name: records[name]["reserved"]) if records else None
