"""Train without CUDA: make `Tensor.pin_memory` a no-op when no CUDA device exists.

Upstream (simpletuner 4.10.1, helpers/training/collate.py `fetch_latent` and the text-embed collation) calls
`.pin_memory()` on every cached latent and embedding unconditionally. Pinned host memory only speeds up copies to a
CUDA device; torch 2.11 on a machine without one raises "Cannot access accelerator device when none is available",
so training on CPU crashes at the first batch. With no CUDA device there is nothing to pin for, so returning the
tensor unchanged is exact. With CUDA present nothing is changed.
"""

from __future__ import annotations

import torch

from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION


def _no_pin(self, *args, **kwargs):
    return self


def apply() -> bool:
    """Return True when the fix was needed and applied."""
    compat.require(CHECKED_AGAINST, __name__)
    if torch.cuda.is_available():
        return False
    torch.Tensor.pin_memory = _no_pin
    return True
