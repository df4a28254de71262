"""Validation images in the run's TensorBoard Images tab, whatever `report_to` says.

Upstream (simpletuner 4.10.1) `Validation.run_validations` leaves the images of a validation it ran in
`self.validation_images` (a new dict of prompt short name -> PIL images each time) and returns `self`; it sends them
only to the trackers in `report_to` (W&B, ...). This patch wraps `run_validations` and, when the call produced a new
dict, writes its images to the run's TensorBoard folder at the current global step (`sd3fit.measure.images`).
"""

from __future__ import annotations

import functools
import logging

from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
logger = logging.getLogger(__name__)
_write = None  # callable(step, images), set by apply


def _wrap(run_validations):
    @functools.wraps(run_validations)
    def wrapped(self, *args, **kwargs):
        before = getattr(self, "validation_images", None)
        out = run_validations(self, *args, **kwargs)
        images = getattr(self, "validation_images", None)
        if _write is not None and images and images is not before:
            step = kwargs.get("step", args[0] if args else 0)
            try:
                _write(int(step or 0), images)
            except Exception as exc:  # a picture that cannot be logged must not end training
                logger.warning("sd3fit could not write validation images to TensorBoard: %s: %s", type(exc).__name__, exc)
        return out

    return wrapped


def apply(write) -> None:
    """`write(step, images)`; None writes nothing (processes other than the main one)."""
    global _write
    compat.require(CHECKED_AGAINST, __name__)
    from simpletuner.helpers.training.validation import Validation

    _write = write
    compat.wrap_once(Validation, "run_validations", _wrap, "__sd3fit_images__", __name__)
