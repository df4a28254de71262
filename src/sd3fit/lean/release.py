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

Buckets (`buckets=`, e.g. the parameters of each transformer block): a bucket is stepped once all its gradients are
in, in one `step()` over the bucket (a foreach optimizer then batches it) or one `step_many(optimizer, params,
group)` call (sd3fit.lean.ao_multistep for torchao's low-bit AdamW); at most the gradients of the buckets still
filling are held. `flush()` after backward steps what a bucket got when some of its parameters got no gradient.

`stream=` (a `sd3fit.lean.state_stream.StateStream`): the optimizer state lives in CPU memory and each bucket's
state is brought to the GPU for its step only.
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
                 clip_value: float | None = None, accumulating: Callable[[], bool] = lambda: False,
                 buckets: Iterable[Iterable[torch.Tensor]] | None = None, step_many: Callable | None = None,
                 stream=None):
        self.optimizer = optimizer
        self.stream = stream
        self.clip_value = clip_value or None
        self.accumulating = accumulating
        self.step_many = step_many
        self.steps = 0  # parameter steps taken, for tests and logs
        self.bucket_steps = 0
        self._absmax: torch.Tensor | None = None
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self._group_of = {}
        self._handles = []
        hooked = []
        for p in params:
            if not p.requires_grad:
                continue
            if id(p) not in group_of:
                raise ValueError("gradient release: a trainable parameter is not in the optimizer's param_groups")
            self._group_of[id(p)] = group_of[id(p)]
            hooked.append(p)
        if not hooked:
            raise ValueError("gradient release: no trainable parameter to hook")
        # every hooked parameter in exactly one bucket: the given ones, then one of its own for any left out
        self._bucket_of: dict[int, int] = {}
        self._sizes: list[int] = []
        for bucket in buckets or []:
            members = [p for p in bucket if id(p) in self._group_of and id(p) not in self._bucket_of]
            for p in members:
                self._bucket_of[id(p)] = len(self._sizes)
            if members:
                self._sizes.append(len(members))
        for p in hooked:
            if id(p) not in self._bucket_of:
                self._bucket_of[id(p)] = len(self._sizes)
                self._sizes.append(1)
        self._ready: list[list[torch.Tensor]] = [[] for _ in self._sizes]
        for p in hooked:
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None or self.accumulating():
            return
        index = self._bucket_of[id(p)]
        self._ready[index].append(p)
        if len(self._ready[index]) == self._sizes[index]:
            self._step(index)

    def flush(self) -> None:
        """Step the buckets that got only some of their gradients (parameters the step did not use)."""
        for index, ready in enumerate(self._ready):
            if ready:
                self._step(index)

    @torch.no_grad()
    def _step(self, index: int) -> None:
        params, self._ready[index] = self._ready[index], []
        grads = [p.grad for p in params]
        largest = (grads[0].detach().abs().max() if len(grads) == 1
                   else torch.stack(torch._foreach_norm(grads, float("inf")))).max().float()
        self._absmax = largest if self._absmax is None else torch.maximum(self._absmax, largest.to(self._absmax.device))
        if self.clip_value is not None:
            torch._foreach_clamp_min_(grads, -self.clip_value)
            torch._foreach_clamp_max_(grads, self.clip_value)
        if self.stream is not None:
            self.stream.fetch(params)
        try:
            self._step_groups(params)
        finally:  # also after a failed step: the CPU copy stays the live state
            if self.stream is not None:
                self.stream.store(params)
        for p in params:
            p.grad = None
        self.steps += len(params)
        self.bucket_steps += 1

    def _step_groups(self, params: list[torch.Tensor]) -> None:
        by_group: dict[int, list[torch.Tensor]] = {}
        for p in params:
            by_group.setdefault(id(self._group_of[id(p)]), []).append(p)
        for members in by_group.values():
            group = self._group_of[id(members[0])]
            if self.step_many is not None:
                self.step_many(self.optimizer, members, group)
                continue
            narrowed = dict(group)
            narrowed["params"] = members
            groups = self.optimizer.param_groups
            self.optimizer.param_groups = [narrowed]
            try:
                self.optimizer.step()
            finally:
                self.optimizer.param_groups = groups

    def take_absmax(self) -> torch.Tensor | None:
        value, self._absmax = self._absmax, None
        return value

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def module_buckets(module: torch.nn.Module) -> list[list[torch.Tensor]]:
    """Buckets that follow a model's structure: each element of a list of blocks (`nn.ModuleList`, e.g. SD3's
    `transformer_blocks`) is one bucket, every other child module one bucket, parameters of the model itself one."""
    buckets = [list(module.parameters(recurse=False))]
    for child in module.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            buckets.extend(list(block.parameters()) for block in child)
        else:
            buckets.append(list(child.parameters()))
    return [bucket for bucket in buckets if bucket]
