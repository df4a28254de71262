"""One row's number over another's, as every table of a benchmark report shows it."""

from __future__ import annotations

# throughput compares whenever both runs trained; a memory peak only when both finished (an out-of-memory error cuts
# a run's peak short)
TIMES = ("step_s_median", "step_s_p10", "step_s_p90", "images_per_s")


def ratio(row: dict | None, base: dict | None, key: str) -> float | None:
    """row / base, or None where either is missing or a memory peak was cut short by an error."""
    if not row or not base or not row.get(key) or not base.get(key):
        return None
    if key not in TIMES and (row["status"] != "finished" or base["status"] != "finished"):
        return None
    return row[key] / base[key]


def fmt(value, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)
