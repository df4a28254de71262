"""Mirror what SimpleTuner logs each optimizer step into the run's `metrics.jsonl`.

Upstream (simpletuner 4.10.1, `Trainer.train`) builds a dict of scalars per optimizer step (train_loss,
learning_rate, epoch, iteration timings, ...) and hands it to `self.accelerator.log(logs, step=global_step)`,
which reaches only the trackers named in `report_to`. This patch wraps that accelerator's `log` so that the main
process also appends `{"step": ..., "time": ..., <scalars>}` to a JSON-lines file, whatever `report_to` says:
tests, `sd3fit report` and the benchmark read one file format. Non-scalar values (images, tables) are skipped.

`Trainer.init_trackers` runs twice in 4.10.1 (from `_run_training` and from `train`); the wrapper marks the
accelerator so it is installed once.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from sd3fit.simpletuner import compat

CHECKED_AGAINST = "4.10.1"
_MARK = "_sd3fit_metrics_log"


def _scalar(value):
    if hasattr(value, "numel") and value.numel() == 1:
        value = value.detach().float().item()
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else str(value)  # keep nan/inf visible: JSON has no literal for them
    return None


def apply(accelerator, path: Path) -> None:
    compat.require(CHECKED_AGAINST, __name__)
    if getattr(accelerator, _MARK, False):
        return
    original = accelerator.log
    path = Path(path)

    def log(values: dict, step: int | None = None, log_kwargs: dict | None = None):
        if accelerator.is_main_process:
            row = {"step": step, "time": time.time()}
            for key, value in values.items():
                scalar = _scalar(value)
                if scalar is not None:
                    row[key] = scalar
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        return original(values, step=step, log_kwargs=log_kwargs or {})

    accelerator.log = log
    setattr(accelerator, _MARK, True)
