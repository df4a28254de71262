"""Keep the host from queueing more than a set amount of weight copies ahead of the GPU.

A layer that streams its weights from CPU memory (SimpleTuner's RamTorch) copies them into a fresh GPU tensor on a
side stream and marks it used by the compute stream (`record_stream`). When the tensor is freed, the caching
allocator may hand its memory out again only once the GPU has passed that compute; until then it reserves new
blocks. A text encoder's forward pass does almost no work on the GPU per layer, so the host runs through the whole
encoder long before the GPU does, and the memory reserved grows until the allocator's cap (or the card) makes it
wait: caching text embeddings for SD3 Medium (T5-XXL, 9.5 GB in bf16) reserved 3.2-6.7 GiB with 1.2 GiB in use.
Here each streamed layer adds its weights' size to a running count after it runs, and past `limit` bytes the host
waits for the GPU (the current stream); the allocator then reuses what those copies freed, so what is reserved stays
about `limit` above what is in use. Neither torch nor RamTorch bounds this: RamTorch's `sync` prefetch policy keeps
every copied layer referenced (the whole encoder on the GPU), and an empty cache per layer would return and re-ask
the driver for the same memory every layer.
"""

from __future__ import annotations

import torch


class CopyBound:
    """A forward hook for streamed layers; `limit` in bytes."""

    def __init__(self, limit: int, wait=None):
        if limit <= 0:
            raise ValueError(f"the bound on copies in flight must be positive, not {limit}")
        self.limit = limit
        self.pending = 0  # bytes copied since the host last waited
        self.waits = 0
        self._wait = wait or _wait_for_gpu

    def __call__(self, module, inputs, output) -> None:
        weight = getattr(module, "weight", None)
        if weight is None:
            return
        self.pending += weight.numel() * weight.element_size()
        if self.pending >= self.limit:
            self._wait(_device(output))
            self.pending = 0
            self.waits += 1

    def attach(self, layers) -> list:
        """Hook every layer in `layers`; returns the handles."""
        return [layer.register_forward_hook(self) for layer in layers]


def _wait_for_gpu(device) -> None:
    if device is not None:  # a layer that ran on the CPU copied nothing to a GPU
        torch.cuda.current_stream(device).synchronize()


def _device(output):
    """The CUDA device a layer's output is on, or None."""
    tensors = [output] if isinstance(output, torch.Tensor) else list(output) if isinstance(output, (tuple, list)) else []
    tensor = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    return tensor.device if tensor is not None and tensor.device.type == "cuda" else None
