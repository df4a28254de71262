"""Which speed variants of a preset a benchmark runs (`sd3fit bench --speed MODE`).

sd3fit's speed patches are the bool keys in `schema.SPEED_KEYS`; every one false is stock SimpleTuner's step. A
variant turns some of them off with `key=false` overrides, so it is the preset's own run with less patched:

    sd3fit   the preset as written (rows from before --speed existed are this)
    stock    every speed key false
    both     stock, then sd3fit: the ratio measured side by side, on the same machine, in one call
    each     both, plus one run per key the preset turns on with only that key false

A preset's `recompute_budget` and `cuda_graph_blocks` need compiled blocks; a variant that turns `compile_blocks` off
turns `cuda_graph_blocks` off too, and checkpoints every block instead of a recompute budget, as SimpleTuner would to
save that memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from sd3fit.errors import UserError
from sd3fit.schema import SPEED_KEYS, speed_patches
from sd3fit.speedrows import SD3FIT, STOCK, WITHOUT

MODES = (SD3FIT, STOCK, "both", "each")


@dataclass(frozen=True)
class Variant:
    label: str  # the row's `speed`
    off: tuple[str, ...]  # speed keys overridden to false
    extra: tuple[str, ...] = ()  # other overrides the keys turned off make necessary

    @property
    def overrides(self) -> list[str]:
        return [f"{key}=false" for key in self.off] + list(self.extra)

    @property
    def suffix(self) -> str:
        """Run folder name suffix; empty for sd3fit, so folders of old benchmarks keep their names."""
        return "" if self.label == SD3FIT else "-" + self.label.replace(" ", "-")


def patches_on(values: dict) -> list[str]:
    """The speed keys a (validated, overridden) preset turns on, sorted: a row's `speed_patches`."""
    return speed_patches(values)


def variants(mode: str, values: dict) -> list[Variant]:
    """The runs of one preset under one budget, in the order they run (stock before sd3fit)."""
    if mode not in MODES:
        raise UserError(f"--speed {mode!r} is not a mode; use one of {', '.join(MODES)}")
    def variant(label: str, off: tuple[str, ...]) -> Variant:
        if "compile_blocks" in off and values.get("cuda_graph_blocks") and "cuda_graph_blocks" not in off:
            off = (*off, "cuda_graph_blocks")  # graphs of compiled blocks only
        uncompiled = "compile_blocks" in off and values.get("recompute_budget") is not None
        return Variant(label, off, ("recompute_budget=null", "gradient_checkpointing=true") if uncompiled else ())

    stock, own = variant(STOCK, tuple(SPEED_KEYS)), Variant(SD3FIT, ())
    if mode == SD3FIT:
        return [own]
    if mode == STOCK:
        return [stock]
    found = [stock, own]
    if mode == "each":
        found += [variant(WITHOUT + key, (key,)) for key in patches_on(values)]
    return found

