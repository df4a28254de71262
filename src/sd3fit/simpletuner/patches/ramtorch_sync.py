"""No whole-GPU synchronisation around each backward pass for RamTorch that only streamed the text encoders
(`skip_ramtorch_syncs`, an sd3fit speed key).

Upstream (simpletuner 4.10.1) calls `torch.cuda.synchronize()` before and after every backward pass whenever the
`ramtorch` option is on (`Trainer._ramtorch_sync_enabled`), because RamTorch's layers copy weights from CPU memory on
their own streams. With `ramtorch_text_encoder` and `ramtorch_transformer_percent: 0` (sd3fit's 8 GB preset) RamTorch
streams only the text encoders, which have cached their embeddings and left the GPU before training starts, and no
layer of the trained model is RamTorch's; the two syncs then only stop the host from queuing work ahead of the GPU,
twice a step. This mixin (before `Trainer`) keeps upstream's answer when the trained model holds a RamTorch layer
and answers False otherwise; it looks once per run, when the training loop first asks.
"""

from __future__ import annotations

from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
RAMTORCH_MODULES = "simpletuner.helpers.ramtorch"  # where upstream's RamTorch layer classes live


def check(trainer_cls) -> None:
    compat.require(CHECKED_AGAINST, __name__)
    if not callable(getattr(trainer_cls, "_ramtorch_sync_enabled", None)):
        raise RuntimeError(f"{__name__}: SimpleTuner's Trainer lacks _ramtorch_sync_enabled; this patch needs updating")


def holds_ramtorch(module) -> bool:
    """Whether `module` or any module inside it is one of RamTorch's layers."""
    return any(type(m).__module__.startswith(RAMTORCH_MODULES) for m in module.modules())


class RamTorchSyncTrainer:
    """Mixed in before `Trainer`; `sd3fit_skip_ramtorch_syncs` switches it on."""

    sd3fit_skip_ramtorch_syncs = False
    _sd3fit_ramtorch_in_model = None

    def _ramtorch_sync_enabled(self) -> bool:
        upstream = super()._ramtorch_sync_enabled()
        if not (upstream and self.sd3fit_skip_ramtorch_syncs):
            return upstream
        if self._sd3fit_ramtorch_in_model is None:
            trained = self.model.get_trained_component(unwrap_model=False)
            self._sd3fit_ramtorch_in_model = trained is None or holds_ramtorch(trained)
        return self._sd3fit_ramtorch_in_model
