"""The study's two figures, runtime per epoch and peak memory per run, from run summaries (never typed-in numbers)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from sd3fit.report.summary import RunSummary  # noqa: E402


def _bars(labels: list[str], values: list[float], ylabel: str, title: str):
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(labels) + 1.5), 4.0))
    bars = ax.bar(labels, values, color="#4C72B0")
    ax.bar_label(bars, fmt="%.3g")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    return fig


def runtime_per_epoch(runs: list[RunSummary], device: str):
    usable = [r for r in runs if r.epoch_s is not None]
    return _bars([r.run for r in usable], [r.epoch_s for r in usable], "median step x steps per epoch (s)", f"Runtime per epoch — {device}")


def peak_memory(runs: list[RunSummary], device: str):
    usable = [r for r in runs if r.peak_memory[0] is not None]
    ylabel = usable[0].peak_memory[1] if usable else "peak memory (GiB)"
    return _bars([r.run for r in usable], [r.peak_memory[0] for r in usable], ylabel, f"Peak memory per run — {device}")


def save(fig, path) -> None:
    fig.savefig(path, dpi=120)
    plt.close(fig)
