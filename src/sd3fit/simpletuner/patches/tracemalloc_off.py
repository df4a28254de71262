"""No Python allocation tracing during training (`skip_tracemalloc`, an sd3fit speed key).

Upstream (simpletuner 4.10.1) `helpers/data_backend/factory.py` calls `tracemalloc.start()` when it begins to
configure the datasets, to log how much memory that took, and never stops it: for the rest of the run, model
loading, caching and every training step included, Python records a traceback for each object it allocates. A
training step that is host-bound pays that on every tensor and module call (the tiny SD3 LoRA step on a CPU spends
1.8× the host time with tracing on). This patch gives the factory module a stand-in for `tracemalloc` whose
`start` and `get_traced_memory` raise `RuntimeError`, the error upstream already handles: its dataset log then
reads the process's resident memory (psutil) instead of traced Python memory, and nothing is traced.
"""

from __future__ import annotations

import importlib
import tracemalloc
import types

from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
MODULE = "simpletuner.helpers.data_backend.factory"


def _off(*args, **kwargs):
    raise RuntimeError("sd3fit keeps tracemalloc off during training (skip_tracemalloc)")


NOT_TRACING = types.SimpleNamespace(start=_off, get_traced_memory=_off, stop=lambda: None,
                                    is_tracing=lambda: False, __sd3fit_stand_in__=True)


def apply(on: bool) -> None:
    """Keep upstream's dataset factory from tracing allocations (`on`), or give it `tracemalloc` back."""
    compat.require(CHECKED_AGAINST, __name__)
    factory = importlib.import_module(MODULE)
    current = getattr(factory, "tracemalloc", None)
    if current is not tracemalloc and not getattr(current, "__sd3fit_stand_in__", False):
        raise RuntimeError(f"{__name__}: SimpleTuner's {MODULE} no longer uses the tracemalloc module; "
                           "this patch needs updating")
    factory.tracemalloc = NOT_TRACING if on else tracemalloc
