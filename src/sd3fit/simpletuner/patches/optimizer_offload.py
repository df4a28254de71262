"""Optimizer state out of the GPU while the trainer validates or saves (`offload_optimizer_state: true`, an sd3fit key).

Upstream (simpletuner 4.10.1) calls `Trainer.mark_optimizer_eval()` before every validation (intermediary and
final) and before writing a checkpoint, and `mark_optimizer_train()` when training resumes; in 4.10.1 they only
switch schedule-free optimizers between modes. This mixin (before `Trainer`) also moves the optimizer's GPU state
to the CPU on `mark_optimizer_eval` and back on `mark_optimizer_train` (`sd3fit.lean.offload`), so validation
images are generated without the state's memory. After the final validation the state stays on the CPU: only the
weights are saved from there on.
"""

from __future__ import annotations

from sd3fit.lean.offload import StateOffload
from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION


def check(trainer_cls) -> None:
    compat.require(CHECKED_AGAINST, __name__)
    for name in ("mark_optimizer_eval", "mark_optimizer_train"):
        if not callable(getattr(trainer_cls, name, None)):
            raise RuntimeError(f"{__name__}: SimpleTuner's Trainer lacks {name}; this patch needs updating")


class OffloadingTrainer:
    sd3fit_offload_optimizer_state = False  # set by the launcher from the preset

    def _sd3fit_state_offload(self):
        optimizer = getattr(self, "optimizer", None)
        if not self.sd3fit_offload_optimizer_state or optimizer is None:
            return None
        offload = getattr(self, "_sd3fit_offload", None)
        if offload is None or offload[0] is not optimizer:
            offload = self._sd3fit_offload = (optimizer, StateOffload(optimizer))
        return offload[1]

    def mark_optimizer_eval(self):
        super().mark_optimizer_eval()
        offload = self._sd3fit_state_offload()
        if offload is not None:
            offload.move_out("cpu")

    def mark_optimizer_train(self):
        offload = self._sd3fit_state_offload()
        if offload is not None:
            offload.move_back()
        super().mark_optimizer_train()
