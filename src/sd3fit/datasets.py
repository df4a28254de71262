"""Dataset definitions: fill in a template, then check the image folders before any model is loaded.

A dataset definition is SimpleTuner's data-backend JSON (a list of datasets). sd3fit's templates in
`config/datasets/` may use two placeholders that sd3fit fills per run: `{dataset_dir}` (the preset's or the command
line's `dataset_dir`) and `{run_dir}` (the run folder, for caches). SimpleTuner's own placeholders (`{output_dir}`,
`{model_family}`, `{id}`, `{env:NAME}`) are left for SimpleTuner.

SimpleTuner meets a missing caption or a broken image deep in its caching pass, after minutes of loading models;
`check` finds them first and names the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sd3fit.errors import UserError

OUR_PLACEHOLDERS = ("dataset_dir", "run_dir")
# SimpleTuner's walk skips these folders too (helpers/data_backend/local.py)
_SKIPPED_DIRS = {".Spotlight-V100", ".Trashes", ".fseventsd", ".TemporaryItems", ".zfs", ".ipynb_checkpoints"}


def image_extensions() -> set[str]:
    """Every extension Pillow can open: the set SimpleTuner scans an image folder for."""
    from PIL import Image

    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _fill(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        for name in OUR_PLACEHOLDERS:
            token = "{" + name + "}"
            if token in value:
                if not variables.get(name):
                    raise UserError(
                        f"the dataset definition uses {token} but no {name} is set; "
                        f"pass {name}=/path/to/images or set it in the preset"
                    )
                value = value.replace(token, variables[name])
        return value
    if isinstance(value, list):
        return [_fill(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, variables) for k, v in value.items()}
    return value


def render(template: Path, variables: dict[str, str]) -> list[dict]:
    """Read a dataset definition and fill in sd3fit's placeholders."""
    template = Path(template)
    if not template.is_file():
        raise UserError(f"dataset definition not found: {template}; set data_backend_config to a JSON file such as config/datasets/image-folder.json")
    try:
        backends = json.loads(template.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"dataset definition {template} is not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(backends, list) or not all(isinstance(b, dict) for b in backends):
        raise UserError(f"dataset definition {template} must be a JSON list of dataset objects")
    return _fill(backends, variables)


def _is_local_image_dataset(backend: dict) -> bool:
    if backend.get("disabled") or backend.get("disable"):
        return False
    return backend.get("type", "local") == "local" and backend.get("dataset_type", "image") == "image"


def _walk_images(folder: Path, extensions: set[str]):
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in extensions:
                yield Path(root) / name


def check_image(path: Path) -> tuple[int, int]:
    """Return (width, height); raise if Pillow cannot read the file's header and structure."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()  # structure and checksums, without decoding every pixel
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"corrupt image {path}: Pillow cannot read it ({exc}); replace or remove the file") from None
    return size


def _setting(backend: dict, defaults: dict, key: str, fallback=None):
    """A dataset's own value, else the preset's (SimpleTuner's order), else `fallback`."""
    return backend.get(key, defaults.get(key, fallback))


def big_enough(size: tuple[int, int], backend: dict, defaults: dict) -> bool:
    """SimpleTuner 4.10.1's `meets_resolution_requirements` (helpers/metadata/backends/base.py), for still images.

    `minimum_image_size` is an edge length for `pixel`, an edge length turned into an area for `pixel_area`, and
    megapixels for `area` (where a square crop also needs the matching edge).
    """
    minimum = _setting(backend, defaults, "minimum_image_size")
    if not minimum:
        return True
    width, height = size
    kind = _setting(backend, defaults, "resolution_type", "pixel_area")
    if kind == "pixel":
        return minimum <= width and minimum <= height
    if kind == "pixel_area":
        return minimum * minimum <= width * height
    area = minimum * 1_000_000
    if backend.get("crop") and backend.get("crop_aspect", "square") == "square":
        edge = int(area**0.5)
        if width < edge or height < edge:
            return False
    return area <= width * height


def check(backends: list[dict], defaults: dict | None = None) -> dict[str, int]:
    """Check each local image dataset: its folder exists, holds images, each readable and captioned as asked, and
    not all of them too small for the dataset (SimpleTuner would drop every one and stop with no data).

    `defaults` are the preset's options, which SimpleTuner applies where a dataset does not set its own.
    Returns the number of images per dataset id.
    """
    defaults = defaults or {}
    extensions = image_extensions()
    counts: dict[str, int] = {}
    if not any(b.get("dataset_type", "image") == "image" for b in backends):
        raise UserError("the dataset definition has no image dataset; add one (see config/datasets/image-folder.json)")
    for backend in backends:
        if not _is_local_image_dataset(backend):
            continue
        ident = backend.get("id", "?")
        folder = backend.get("instance_data_dir")
        if not folder:
            raise UserError(f"dataset {ident} has no instance_data_dir; set it to a folder of images")
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise UserError(f"dataset folder not found: {folder} (dataset {ident}); set dataset_dir= to a folder of images with .txt captions")
        captions = backend.get("caption_strategy", "filename") == "textfile"
        n = usable = 0
        for image in _walk_images(folder, extensions):
            if captions and not image.with_suffix(".txt").is_file():
                raise UserError(
                    f"image without caption: {image} has no {image.with_suffix('.txt').name} beside it; "
                    "write one or move the image out of the folder"
                )
            usable += big_enough(check_image(image), backend, defaults)
            n += 1
        if n == 0:
            raise UserError(f"dataset folder {folder} holds no images (dataset {ident}); add images with .txt captions")
        if usable == 0:
            raise UserError(
                f"all {n} images in {folder} are smaller than "
                f"minimum_image_size={_setting(backend, defaults, 'minimum_image_size')} of dataset {ident}, "
                "so SimpleTuner would skip every one; lower minimum_image_size or use larger images"
            )
        counts[ident] = n
    return counts
