"""The "sd3fit against stock" table of a benchmark report: what sd3fit's speed patches buy, from runs of one preset
under one GPU budget with the patches as the preset sets them (`sd3fit`), all off (`stock`) and, with
`sd3fit bench --speed each`, one at a time off (`without compile_blocks` ...).

Reads result rows only (their `speed` labels); it imports no benchmark or training code.
"""

from __future__ import annotations

from sd3fit.report.compare import fmt as _f
from sd3fit.report.compare import ratio
from sd3fit.speedrows import SD3FIT, STOCK, WITHOUT, label

COMPARED = (("step_s_median", "step time"), ("images_per_s", "images/s"),
            ("step_peak_allocated_gib", "steps: peak alloc."), ("run_peak_reserved_gib", "whole run: peak reserved"))



def comparisons(group: list[dict]) -> list[tuple[dict, dict, dict[str, dict]]]:
    """(stock row, sd3fit row, {speed key: its "without" row}) for each preset and budget that has both."""
    found: dict[tuple, dict[str, dict]] = {}
    for row in group:
        found.setdefault((row["preset"], row["budget"]), {})[label(row)] = row  # a later row of a label replaces one
    out = []
    for by_label in found.values():
        if STOCK in by_label and SD3FIT in by_label:
            without = {name[len(WITHOUT):]: r for name, r in by_label.items() if name.startswith(WITHOUT)}
            out.append((by_label[STOCK], by_label[SD3FIT], without))
    return out


def markdown(group: list[dict]) -> str:
    """The table for one group of comparable rows; empty when no preset and budget has a stock and an sd3fit row."""
    found = comparisons(group)
    if not found:
        return ""
    keys = list(dict.fromkeys(key for _, _, without in found for key in without))
    head = ["preset", "GPU budget", "patches on"] + [f"{name}: sd3fit / stock" for _, name in COMPARED]
    head += [f"without {key}: step time / sd3fit" for key in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stock, own, without in found:
        cells = [f"`{own['preset']}`", own["budget"], ", ".join(own.get("speed_patches") or []) or "none"]
        cells += [_f(ratio(own, stock, key)) for key, _ in COMPARED]
        cells += [_f(ratio(without.get(key), own, "step_s_median")) for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ("Each preset's run with its speed patches (sd3fit) over its run with every patch off (stock), under the "
             "same GPU budget (`sd3fit bench --speed both` runs the two back to back): below 1 is faster or smaller, "
             "except images/s (above 1 is faster). `without X`: the step time with only patch X off over the sd3fit "
             "run's, i.e. what X buys.")
    return "#### sd3fit against stock\n\n" + notes + "\n\n" + "\n".join(lines) + "\n"
