"""adamw_bf16 stepped by torch-optimi's multi-tensor AdamW (`fused_optimizer: true`, an sd3fit key).

Upstream (simpletuner 4.10.1): `Trainer.init_optimizer` resolves `optimizer=adamw_bf16` to SimpleTuner's
`AdamWBF16` with the table's settings (betas (0.9, 0.999), eps 1e-6, weight_decay 1e-2) updated by
`optimizer_config` and `optimizer_beta1/2`, then `lr=learning_rate`; it casts the trained parameters to bf16 (only for
that class) and builds the optimizer through `cpu_offload_optimizer(params_to_optimize=..., optimizer_cls=...,
optimizer_parameters=..., ...)`. AdamWBF16's `step()` loops over the parameters one at a time, about 25 small kernels
each (stochastic rounding included): for a rank-64 LoRA of SD3 Medium (192 tensors) thousands of launches per step,
while the GPU waits on the host.

This patch (a mixin before `Trainer`, with upstream's `cpu_offload_optimizer` wrapped in the trainer module) builds
`optimi.AdamW(foreach=True, kahan_sum=True)` instead, with exactly the keyword arguments AdamWBF16 would have
received: a handful of foreach kernels over all parameters per step, and Kahan-compensated bf16 updates for what
AdamWBF16's shift buffer does (the same three bf16 buffers per parameter, so memory is unchanged). The bf16 cast,
the learning rate, the scheduler and the optimizer's name in the config are upstream's. The update differs early
on: optimi bias-corrects the first moment as standard AdamW does, AdamWBF16 does not (its steps are smaller by
1 - beta1^t), and AdamWBF16 adds eps to the uncorrected second moment's root (a larger eps until 1 - beta2^t nears 1,
some thousand steps); a learning-rate warm-up hides most of it (the tiny model: 2.2x the LoRA update after 16
constant-rate steps, same direction).

optimi's state is plain tensors per parameter (exp_avg, exp_avg_sq, kahan_comp) plus a step count in the param
group: `offload_optimizer_state` moves it like any other, and upstream's checkpoints save and restore it through
accelerate. A resume cannot switch the key (sd3fit refuses changed options), so a checkpoint's optimizer state is
always loaded into the class that wrote it.

It swaps nothing (upstream's optimizer is built) when
- the run's optimizer is not adamw_bf16, or upstream resolved adamw_bf16 to something else (a quantized base kept in
  fp32: upstream picks optimi-adamw itself);
- `optimizer_release_gradients` is on: `sd3fit.lean.release` steps one parameter per backward hook, so a multi-tensor
  kernel has nothing to batch, and it narrows `param_groups` to one parameter per step, which optimi cannot follow
  (its step counter lives in the param group);
- `optimizer_cpu_offload_method` is set: torchao's CPU offload builds one optimizer per parameter.
"""

from __future__ import annotations

import functools
import inspect
import logging

from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
SWAPPED = "adamw_bf16"  # the one optimizer this patch replaces
FUSED_SETTINGS = {"foreach": True, "kahan_sum": True}
_MARKER = "__sd3fit_fused_optimizer__"
logger = logging.getLogger(__name__)
_building = False  # True while the mixin's init_optimizer lets the wrapper swap


def apply() -> None:
    """Wrap upstream's `cpu_offload_optimizer` in the trainer module once per process; it swaps only while
    `FusedOptimizerTrainer.init_optimizer` runs for a run with the key on."""
    compat.require(CHECKED_AGAINST, __name__)
    from simpletuner.helpers.training import trainer as trainer_module

    init_optimizer = getattr(trainer_module.Trainer, "init_optimizer", None)
    if not callable(init_optimizer):
        raise RuntimeError(f"{__name__}: SimpleTuner's Trainer lacks init_optimizer; this patch needs updating")
    if "cpu_offload_optimizer(" not in inspect.getsource(init_optimizer):
        raise RuntimeError(f"{__name__}: SimpleTuner's init_optimizer no longer builds the optimizer through "
                           "cpu_offload_optimizer; this patch needs updating")
    compat.wrap_once(trainer_module, "cpu_offload_optimizer", _wrap, _MARKER, __name__)


def left_off_because(config) -> str | None:
    """Why a run with this (SimpleTuner) config keeps upstream's optimizer with the key on; None: it is swapped."""
    if getattr(config, "optimizer", None) != SWAPPED:
        return f"it replaces adamw_bf16 only, not {getattr(config, 'optimizer', None)}"
    if getattr(config, "optimizer_release_gradients", False):
        return "optimizer_release_gradients steps one parameter at a time"
    if getattr(config, "optimizer_cpu_offload_method", None) not in (None, "", "none"):
        return "optimizer_cpu_offload_method builds one optimizer per parameter"
    return None


def fused_adamw(params, optimizer_parameters: dict):
    """optimi's AdamW with AdamWBF16's keyword arguments (lr, betas, eps, weight_decay) and the fused settings."""
    from optimi import AdamW

    unknown = set(optimizer_parameters) - {"lr", "betas", "eps", "weight_decay"}
    if unknown:  # AdamWBF16 takes only these; anything else means upstream's call changed
        raise RuntimeError(f"{__name__}: adamw_bf16 got arguments {sorted(unknown)} this patch does not map; "
                           "it needs updating")
    return AdamW(params, **optimizer_parameters, **FUSED_SETTINGS)


def _wrap(cpu_offload_optimizer):
    from simpletuner.helpers.training.optimizers.adamw_bfloat16 import AdamWBF16

    signature = inspect.signature(cpu_offload_optimizer)

    @functools.wraps(cpu_offload_optimizer)
    def wrapped(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        given = call.arguments
        if (not _building or given["optimizer_cls"] is not AdamWBF16
                or given["offload_mechanism"] not in (None, "", "none")):
            return cpu_offload_optimizer(*args, **kwargs)
        logger.info("fused_optimizer: adamw_bf16 steps with optimi.AdamW(foreach=True, kahan_sum=True), %s",
                    given["optimizer_parameters"])
        return fused_adamw(given["params_to_optimize"], dict(given["optimizer_parameters"]))

    return wrapped


class FusedOptimizerTrainer:
    """Must come before gradient_release's mixin in the bases: it reads `optimizer_release_gradients`, which that
    mixin turns off while the optimizer is built."""

    sd3fit_fused_optimizer = False  # set by the launcher from the preset

    def init_optimizer(self):
        global _building
        if not self.sd3fit_fused_optimizer:
            return super().init_optimizer()
        reason = left_off_because(self.config)
        if reason is not None:
            logger.warning("fused_optimizer is left off: %s", reason)
            return super().init_optimizer()
        _building = True
        try:
            return super().init_optimizer()
        finally:
            _building = False
