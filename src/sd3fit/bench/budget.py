"""GPU memory budgets: `24GB` (decimal, as cards are sold: 24e9 bytes = 22.35 GiB), `22.5GiB`, `16000MiB`, or
`none` for no cap.

A budget caps PyTorch's caching allocator only. The process also holds device memory outside it (CUDA context,
libraries: 0.75 GiB measured on an H200), which a real card must hold too, so a run that only just fits under a
budget can still fail on a card of that size; rows give `run_peak_device_gib` (allocator peak plus that memory)
where it was measured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sd3fit.errors import UserError

GIB = 1024**3
_UNITS = {"gb": 1e9, "gib": GIB, "mb": 1e6, "mib": 1024**2}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gb|gib|mb|mib)\s*$", re.IGNORECASE)
NONE_WORDS = ("none", "no", "off", "0")


@dataclass(frozen=True)
class Budget:
    label: str  # as the user wrote it, e.g. "24GB"; "none" when uncapped
    gib: float | None  # None: no cap

    @property
    def slug(self) -> str:
        return "nocap" if self.gib is None else re.sub(r"[^A-Za-z0-9.]+", "", self.label)


def parse(text: str) -> Budget:
    if text.strip().lower() in NONE_WORDS:
        return Budget("none", None)
    match = _SIZE.match(text)
    if not match:
        raise UserError(f"cannot read GPU budget {text!r}: write a size such as 24GB, 22.5GiB or 16000MiB, or none")
    gib = float(match.group(1)) * _UNITS[match.group(2).lower()] / GIB
    if gib <= 0:
        raise UserError(f"GPU budget {text!r} must be more than zero; write none for no cap")
    return Budget(text.strip(), gib)


# cards people train on, as the budgets the figures mark (sold sizes in GB)
CARD_SIZES_GB = (8, 12, 16, 24)
