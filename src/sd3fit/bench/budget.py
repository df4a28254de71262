"""GPU memory budgets: `24GB` (decimal, as cards are sold: 24e9 bytes = 22.35 GiB), `22.5GiB`, `16000MiB`, `none`
for no cap, or `card` for the card each preset is made for (its `card` key; uncapped for a preset that names none).

A budget caps PyTorch's caching allocator at the budget less the device memory the process holds outside it (CUDA
context, libraries' buffers: 0.75-0.85 GiB measured on an H200), read when CUDA starts and at each part of the run
(`sd3fit.measure.memory.GpuCap`), as a real card of that size leaves it; rows give `run_peak_device_gib` (reserved
peak plus that memory), which is what must stay under the card's size. The cap is lowered as the outside memory is
read, so a part of the run that starts libraries can still overshoot by what they add; the device column shows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sd3fit.errors import UserError
from sd3fit.host import size_gib

NONE_WORDS = ("none", "no", "off", "0")
CARD_WORD = "card"


@dataclass(frozen=True)
class Budget:
    label: str  # as the user wrote it, e.g. "24GB"; "none" when uncapped; "card" for each preset's own card
    gib: float | None  # None: no cap (or, for "card", decided per preset)

    @property
    def slug(self) -> str:
        if self.label == CARD_WORD:
            return CARD_WORD
        return "nocap" if self.gib is None else re.sub(r"[^A-Za-z0-9.]+", "", self.label)

    def for_preset(self, card: str | None) -> "Budget":
        """The budget one preset runs under: its card's size for `card`, else this budget."""
        if self.label != CARD_WORD:
            return self
        return parse(card) if card else parse("none")  # a preset made for no card runs uncapped


def parse(text: str) -> Budget:
    if text.strip().lower() in NONE_WORDS:
        return Budget("none", None)
    if text.strip().lower() == CARD_WORD:
        return Budget(CARD_WORD, None)
    try:
        gib = size_gib(text, "GPU budget")
    except UserError:
        raise UserError(f"cannot read GPU budget {text!r}: write a size such as 24GB, 22.5GiB or 16000MiB, none, "
                        "or card") from None
    return Budget(text.strip(), gib)
