"""Tables and figures from benchmark results files (`sd3fit bench`), never from typed-in numbers.

Rows are compared only within one group: the same GPU model, model (real or random weights), resolution and batch
size. Each group gets its own table and its own pair of figures, so numbers from different GPUs never share one.
Ratios (`report.compare.ratio`) compare a preset with the full fine-tune of the same group under the same GPU budget and speed label; runs
of a preset with sd3fit's speed patches and without them (`sd3fit bench --speed`) get their own table (`speed`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sd3fit.host import CARD_SIZES_GB, GIB  # noqa: E402
from sd3fit.report import rounds, speed  # noqa: E402
from sd3fit.report.compare import fmt as _f  # noqa: E402
from sd3fit.report.compare import ratio  # noqa: E402
from sd3fit.report.write import slug  # noqa: E402
from sd3fit.runs import shared_gpu  # noqa: E402
from sd3fit.speedrows import round_of  # noqa: E402

STATUS = {"finished": "ran", "out_of_memory": "**out of memory**", "failed": "failed"}
COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3")


def group_key(row: dict) -> tuple:
    """What must be equal for two rows to be compared: GPU model, model, resolution, batch, warm-up, versions."""
    return (row.get("gpu") or "CPU", row.get("model_label") or row.get("model"), row.get("resolution"),
            row.get("batch_size"), row.get("warmup_steps"), row.get("torch"), row.get("simpletuner"))


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows per group, each group ordered by preset, budget, then speed label (in the order they first appear)."""
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault(group_key(row), []).append(row)
    for key, group in out.items():
        presets, budgets = _ordered(r["preset"] for r in group), _ordered(r["budget"] for r in group)
        labels = _ordered(speed.label(r) for r in group)
        group.sort(key=lambda r: (presets.index(r["preset"]), budgets.index(r["budget"]), labels.index(speed.label(r)),
                                  round_of(r)))
    return out


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _full(rows: list[dict], budget: str, label: str, round_: int = 1) -> dict | None:
    for row in rows:
        if (row.get("model_type") == "full" and row.get("budget") == budget and speed.label(row) == label
                and round_of(row) == round_):
            return row
    return None


def _entries(group: list[dict]) -> tuple[list[tuple[str, str]], list[str]]:
    """A figure's x positions, (preset, speed label) in order, and their tick labels (the speed only where the
    group has runs of more than one speed label)."""
    entries = _ordered((r["preset"], speed.label(r)) for r in group)
    several = len({label for _, label in entries}) > 1
    # "without compile_blocks" on two lines: neighbouring labels would overlap on one
    return entries, ["\n".join([preset, *label.split(" ")]) if several else preset for preset, label in entries]


def title(key: tuple) -> str:
    gpu, model, resolution, batch = key[:4]
    return f"{gpu} — {model}, {resolution} px, batch {batch}"


def markdown(rows: list[dict]) -> str:
    parts = []
    for key, group in groups(rows).items():
        first = next((r for r in group if r.get("measured_steps")), group[0])  # a row that trained: its step count
        dates = sorted(r["date"][:10] for r in group if r.get("date"))
        parts.append(f"### {title(key)}\n")
        parts.append(f"GPU memory {_f(first.get('gpu_memory_gib'), '.1f')} GiB, driver {first.get('driver') or '–'}, "
                     f"CUDA {first.get('cuda') or '–'}; torch {first.get('torch')}, SimpleTuner {first.get('simpletuner')}, "
                     f"diffusers {first.get('diffusers')}, transformers {first.get('transformers')}; "
                     f"{first.get('warmup_steps')} warm-up + {first.get('measured_steps') or '?'} measured steps; "
                     f"{dates[0] if dates else '?'}{'' if not dates or dates[0] == dates[-1] else ' to ' + dates[-1]}.\n")
        head = ["preset", "GPU budget", "speed", "result", "median step (s)", "p10–p90 (s)", "images/s", "MFU",
                "steps: peak alloc. (GiB)", "steps: peak reserved (GiB)", "whole run: peak alloc. (GiB)",
                "whole run: peak reserved (GiB)", "whole run: device (GiB)", "time vs full", "step memory vs full", "run memory vs full"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in group:
            full = _full(group, row["budget"], speed.label(row), round_of(row))
            finished = row.get("step_s_median") is not None  # trained: an OOM at validation keeps its step times
            spread = f"{_f(row.get('step_s_p10'), '.3f')}–{_f(row.get('step_s_p90'), '.3f')}" if finished else "–"
            budget = "none" if row.get("budget_gib") is None else f"{row['budget']} ({row['budget_gib']:.2f} GiB)"
            again = f" (round {round_of(row)})" if round_of(row) > 1 else ""
            cells = [f"`{row['preset']}`{again}", budget, speed.label(row), STATUS.get(row["status"], row["status"]),
                     _f(row.get("step_s_median"), ".3f") if finished else "–", spread,
                     _f(row.get("images_per_s")) if finished else "–",
                     _f(100 * row["mfu"], ".1f") + " %" if finished and row.get("mfu") else "–",
                     _f(row.get("step_peak_allocated_gib")), _f(row.get("step_peak_reserved_gib")),
                     _f(row.get("run_peak_allocated_gib")), _f(row.get("run_peak_reserved_gib")),
                     _f(row.get("run_peak_device_gib")), _f(ratio(row, full, "step_s_median")), _f(ratio(row, full, "step_peak_allocated_gib")),
                     _f(ratio(row, full, "run_peak_reserved_gib"))]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
        notes = []
        for row in group:
            shown = "" if speed.label(row) == speed.SD3FIT else f" ({speed.label(row)})"
            which = f"- `{row['preset']}` under budget {row['budget']}{shown}: "
            if row["status"] != "finished":
                notes.append(which + f"{row['status']}: {row.get('error')}")
            if shared_gpu(row):
                notes.append(which + f"another process held {row['gpu_in_use_before_gib']:.2f} GiB of the GPU when it "
                             "started; its device peak and step times include that process's share")
        if notes:
            parts += notes + [""]
        for table in (speed.markdown(group), rounds.markdown(group)):
            if table:
                parts.append(table)
    return "\n".join(parts)


def step_time(group: list[dict], heading: str):
    entries, ticks = _entries(group)
    budgets = _ordered(r["budget"] for r in group)
    width = 0.8 / len(budgets)
    labelled: set[str] = set()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(entries) + 2), 5.0))
    for i, budget in enumerate(budgets):
        for j, (preset, label) in enumerate(entries):
            row = next((r for r in group if r["preset"] == preset and r["budget"] == budget
                        and speed.label(r) == label), None)
            x = j + (i - (len(budgets) - 1) / 2) * width
            if row is None:
                continue
            if row.get("step_s_median") is None:
                ax.text(x, 0, ("OOM" if row["status"] == "out_of_memory" else "failed") + f" at {budget}", rotation=90,
                        ha="center", va="bottom", fontsize=8, color=COLORS[i % len(COLORS)])
                continue
            median = row["step_s_median"]
            err = [[median - row["step_s_p10"]], [row["step_s_p90"] - median]]
            failed_later = row["status"] != "finished"
            bar = ax.bar(x, median, width, color=COLORS[i % len(COLORS)], yerr=err, capsize=3,
                         hatch="//" if failed_later else None,
                         label=None if budget in labelled or failed_later else f"GPU budget {budget}")
            if not failed_later:
                labelled.add(budget)
            ax.bar_label(bar, labels=[f"{median:.2f}" + ("\nOOM later" if row["status"] == "out_of_memory" else "")],
                         fontsize=8, padding=2)
    if any(r["status"] != "finished" and r.get("step_s_median") is not None for r in group):
        ax.bar(0, 0, 0, color="white", edgecolor="black", hatch="//", label="hatched: trained, then ran out of memory")
    ax.set_xticks(range(len(entries)), ticks, rotation=15)
    ax.set_ylabel("median training step (s), whiskers p10–p90")
    ax.set_title(f"Time per training step\n{heading}", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    fig.tight_layout()
    return fig


def _verdict(row: dict) -> str:
    """A card fits a run that finished with its device peak (where measured) below the card's memory."""
    if row["status"] == "out_of_memory":
        return "OOM at "
    if row["status"] != "finished":
        return "failed at "
    device = row.get("run_peak_device_gib")
    return "over " if device is not None and device >= row["budget_gib"] else "fits "


def peak_memory(group: list[dict], heading: str):
    entries, ticks = _entries(group)
    budgets = _ordered(r["budget"] for r in group)

    def row_for(entry: tuple[str, str]) -> dict | None:
        """The uncapped run of a preset where there is one, else its first (e.g. the run under its own card)."""
        runs = [r for r in group if (r["preset"], speed.label(r)) == entry]
        return next((r for r in runs if r["budget"] == "none"), runs[0] if runs else None)

    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(entries) + 2), 5.2))
    series = [("step_peak_allocated_gib", "in training steps, allocated"), ("run_peak_reserved_gib", "whole run, reserved")]
    if any(r.get("run_peak_device_gib") is not None for r in group):
        series.append(("run_peak_device_gib", "whole run, device (reserved + outside the allocator)"))
    width = 0.8 / len(series)
    top = 0.0
    for i, (key, label) in enumerate(series):
        xs, values, hatches = [], [], []
        for j, entry in enumerate(entries):
            row = row_for(entry)
            if row and row.get(key) is not None:
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                values.append(row[key])
                hatches.append("//" if row["status"] != "finished" else "")  # a peak cut short by the error
        if values:
            bars = ax.bar(xs, values, width, color=COLORS[i], label=label)
            for bar, hatch in zip(bars, hatches):
                bar.set_hatch(hatch)
            ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
            top = max(top, max(values))
    for gb in CARD_SIZES_GB:
        gib = gb * 1e9 / GIB
        if gib < top * 1.3:
            ax.axhline(gib, color="grey", linestyle="--", linewidth=0.8)
            ax.text(-0.45, gib, f"{gb} GB card", fontsize=7, color="grey", ha="left", va="bottom")
    for j, entry in enumerate(entries):
        capped = [r for r in group if (r["preset"], speed.label(r)) == entry and r.get("budget_gib") is not None]
        verdicts = [_verdict(r) + r["budget"] for r in capped]
        if verdicts:
            ax.text(j, -0.09, "\n".join(verdicts), transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=8)
    ax.set_xticks(range(len(entries)), ticks)
    ax.set_ylabel("peak GPU memory (GiB)")
    under = "none" if "none" in budgets else "each preset's first"
    ax.set_title(f"Peak memory (runs with GPU budget {under})\n{heading}", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def device_peak(row: dict) -> float | None:
    """What a card must hold for the whole run: reserved peak plus memory outside the allocator (reserved alone in
    rows from before the latter was measured)."""
    return row.get("run_peak_device_gib") or row.get("run_peak_reserved_gib")


def tradeoff(group: list[dict], heading: str):
    """Step time against whole-run device peak, one point per finished configuration; presets made for a card
    (rows with `card`) are marked and named."""
    points = [r for r in group if r["status"] == "finished" and r.get("step_s_median") and device_peak(r)]
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    for n, row in enumerate(sorted(points, key=device_peak)):
        chosen = bool(row.get("card"))
        x, y = device_peak(row), row["step_s_median"]
        ax.scatter(x, y, marker="*" if chosen else "o", s=140 if chosen else 40,
                   color=COLORS[0] if row.get("model_type") == "lora" else COLORS[1], zorder=3)
        shown = [row["budget"]] if row.get("budget_gib") is not None else []
        shown += [] if speed.label(row) == speed.SD3FIT else [speed.label(row)]
        name = Path(row["preset"]).stem if row["preset"].endswith(".json") else row["preset"]  # a file: its name
        ax.annotate(name + (f" ({', '.join(shown)})" if shown else ""), (x, y),
                    textcoords="offset points", xytext=(5, 6 if n % 2 == 0 else -13), fontsize=7)  # neighbours apart
    top = max((device_peak(r) for r in points), default=0)
    # every card line up to the first card that holds the largest point
    cards = [gb * 1e9 / GIB for gb in CARD_SIZES_GB]
    right = next((gib for gib in cards if gib > top), top) * 1.05
    for gb, gib in zip(CARD_SIZES_GB, cards):
        if gib <= right:
            ax.axvline(gib, color="grey", linestyle="--", linewidth=0.8)
            ax.text(gib, 0.02, f"{gb} GB", transform=ax.get_xaxis_transform(), fontsize=7, color="grey", ha="right",
                    rotation=90)
    ax.scatter([], [], marker="*", s=140, color="black", label="preset made for a card")
    ax.scatter([], [], marker="o", s=40, color=COLORS[0], label="LoRA")
    ax.scatter([], [], marker="o", s=40, color=COLORS[1], label="full fine-tune")
    ax.set_xlabel("whole-run device peak (GiB): reserved + outside the allocator")
    ax.set_ylabel("median training step (s)")
    ax.set_xlim(0, right)
    ax.set_ylim(0, max((r["step_s_median"] for r in points), default=1) * 1.15)
    ax.set_title(f"Step time against the memory a card must have\n{heading}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def write(rows: list[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.md"]
    (out / "summary.md").write_text(markdown(rows))
    found = groups(rows)
    used: set[str] = set()
    for key, group in found.items():
        suffix = "" if len(found) == 1 else f"-{slug(' '.join(str(k) for k in key[:4]))}"
        base, n = suffix, 2
        while suffix in used:  # groups that differ only in warm-up or versions
            suffix, n = f"{base}-{n}", n + 1
        used.add(suffix)
        for name, draw in (("step_time", step_time), ("peak_memory", peak_memory), ("tradeoff", tradeoff)):
            if name != "step_time" and all(r.get("run_peak_reserved_gib") is None and r.get("step_peak_allocated_gib") is None for r in group):
                continue  # a CPU benchmark has no GPU memory to draw
            path = out / f"{name}{suffix}.png"
            fig = draw(group, title(key))
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written
