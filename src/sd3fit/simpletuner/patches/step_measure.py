"""Named ranges, step timings, the preset's profiler and out-of-memory snapshots inside SimpleTuner's loop.

Upstream (simpletuner 4.10.1) `Trainer.train` runs each step inline: `_write_train_stage_breadcrumb(
"fetch_batch:start")`, fetch, `prepare_batch`, `_compute_model_prediction_loss` (which calls `model_predict`,
then the model's loss), `self.accelerator.backward(loss)`, gradient clipping, `self.optimizer.step()`,
`self.optimizer.zero_grad()`, then bookkeeping, logging, checkpoints and validation; `torch_profiler.step()` ends
the trip. Its profiler (`_create_torch_profiler`) is configured by environment variables and has no named ranges.

`MeasuredTrainer` is mixed in before `Trainer` and changes no training logic:
- the methods above, and `backward` / `zero_grad` on the trainer's accelerator and optimizer instances, report to
  sd3fit's step recorder, which opens `data` at the fetch, `forward` and `loss` around the prediction and loss,
  `backward` around the backward pass and `optimizer` from there to the end of `zero_grad`, as siblings under one
  `train_step`; bookkeeping and validation fall outside the step;
- `_create_torch_profiler` returns the profiler built from the preset's `enable_profiler`/`profiler_*` keys (upstream's
  environment switch still works when the preset leaves the profiler off);
- `train` installs the accelerator and optimizer wrappers once those objects exist. With RamTorch on (also for the
  text encoders only), upstream zeroes the trained model's gradients (`trained_component.zero_grad`) instead of
  calling the optimizer's `zero_grad`: that call ends the step too, or the step would run on through logging,
  checkpoints and validation until the next one began.
"""

from __future__ import annotations

import functools
import inspect

from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
_UPSTREAM_METHODS = ("_write_train_stage_breadcrumb", "prepare_batch", "_compute_model_prediction_loss", "model_predict", "_create_torch_profiler", "train")


def check(trainer_cls) -> None:
    """Fail at start-up, not mid-run, if the seams this mixin relies on have moved."""
    compat.require(CHECKED_AGAINST, __name__)
    missing = [name for name in _UPSTREAM_METHODS if not callable(getattr(trainer_cls, name, None))]
    if missing:
        raise RuntimeError(f"{__name__}: SimpleTuner's Trainer lacks {', '.join(missing)}; this patch needs updating")
    if "trained_component.zero_grad(" not in inspect.getsource(trainer_cls.train):
        raise RuntimeError(f"{__name__}: SimpleTuner's training loop no longer zeroes the trained model's gradients "
                           "with RamTorch on, where this patch ends the step; it needs updating")


def _after(method, callback):
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        finally:
            callback()

    return wrapped


class MeasuredTrainer:
    sd3fit_measurement = None  # a sd3fit.measure.session.Measurement, set by the launcher

    @property
    def _sd3fit_recorder(self):
        return getattr(self.sd3fit_measurement, "recorder", None)

    def _write_train_stage_breadcrumb(self, stage: str, step: int) -> None:
        super()._write_train_stage_breadcrumb(stage, step)
        if stage == "fetch_batch:start" and self._sd3fit_recorder is not None:
            self._sd3fit_recorder.step_begin()

    def prepare_batch(self, batch):
        prepared = super().prepare_batch(batch)
        if self._sd3fit_recorder is not None:
            self._sd3fit_recorder.data_done(prepared is not None and prepared is not False)
        return prepared

    def _compute_model_prediction_loss(self, prepared_batch):
        recorder = self._sd3fit_recorder
        if recorder is None:
            return super()._compute_model_prediction_loss(prepared_batch)
        recorder.begin("forward")
        try:
            return super()._compute_model_prediction_loss(prepared_batch)
        finally:
            recorder.end("loss")
            recorder.end("forward")  # if the prediction raised before the loss began

    def model_predict(self, *args, **kwargs):
        prediction = super().model_predict(*args, **kwargs)
        if self._sd3fit_recorder is not None:
            self._sd3fit_recorder.switch("forward", "loss")
        return prediction

    def _create_torch_profiler(self):
        measurement = self.sd3fit_measurement
        if measurement is not None and measurement.profiler is not None:
            return measurement.profiler
        return super()._create_torch_profiler()

    def _wrap_step_seams(self) -> None:
        recorder = self._sd3fit_recorder
        if recorder is None or getattr(self.accelerator, "_sd3fit_step_seams", False):
            return
        backward = self.accelerator.backward

        @functools.wraps(backward)
        def measured_backward(*args, **kwargs):
            recorder.begin("backward")
            try:
                return backward(*args, **kwargs)
            finally:
                recorder.begin("optimizer")  # clipping, step and zero_grad follow; begin ends backward

        self.accelerator.backward = measured_backward
        # zero_grad ends the step only after a backward pass; upstream also zeroes before some regularisation passes
        ends_step = lambda: recorder.is_open("optimizer") and recorder.step_end()  # noqa: E731
        self.optimizer.zero_grad = _after(self.optimizer.zero_grad, ends_step)
        component = self.model.get_trained_component(unwrap_model=False)  # what upstream zeroes with RamTorch on
        if component is not None:
            component.zero_grad = _after(component.zero_grad, ends_step)
        self.accelerator._sd3fit_step_seams = True

    def train(self):
        self._wrap_step_seams()
        return super().train()
