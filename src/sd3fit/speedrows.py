"""The speed label and the round of a benchmark row, shared by the benchmark that writes rows and the report that
reads them (which import nothing from each other)."""

from __future__ import annotations

SD3FIT = "sd3fit"  # the preset's speed patches as written
STOCK = "stock"  # every speed patch off
WITHOUT = "without "  # prefix of a run with one patch off: "without compile_blocks"


def label(row: dict) -> str:
    """A row's speed label; rows written before `sd3fit bench --speed` existed ran the presets as written."""
    return row.get("speed") or SD3FIT


def round_of(row: dict) -> int:
    """Which pass over the benchmark's list a row ran in (`sd3fit bench --rounds`); rows from before rounds, 1."""
    return int(row.get("round") or 1)
