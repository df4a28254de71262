"""Gradient release for any PyTorch optimizer: step each parameter as soon as its gradient is complete, inside the
backward pass, and free that gradient at once, so a full fine-tune never holds the gradients of the whole model
(3.8 GiB for SD3 Medium's transformer in bf16).

Why not a library: torch-optimi's `prepare_for_gradient_release` does this only for optimi's own optimizers, whose
states are 16-bit (adamw with Kahan summation: 11.3 GiB for SD3 Medium), and torch's `_apply_optimizer_in_backward`
builds one optimizer per parameter, so the learning-rate scheduler, `state_dict` and checkpointing of the trainer's
one optimizer no longer reach it. Here the trainer keeps its one optimizer: each hook calls its ordinary `step()`
with `param_groups` narrowed for the moment to the one parameter whose gradient is ready (a shallow copy of that
parameter's group, so the scheduler's learning rate and the group's settings apply; the state stays keyed by the
parameter). That works for every optimizer whose `step()` loops over `param_groups` and skips parameters without
a gradient: torch's, torchao's low-bit AdamW, SimpleTuner's adamw_bf16.

Gradient clipping by value is elementwise, so clamping each gradient in its hook is exactly what clipping all of
them after backward would do; clipping by norm needs every gradient at once and cannot be combined with release.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


class GradientRelease:
    """Install with `GradientRelease(optimizer, params)`; `remove()` takes the hooks off again.

    `accumulating()`: when it returns True (a micro-step before the last of a gradient-accumulation window), the
    gradient is left to accumulate and nothing is stepped; the hook of the last micro-step then steps the sum.
    `clip_value`: clamp each gradient to [-clip_value, clip_value] before its step (None or 0: no clipping).
    `take_absmax()`: the largest absolute gradient value seen (before clipping) since it was last taken, as a tensor
    on the gradients' device (no host synchronisation), or None: what a trainer logs as grad_absmax.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor],
                 clip_value: float | None = None, accumulating: Callable[[], bool] = lambda: False):
        self.optimizer = optimizer
        self.clip_value = clip_value or None
        self.accumulating = accumulating
        self.steps = 0  # parameter steps taken, for tests and logs
        self._absmax: torch.Tensor | None = None
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self._group_of = {}
        self._handles = []
        for p in params:
            if not p.requires_grad:
                continue
            if id(p) not in group_of:
                raise ValueError("gradient release: a trainable parameter is not in the optimizer's param_groups")
            self._group_of[id(p)] = group_of[id(p)]
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        if not self._handles:
            raise ValueError("gradient release: no trainable parameter to hook")

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None or self.accumulating():
            return
        largest = p.grad.detach().abs().max().float()
        self._absmax = largest if self._absmax is None else torch.maximum(self._absmax, largest.to(self._absmax.device))
        if self.clip_value is not None:
            p.grad.clamp_(-self.clip_value, self.clip_value)
        narrowed = dict(self._group_of[id(p)])
        narrowed["params"] = [p]
        groups = self.optimizer.param_groups
        self.optimizer.param_groups = [narrowed]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
        p.grad = None
        self.steps += 1

    def take_absmax(self) -> torch.Tensor | None:
        value, self._absmax = self._absmax, None
        return value

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
