"""The "over rounds" table of a benchmark report: runs of the same presets repeated in turn (`sd3fit bench --rounds N`
runs the whole list N times, A B A B ...).

A step median from one run moves with the machine's state (the same configuration's ranged 0.19-0.25 s within one
lease on an H200), so a ratio between two presets' single runs can be off by that much. Over rounds, each preset
gets the median of its runs' step medians, and its ratio to the first preset listed is taken round by round (both
runs of a round saw nearly the same machine) and then its median over rounds.

Reads result rows only; it imports no benchmark or training code.
"""

from __future__ import annotations

from statistics import median

from sd3fit.report.compare import fmt as _f
from sd3fit.report.compare import ratio
from sd3fit.speedrows import label, round_of


def markdown(group: list[dict]) -> str:
    """The table for one group of comparable rows; empty when the group has runs of one round only."""
    if len({round_of(r) for r in group}) < 2:
        return ""
    runs: dict[tuple, dict[int, dict]] = {}  # (preset, budget, speed label) -> round -> row
    for row in group:
        runs.setdefault((row["preset"], row["budget"], label(row)), {})[round_of(row)] = row
    reference = {}  # per speed label: the first preset listed, under its first budget
    for key in runs:
        reference.setdefault(key[2], key)
    head = ["preset", "GPU budget", "speed", "rounds", "median step over rounds (s)", "each round (s)",
            "step / first preset's, each round", "step / first preset's, median"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_round in runs.items():
        steps = {n: row.get("step_s_median") for n, row in sorted(by_round.items())}
        ran = [s for s in steps.values() if s is not None]
        ref = runs[reference[key[2]]]
        ratios = {n: r for n, row in sorted(by_round.items())
                  if (r := ratio(row, ref.get(n), "step_s_median")) is not None}
        cells = [f"`{key[0]}`", key[1], key[2], str(len(by_round)), _f(median(ran), ".3f") if ran else "–",
                 ", ".join(_f(s, ".3f") if s is not None else "–" for s in steps.values()),
                 ", ".join(_f(r) for r in ratios.values()) if ratios else "–",
                 _f(median(ratios.values())) if ratios else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    first = ", ".join(f"`{ref[0]}` ({ref[1]})" for ref in reference.values())
    notes = (f"Each preset's runs over the rounds of the benchmark, A B A B ...; the first preset listed ({first}) is "
             "the reference: each round's step median over its step median in the same round, then the median of "
             "those ratios.")
    return "#### Over rounds\n\n" + notes + "\n\n" + "\n".join(lines) + "\n"
