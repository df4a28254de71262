"""Cached batches read ahead of the step (`prefetch_batches: true`, an sd3fit speed key).

Upstream (simpletuner 4.10.1) reads each step's cached latents and text embeddings from disk (`torch.load` of
compressed files: tens of milliseconds of host time per step at 1024 px) in the training loop itself, while the
GPU waits. Its own `dataloader_prefetch` option moves that into a background thread (`BatchFetcher`), and
`dataloader_prefetch_device_threshold_mb` has the thread copy each batch to the GPU on a side stream. Both are off
by default; this key turns them on with a short queue (each SD3 batch is a few MiB) and, on CUDA, the copy to the
GPU. Nothing is patched: it sets upstream's options where the preset leaves them unset.
"""

from __future__ import annotations

from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
QUEUE = 4  # batches read ahead; upstream's default of 10 only holds more memory
DEVICE_THRESHOLD_MB = 1  # every SD3 batch is larger: all of them go to the GPU ahead of their step


def options(options: dict, on: bool, cuda: bool) -> dict:
    """`options` with upstream's prefetch settings added when `on` (those the preset sets itself are kept)."""
    if not on:
        return options
    compat.require(CHECKED_AGAINST, __name__)
    from simpletuner.helpers.data_backend.runtime import batch_fetcher

    if not hasattr(batch_fetcher, "BatchFetcher"):
        raise RuntimeError(f"{__name__}: SimpleTuner has no BatchFetcher; this patch needs updating")
    wanted = {"dataloader_prefetch": True, "dataloader_prefetch_qlen": QUEUE}
    if cuda:
        wanted["dataloader_prefetch_device_threshold_mb"] = DEVICE_THRESHOLD_MB
    return {**wanted, **options}
