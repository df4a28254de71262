"""`sd3fit train`, before training: choose the preset, check everything that can be checked cheaply, write the run
folder. `sd3fit.launch` then starts the trainer in it.

All checks run before the run folder exists, so bad input leaves no trace and touches no earlier run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sd3fit import datasets, fit, host, hub, presets, runs, schema
from sd3fit.errors import UserError
from sd3fit.launch import CUDA_ALLOC_CONF


# Every run writes a checkpoint as `checkpoint-<step>-tmp` and renames it when complete, so a run killed while
# saving never leaves a half-written checkpoint under a checkpoint's name (`--resume` also skips one without the
# completion marker, see `runs.last_checkpoint`).
RUN_DEFAULTS = {"checkpointing_use_tempdir": True}


@dataclass
class Prepared:
    run: runs.Run
    preset: presets.Preset
    model_source: str
    record: dict  # what config.json holds
    backends: list[dict]  # what multidatabackend.json holds
    named: bool = False  # the user chose the folder's name (--name)


def device(gpu: str | None) -> tuple[str, float] | None:
    """The GPU to fit: the card named by `--gpu SIZE`, else the one nvidia-smi finds (None without one)."""
    return fit.card(gpu) if gpu else host.gpu()


def choose(preset_arg: str | None, overrides: list[str], gpu: str | None,
           processes: int = 1) -> tuple[str | None, str | None]:
    """(preset, why): `lora` or `full` means the fastest preset of that kind that fits the GPU (one such GPU per
    process), and `why` says so; anything else is a preset, and `why` is None."""
    if preset_arg not in fit.KINDS:
        return preset_arg, None
    found = device(gpu)
    if found is None:
        raise UserError(f"no GPU found (nvidia-smi); name the card to choose a {preset_arg} preset for, e.g. --gpu 12GB")
    chosen = fit.pick(preset_arg, found, overrides, processes)
    return chosen, (f"{preset_arg} on {fit.cards(found[0], processes)} ({found[1]:.2f} GiB): {chosen}, the fastest "
                    "preset measured to fit")


def _demo_assets() -> None:
    """Build the demo's model and images on first use; what the libraries print meanwhile (warnings, progress bars)
    goes to build.log beside them, not to the terminal."""
    from sd3fit.demo import ensure_demo_assets

    root = presets.demo_assets_dir()
    if (root / "tiny-sd3" / "model_index.json").is_file() and (root / "shapes").is_dir():
        ensure_demo_assets(root)
        return
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    print(f"sd3fit: building the offline demo's tiny model and images (once; log: {runs.shown(log)})", flush=True)
    with _output_to(log):
        ensure_demo_assets(root)


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so libraries' own handlers too) to a file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with path.open("ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def prepare(preset_arg: str | None, overrides: list[str], name: str | None = None, runs_dir: str | None = None,
            check_fit: bool = True, gpu: str | None = None, processes: int = 1) -> Prepared:
    """Check preset, GPU memory, model and dataset; plan the run folder but create nothing (see `write`).
    `check_fit=False` skips refusing a GPU (or RAM) smaller than the configuration's measured need; `gpu` ("12GB")
    names the card to fit instead of the one nvidia-smi finds; `processes`: one such card per process."""
    preset = presets.load(preset_arg, overrides)
    if preset.uses_demo:
        _demo_assets()
    own, options = schema.split(preset.values)
    fit.check_capability(options, host.gpu_capability())
    if check_fit:
        fit.check(preset.name, preset.values, device(gpu), host.ram_gib(), processes)
    source = hub.check_model(options["pretrained_model_name_or_path"])
    run = runs.plan(runs.runs_root(runs_dir), name, preset.name)
    dataset_dir = own.get("dataset_dir")
    backends = datasets.render(
        Path(options["data_backend_config"]),
        {"dataset_dir": str(Path(dataset_dir).expanduser().resolve()) if dataset_dir else "", "run_dir": str(run.dir)},
    )
    images = datasets.check(backends, options)
    options = {**options, "output_dir": str(run.output), "data_backend_config": str(run.datasets)}
    record = {
        "preset": presets.portable(preset.path),
        "overrides": [presets.portable_override(o) for o in preset.overrides],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_source": source,
        "images": images,
        "versions": host.versions(),
        "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF),
        "sd3fit": own,
        "simpletuner": options,
        # SimpleTuner options sd3fit sets unless the preset does, kept apart from the preset's own so that matching
        # a run against benchmarked configurations sees only what the preset chose
        "defaults": {k: v for k, v in RUN_DEFAULTS.items() if k not in options},
    }
    return Prepared(run=run, preset=preset, model_source=source, record=record, backends=backends, named=name is not None)


def _moved(data, old: Path, new: Path):
    """`data` with every path inside the folder `old` moved into `new`."""
    inside = re.compile(re.escape(json.dumps(str(old))[1:-1]) + r'(?=[/"])')
    return json.loads(inside.sub(lambda _: json.dumps(str(new))[1:-1], json.dumps(data)))


def write(prepared: Prepared) -> runs.Run:
    """Create the run folder and write the resolved config and dataset definition into it."""
    planned = prepared.run
    run = runs.create(planned, named=prepared.named)
    if run != planned:  # another run took the planned folder first: point every path at the one claimed
        prepared.record, prepared.backends = (_moved(x, planned.dir, run.dir) for x in (prepared.record, prepared.backends))
        prepared.run = run
    run.datasets.write_text(json.dumps(prepared.backends, indent=2) + "\n")
    run.config.write_text(json.dumps(prepared.record, indent=2) + "\n")
    shutil.copyfile(prepared.preset.path, run.dir / "preset.json")
    return run
