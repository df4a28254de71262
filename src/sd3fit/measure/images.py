"""Validation images into the run's TensorBoard folder (the Images tab), one tag per prompt and image.

Each call opens its own event file and closes it again: the final validation runs after the trainer has closed
its trackers and sd3fit's scalar writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write(tensorboard_dir: Path, step: int, images: dict[str, list]) -> int:
    """`images`: prompt short name -> PIL images (SimpleTuner's `Validation.validation_images`); returns how many
    were written."""
    from torch.utils.tensorboard import SummaryWriter

    written = 0
    writer = SummaryWriter(log_dir=str(tensorboard_dir))
    try:
        for name, pictures in images.items():
            for index, picture in enumerate(pictures or []):
                if not hasattr(picture, "convert"):  # videos and other outputs: not an image
                    continue
                tag = f"validation/{name}" + (f"/{index}" if len(pictures) > 1 else "")
                writer.add_image(tag, np.asarray(picture.convert("RGB")), global_step=step, dataformats="HWC")
                written += 1
    finally:
        writer.close()
    return written
