"""Gradient release (`optimizer_release_gradients=true`) for every optimizer, with gradient clipping that works.

Upstream (simpletuner 4.10.1): `optimizer_release_gradients` passes `gradient_release=True` to torch-optimi's
optimizers and registers optimi's hooks (`Trainer.init_optimizer`); the training loop then skips
`optimizer.step()`. Three things go wrong:
- the loop still clips gradients after backward, when the hooks have already freed them all, and torch's
  `clip_grad_value_` fails on the empty list (`RuntimeError: Expected !nested_tensorlist[0].empty()`): every run
  with the option crashes at its first step;
- with any optimizer but optimi's, nothing installs hooks and the loop skips `step()`: the model never trains;
- the largest gradient value it logs (`_max_grad_value`, grad_absmax) finds no gradient and returns a float that
  the checkpoint's progress record then fails on (`'float' object has no attribute 'clone'`).

This patch (a mixin before `Trainer`) turns upstream's own mechanism off while the optimizer is built and installs
`sd3fit.lean.release.GradientRelease` on it instead, for every optimizer (torchao's 8-bit AdamW with stochastic
rounding, SimpleTuner's adamw_bf16, optimi's, torch's). Clipping by value (upstream's default method) moves into
each parameter's hook, where it is exact; clipping by norm is refused before training (`sd3fit.schema`). The loop's
own clipping call, which finds no gradient left, is skipped, and grad_absmax is the largest value the hooks saw.
Gradient accumulation follows upstream's flag (`optimizer.optimizer_accumulation`, set on every micro-step).

With the speed key `release_by_block`, the parameters are stepped a block at a time (each transformer block, each
other top-level module) once all the block's gradients are in: torchao's low-bit AdamW through one compiled call per
block (`sd3fit.lean.ao_multistep`) instead of one per parameter, any other optimizer through one `step()` over the
block; after each backward the blocks whose parameters got no gradient are stepped with what they got.

With `stream_optimizer_state` (an sd3fit memory key), the optimizer's state lives in CPU memory and each block's state
is copied to the GPU for its step and back after it (`sd3fit.lean.state_stream`); `mark_optimizer_eval`, which
upstream calls before validation and before writing a checkpoint, first waits for the copies back to land.
"""

from __future__ import annotations

import functools
import inspect

from sd3fit.lean import ao_multistep
from sd3fit.lean.release import GradientRelease, module_buckets
from sd3fit.lean.state_stream import StateStream
from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
# upstream skips clipping for these (they bound their own updates)
_SELF_CLIPPING = ("optimi-stableadamw", "prodigy")


def check(trainer_cls) -> None:
    compat.require(CHECKED_AGAINST, __name__)
    for name in ("init_optimizer", "train", "_max_grad_value", "mark_optimizer_eval"):
        if not callable(getattr(trainer_cls, name, None)):
            raise RuntimeError(f"{__name__}: SimpleTuner's Trainer lacks {name}; this patch needs updating")
    if "self.optimizer.optimizer_accumulation" not in inspect.getsource(trainer_cls.train):
        raise RuntimeError(f"{__name__}: SimpleTuner's training loop no longer has the gradient-release branch this "
                           "patch relies on; it needs updating")


def clip_value(config) -> float | None:
    """The value each gradient is clamped to in its hook, as upstream's loop would clip: None for no clipping."""
    limit = float(getattr(config, "max_grad_norm", 0) or 0)
    if limit <= 0 or getattr(config, "optimizer", "") in _SELF_CLIPPING:
        return None
    return limit


def _inner(optimizer):
    """The torch optimizer under accelerate's wrapper (prepare wraps it after init_optimizer)."""
    return getattr(optimizer, "optimizer", optimizer)


class ReleasingTrainer:
    sd3fit_release = None
    sd3fit_release_by_block = False  # the `release_by_block` speed key
    sd3fit_stream_state = False  # the `stream_optimizer_state` memory key

    def init_optimizer(self):
        if not getattr(self.config, "optimizer_release_gradients", False):
            return super().init_optimizer()
        self.config.optimizer_release_gradients = False  # build a plain optimizer, install no optimi hooks
        try:
            super().init_optimizer()
        finally:
            self.config.optimizer_release_gradients = True  # the loop's branch that leaves stepping to the hooks
        component = self.model.get_trained_component()
        inner = _inner(self.optimizer)
        by_block = self.sd3fit_release_by_block
        self.sd3fit_release = GradientRelease(
            inner, component.parameters(), clip_value=clip_value(self.config),
            accumulating=lambda: bool(getattr(self.optimizer, "optimizer_accumulation", False)),
            buckets=module_buckets(component) if by_block else None,
            step_many=ao_multistep.step_many if by_block and ao_multistep.supports(inner) else None,
            stream=StateStream(inner) if self.sd3fit_stream_state else None,
        )

    def mark_optimizer_eval(self):
        stream = self.sd3fit_release.stream if self.sd3fit_release is not None else None
        if stream is not None:
            stream.settle()  # the host reads the state next (checkpoint) or may (validation)
        super().mark_optimizer_eval()

    def _max_grad_value(self):
        found = self.sd3fit_release.take_absmax() if self.sd3fit_release is not None else None
        return found if found is not None else super()._max_grad_value()

    def train(self):
        if self.sd3fit_release is not None:
            accelerator = self.accelerator
            original = accelerator.clip_grad_value_

            @functools.wraps(original)
            def clip_grad_value_(parameters, clip_value):
                parameters = [p for p in parameters if p.grad is not None]
                if parameters:  # released gradients were clamped in their hooks already
                    return original(parameters, clip_value)

            accelerator.clip_grad_value_ = clip_grad_value_
            backward, release = accelerator.backward, self.sd3fit_release

            @functools.wraps(backward)
            def backward_then_flush(*args, **kwargs):
                out = backward(*args, **kwargs)
                release.flush()  # blocks some of whose parameters got no gradient this step
                return out

            accelerator.backward = backward_then_flush
        return super().train()
