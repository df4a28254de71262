"""Route what SimpleTuner logs each optimizer step through sd3fit's metrics sink, and add sd3fit's step metrics.

Upstream (simpletuner 4.10.1, `Trainer.train`) builds a dict of scalars per optimizer step (train_loss,
learning_rate, epoch, iteration timings, ...) and hands it to `self.accelerator.log(logs, step=global_step)`,
which reaches only the trackers named in `report_to`; at the end `Trainer.train` calls
`self.accelerator.end_training()`. This patch wraps both on the trainer's accelerator:

- `log`: the values also go to the run's `metrics.jsonl` and TensorBoard folder (whatever `report_to` says), and
  sd3fit's timings and memory for every step completed by now are passed to the same trackers (W&B, ...) under
  that step's number, before the current step's values so steps stay increasing;
- `end_training`: the rows still waiting for the GPU are written and passed on before the trackers close.

With `defer_step_reads` (sd3fit's `step_reads` patch), the trainer hands over GPU tensors rather than numbers: the
values then reach the trackers once their copies to host memory have landed, a step or two late, still in step
order (`sd3fit.speed.host_reads.Queue`), so a tracker reading a tensor never waits for the step after it.

`Trainer.init_trackers` runs twice in 4.10.1 (from `_run_training` and from `train`); the wrapper marks the
accelerator so it is installed once.
"""

from __future__ import annotations

import logging

from sd3fit.simpletuner import compat
from sd3fit.speed.host_reads import Queue

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
logger = logging.getLogger(__name__)
_MARK = "_sd3fit_metrics_log"


def apply(accelerator, measurement, defer: bool = False) -> None:
    """measurement: anything with on_log(step, values) and close(), returning [(step, extra_scalars), ...]; defer:
    hand the trackers each step's values once their GPU tensors have reached host memory."""
    compat.require(CHECKED_AGAINST, __name__)
    if getattr(accelerator, _MARK, False):
        return
    upstream_log, original_end = accelerator.log, accelerator.end_training
    waiting = Queue() if defer else None

    def to_trackers(values: dict, step: int | None = None, log_kwargs: dict | None = None):
        if waiting is None:
            return upstream_log(values, step=step, log_kwargs=log_kwargs)
        waiting.put(values, (step, log_kwargs))
        for landed, (landed_step, kwargs) in waiting.ready():
            upstream_log(landed, step=landed_step, log_kwargs=kwargs)

    def log(values: dict, step: int | None = None, log_kwargs: dict | None = None):
        log_kwargs = log_kwargs or {}
        values = dict(values)
        try:
            done = measurement.on_log(step, values)
        except Exception as exc:  # upstream swallows errors from log(): never lose the trainer's own values to ours
            logger.warning("sd3fit could not record step %s: %s: %s", step, type(exc).__name__, exc)
            done = []
        for done_step, extra in done:
            if not extra:
                continue
            if done_step == step:
                values.update(extra)
            else:
                to_trackers(extra, step=done_step, log_kwargs=log_kwargs)
        return to_trackers(values, step=step, log_kwargs=log_kwargs)

    def end_training():
        for done_step, extra in measurement.close():
            if extra:
                to_trackers(extra, step=done_step)
        for landed, (landed_step, kwargs) in (waiting.ready(everything=True) if waiting is not None else []):
            upstream_log(landed, step=landed_step, log_kwargs=kwargs)
        return original_end()

    accelerator.log = log
    accelerator.end_training = end_training
    setattr(accelerator, _MARK, True)
