"""Move an optimizer's state off the GPU while it is not needed (validation, saving) and back before the next step.

A full fine-tune's optimizer state is as large as the model (SD3 Medium's transformer: 3.8 GiB in 8 bits) and sits
idle while validation images are generated; on a small card that is the memory validation needs. Moving it costs a
copy each way per validation (a second or two), every few hundred steps.

Why not a library: torchao's `CPUOffloadOptimizer` and DeepSpeed keep the state on the CPU for good and step it
there (every step pays for it); accelerate's offloading moves modules, not optimizer state. Here only the tensors
that were on the GPU move, whatever their type (torch's, torchao's 8-bit state subclasses, which implement `to`);
the optimizer's step counters that torch keeps on the CPU stay where they are.
"""

from __future__ import annotations

import torch


class StateOffload:
    def __init__(self, optimizer):
        self._optimizer = optimizer
        self._moved: list[tuple[dict, object, torch.device]] = []

    @property
    def away(self) -> bool:
        return bool(self._moved)

    def move_out(self, to: str | torch.device = "cpu") -> int:
        """Move every state tensor not already on `to` there; returns the bytes moved."""
        if self._moved:
            return 0
        target = torch.device(to)
        moved = 0
        for state in self._optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.device != target:
                    self._moved.append((state, key, value.device))
                    moved += _nbytes(value)
                    state[key] = value.to(target)
        return moved

    def move_back(self) -> None:
        for state, key, device in self._moved:
            state[key] = state[key].to(device)
        self._moved.clear()


def _nbytes(tensor: torch.Tensor) -> int:
    try:
        return tensor.numel() * tensor.element_size()
    except Exception:  # a tensor subclass whose element size means little (its payload is packed)
        return 0
