"""Text encoders streamed by RamTorch queue at most a set amount of weight copies ahead of the GPU
(`ramtorch_copy_ahead_gib`, an sd3fit memory key).

Upstream (simpletuner 4.10.1) `ModelFoundation._apply_ramtorch_layers(module, component_label, ...)` replaces a
component's linear layers by RamTorch's, which copy their weights from CPU memory at every call; with
`ramtorch_text_encoder` it does so for `text_encoder_1` to `_3`. While text embeddings are cached, the host runs far
ahead of the GPU and the memory those copies free is reserved anew (`sd3fit.lean.copy_bound`). This patch wraps the
method: after upstream has converted a text encoder, every layer it marked `is_ramtorch` gets a `CopyBound` hook,
one per encoder, so the host waits for the GPU after each `ramtorch_copy_ahead_gib` of weights copied. Other
components (the transformer, the VAE) are left as upstream made them; the training step is never touched.
"""

from __future__ import annotations

import functools

from sd3fit.lean.copy_bound import CopyBound
from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
MODULE = "simpletuner.helpers.models.common"
TEXT_ENCODER = "text_encoder_"  # upstream's component labels for the text encoders
_limit: int | None = None  # bytes; None: off
bounds: dict[str, CopyBound] = {}  # per text encoder, for result.json and the tests


def ramtorch_layers(module) -> list:
    """The layers upstream's RamTorch made (it marks each `is_ramtorch`)."""
    return [child for child in module.modules() if getattr(child, "is_ramtorch", False)]


def _wrap(method):
    @functools.wraps(method)
    def wrapped(self, module, component_label, *args, **kwargs):
        replaced = method(self, module, component_label, *args, **kwargs)
        if _limit is not None and module is not None and str(component_label).startswith(TEXT_ENCODER):
            bound = bounds[component_label] = CopyBound(_limit)
            bound.attach(ramtorch_layers(module))
        return replaced

    return wrapped


def apply(limit_gib: float | None) -> None:
    """Bound the copies in flight of RamTorch's text-encoder layers to `limit_gib` (None: upstream's behaviour)."""
    global _limit
    compat.require(CHECKED_AGAINST, __name__)
    import importlib

    foundation = getattr(importlib.import_module(MODULE), "ModelFoundation", None)
    if foundation is None:
        raise RuntimeError(f"{__name__}: SimpleTuner's {MODULE} lacks ModelFoundation; this patch needs updating")
    compat.wrap_once(foundation, "_apply_ramtorch_layers", _wrap, "__sd3fit_ramtorch_bound__", __name__)
    _limit = None if limit_gib is None else int(limit_gib * 2**30)
    bounds.clear()


def stats() -> dict | None:
    """Waits per text encoder, or None when off."""
    if _limit is None:
        return None
    return {"limit_bytes": _limit, "waits": {label: bound.waits for label, bound in bounds.items()}}
