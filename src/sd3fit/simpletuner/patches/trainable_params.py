"""The trainable parameters listed once per run (`cache_trainable_params`, an sd3fit speed key).

Upstream (simpletuner 4.10.1) `Trainer._get_trainable_parameters` walks every parameter of the trained model and
keeps those with `requires_grad`; the training loop asks for that list twice a step (the largest gradient value it
logs, `_max_grad_value`, and gradient clipping). For SD3 Medium that is two walks over ~1,000 parameters through
~2,000 modules: tens of milliseconds of host time every step, while the GPU waits. Which parameters train does not
change once training has started (SimpleTuner sets `requires_grad` while it builds the model and adapters), so this
mixin keeps the first list taken inside `train` and returns it until `train` returns. LyCORIS adapters keep
upstream's path (their parameters come from the wrapped network, not the model).
"""

from __future__ import annotations

from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
_UPSTREAM_METHODS = ("_get_trainable_parameters", "train")


def check(trainer_cls) -> None:
    compat.require(CHECKED_AGAINST, __name__)
    missing = [name for name in _UPSTREAM_METHODS if not callable(getattr(trainer_cls, name, None))]
    if missing:
        raise RuntimeError(f"{__name__}: SimpleTuner's Trainer lacks {', '.join(missing)}; this patch needs updating")


class TrainableListTrainer:
    """Mixed in before `Trainer`; `sd3fit_cache_trainable_params` switches it on."""

    sd3fit_cache_trainable_params = False
    _sd3fit_training = False
    _sd3fit_trainable = None

    def _get_trainable_parameters(self):
        if not (self.sd3fit_cache_trainable_params and self._sd3fit_training):
            return super()._get_trainable_parameters()
        if self._sd3fit_trainable is None:
            found = super()._get_trainable_parameters()
            if not isinstance(found, list):  # LyCORIS: a generator over the wrapped network, left as upstream has it
                return found
            self._sd3fit_trainable = found
        return self._sd3fit_trainable

    def train(self):
        self._sd3fit_training, self._sd3fit_trainable = True, None
        try:
            return super().train()
        finally:
            self._sd3fit_training, self._sd3fit_trainable = False, None
