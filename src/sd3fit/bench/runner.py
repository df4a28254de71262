"""Run the benchmark: every preset under every budget, one training run each, one results row each.

Each run is a real `sd3fit train` run (the same preparation and launcher `train.sh` uses, its own process) with
the preset's own options except what a benchmark must fix: the model, a synthetic dataset of 1024 px images,
the resolution, warm-up + N steps, one checkpoint and one validation at the last step (validation unless turned
off) and no trackers or base-model benchmark. Text embeddings and VAE latents are cached before training, as in any run.
A run that runs out of memory is a row with status `out_of_memory`; the benchmark goes on. `--speed` adds runs of
each preset with sd3fit's speed patches off (`sd3fit.bench.speed`); a row is identified by preset, budget and speed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sd3fit import host, hub, launch, presets, sd3_medium, train
from sd3fit.bench import budget as budgets
from sd3fit.bench import flops, results, rows
from sd3fit.bench import speed as speeds
from sd3fit.errors import UserError
from sd3fit.runs import require_free_folder, shown
from sd3fit.speedrows import label, round_of

DATASET_IMAGES = 16
DATASET_SIZE = 1024
SETTINGS = "bench.json"


@dataclass
class Settings:
    presets: list[str]
    budgets: list[str]
    steps: int
    warmup_steps: int
    resolution: int
    model: str  # "auto", "random", a Hub id or a folder
    validation: bool = True
    keep_weights: bool = False
    peak_tflops: float | None = None
    speed: str = speeds.SD3FIT  # a mode of sd3fit.bench.speed; not checked on --resume: a later call may add variants
    rounds: int = 1  # passes over the whole list (A B A B ...); not checked on --resume: a later call may add rounds
    num_processes: int = 1  # processes (GPUs) per run under `accelerate launch`; rows say how many


def default_presets() -> list[str]:
    return [name for name in presets.available() if name != "demo"]


def _cache_dir() -> Path:
    return presets.demo_assets_dir().parent


def random_model_dir() -> Path:
    return Path(os.environ.get("SD3FIT_SD3_MEDIUM_DIR") or _cache_dir() / "sd3-medium-random")


def _in_child(code: str, parse: bool = True):
    """Run Python in a child process: GPU work there leaves this process without a CUDA context or cached
    memory that would sit on the GPU beside every benchmarked run."""
    done = subprocess.run([sys.executable, "-c", f"import json\n{code}"], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        raise UserError(f"benchmark set-up failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) if parse else None


def resolve_model(choice: str, preset_models: set[str], has_gpu: bool) -> tuple[str, str]:
    """(model path or id, label for every number). `auto` uses the presets' own model when its weights are here
    (a local folder or the Hugging Face cache) and SD3 Medium's architecture with random weights otherwise."""
    if choice == "auto":
        from huggingface_hub import try_to_load_from_cache

        usable = [m for m in sorted(preset_models)
                  if (hub.looks_like_path(m) and (Path(m).expanduser() / "model_index.json").is_file())
                  or (not hub.looks_like_path(m) and isinstance(try_to_load_from_cache(m, "model_index.json"), str))]
        if len(usable) == 1 and len(preset_models) == 1:
            return usable[0], f"{usable[0]} (weights found locally)"
        print(f"sd3fit bench: no local weights of {', '.join(sorted(preset_models))}; measuring "
              f"{sd3_medium.LABEL} (pass --model to use real weights)", flush=True)
        choice = "random"
    if choice == "random":
        path = random_model_dir()
        if not (path / sd3_medium.MARKER).is_file():
            device = "cuda" if has_gpu else "cpu"
            print(f"sd3fit bench: building {sd3_medium.LABEL} in {path} on {device} (once; 15 GB)", flush=True)
            _in_child(f"from sd3fit import sd3_medium; sd3_medium.build({str(path)!r}, device={device!r})", parse=False)
        return str(path), sd3_medium.LABEL
    local = Path(choice).expanduser()
    if (local / sd3_medium.MARKER).is_file():
        return str(local.resolve()), sd3_medium.LABEL
    return choice, (presets.portable(local) if local.exists() else choice)


def overrides(settings: Settings, model: str, data: Path) -> list[str]:
    total = settings.warmup_steps + settings.steps
    res = settings.resolution
    out = [
        f"pretrained_model_name_or_path={model}", f"dataset_dir={data}",
        f"data_backend_config={presets.CONFIG_DIR / 'datasets' / 'image-folder.json'}",
        f"resolution={res}", "resolution_type=pixel", f"max_train_steps={total}", "num_train_epochs=0",
        # one checkpoint, at the last step: saving is part of every real run's peak
        f"checkpointing_steps={total}", "checkpoints_total_limit=1", "report_to=none", "push_to_hub=false", "disable_benchmark=true",
        "step_metrics=true", "enable_profiler=false", "memory_snapshot_steps=0",
    ]
    if settings.validation:
        # once, after the last step: the peak a user meets at every validation, with optimizer state resident
        out += [f"validation_steps={total}", f"validation_resolution={res}x{res}"]
    else:
        out += ["validation_disable=true"]
    return out


def _check_resume(out: Path, settings: Settings) -> set[tuple[str, str, str, int]]:
    saved_path = out / SETTINGS
    if not saved_path.is_file():
        require_free_folder(out, "--out (or add --resume to continue a benchmark there)")
        return set()
    saved = json.loads(saved_path.read_text())
    for key in ("steps", "warmup_steps", "resolution", "model", "validation", "num_processes"):
        if saved.get(key, Settings.num_processes if key == "num_processes" else None) != asdict(settings)[key]:
            raise UserError(f"{out} holds a benchmark with {key}={saved.get(key)!r}, not {asdict(settings)[key]!r}; "
                            "use the same settings with --resume, or a new --out")
    done = results.read(out) if (out / results.RESULTS).is_file() else []
    return {(r["preset"], r["budget"], label(r), round_of(r)) for r in done}


def _free_name(root: Path, name: str) -> str:
    candidate, n = name, 2
    while (root / candidate).exists():  # a run cut off by an earlier, interrupted benchmark keeps its folder
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def _finished(run) -> bool:
    try:
        return (run.read_result() or {}).get("status") == "finished"
    except (OSError, UserError):  # a result cut off while written
        return False


def run(settings: Settings, out: Path, resume: bool, command: str) -> int:
    caps = [budgets.parse(b) for b in settings.budgets]
    if len({(c.gib, c.label == budgets.CARD_WORD) for c in caps}) != len(caps) or len({c.slug for c in caps}) != len(caps):
        raise UserError("--gpu-budget lists the same budget twice")
    if len(set(settings.presets)) != len(settings.presets):
        raise UserError("--presets lists the same preset twice")
    if settings.steps < 1 or settings.warmup_steps < 0:
        raise UserError("--steps must be 1 or more and --warmup-steps 0 or more")
    if settings.rounds < 1:
        raise UserError(f"--rounds must be 1 or more, not {settings.rounds}")
    speeds.variants(settings.speed, {})  # a bad mode stops the benchmark before anything runs
    if settings.resolution % 64 or not 128 <= settings.resolution <= 2048:
        raise UserError(f"--resolution {settings.resolution} must be a multiple of 64 from 128 to 2048 (SD3 Medium: 512 or 1024)")
    loaded = {name: presets.load(name) for name in settings.presets}  # every preset checked before the first run
    for preset in loaded.values():
        launch.check_processes(preset.values, settings.num_processes)
    done = _check_resume(out, settings) if resume else (require_free_folder(out, "--out") or set())

    facts = _in_child("from sd3fit import host; print(json.dumps(host.describe()))")
    if resume and (out / SETTINGS).is_file():
        first_gpu = json.loads((out / SETTINGS).read_text()).get("gpu", facts["gpu"])
        if first_gpu != facts["gpu"]:
            raise UserError(f"{out} holds a benchmark made on {first_gpu or 'a CPU'}, and this machine has "
                            f"{facts['gpu'] or 'no GPU'}; numbers from two GPUs never share a benchmark: use a new --out")
    if any(c.gib is not None or c.label == budgets.CARD_WORD for c in caps) and not facts["gpu"]:
        raise UserError("--gpu-budget caps GPU memory and needs a CUDA GPU; this machine has none (use --gpu-budget none)")
    peak = settings.peak_tflops or flops.peak_tflops(facts["gpu"])
    model, label = resolve_model(settings.model, {p.values["pretrained_model_name_or_path"] for p in loaded.values()},
                                 has_gpu=bool(facts["gpu"]))
    from sd3fit.demo import write_demo_dataset

    data = write_demo_dataset(_cache_dir() / f"bench-data-{DATASET_SIZE}", count=DATASET_IMAGES, size=DATASET_SIZE)
    extra = overrides(settings, model, data)
    # prepare every run before the first starts: a bad option or dataset stops the benchmark at once
    plan = []
    # the whole list once per round: a drift of the machine between two presets' runs (step medians of one
    # configuration spread 0.19-0.25 s in one lease) then shows as a spread over rounds, not as a ratio
    for round_ in range(1, settings.rounds + 1):
        for name in settings.presets:
            for cap in (c.for_preset(loaded[name].values.get("card")) for c in caps):
                # the variants of one preset and budget run back to back, so their ratio sees the same machine state
                for variant in speeds.variants(settings.speed, loaded[name].values):
                    if (name, cap.label, variant.label, round_) in done:
                        continue
                    # a preset may be a path: its file name names the folder
                    again = f"-round{round_}" if round_ > 1 else ""
                    run_name = _free_name(out / "runs", f"{presets.find(name).stem}-{cap.slug}{variant.suffix}{again}")
                    # no fit check: finding out what fits is the benchmark's job
                    prepared = train.prepare(name, extra + variant.overrides, name=run_name, runs_dir=str(out / "runs"),
                                             check_fit=False)
                    plan.append((name, cap, variant, round_, prepared))
    out.mkdir(parents=True, exist_ok=True)
    record = json.loads((out / SETTINGS).read_text()) if (out / SETTINGS).is_file() else {
        **asdict(settings), "model_label": label, "gpu": facts["gpu"], "calls": []}
    # the first call's settings stay; every call (a resumed one may add presets or budgets) is listed
    record.setdefault("calls", []).append({"date": facts["date"], "command": command})
    (out / SETTINGS).write_text(json.dumps(record, indent=2) + "\n")
    config = flops.transformer_config(model)
    counted: dict[str, float | None] = {}
    interrupted: list = []
    training = [False]

    def stop(signum, frame):
        interrupted.append(signum)
        if training[0]:
            raise KeyboardInterrupt  # launch.launch kills the trainer: a cut-off run gives no row anyway
        # between runs: finish writing the current row, then stop (a row is never cut in half)

    # Ctrl-C, `timeout` and schedulers: stop the running trainer, keep the rows written so far
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = 0
    for n, (name, cap, variant, round_, prepared) in enumerate(plan, 1):
        if interrupted:
            break
        run_dir = prepared.run.dir
        train.write(prepared)
        which = f", round {round_}" if settings.rounds > 1 else ""
        print(f"[{n}/{len(plan)}] {name}, GPU budget {cap.label}, speed {variant.label}{which}: training in "
              f"{shown(run_dir)}", flush=True)
        # an empty value means no cap, also when the user's environment sets one
        env = {"SD3FIT_GPU_BUDGET_GIB": "" if cap.gib is None else str(cap.gib)}
        in_use = host.gpu_memory_used_gib() if facts["gpu"] else None  # this process holds no CUDA context
        if in_use is not None and in_use > host.GPU_BUSY_GIB:
            print(f"    warning: {in_use:.2f} GiB of the GPU is in use by another process; this run's device memory "
                  "and step times include its share", flush=True)
        started = time.time()
        training[0] = True
        code = None
        try:
            code = launch.launch(prepared, num_processes=settings.num_processes, env=env, echo=False, stop_at_once=True)
        except KeyboardInterrupt:
            interrupted.append("interrupt")
        finally:
            training[0] = False
        if code is None:
            if not _finished(prepared.run):
                print(f"sd3fit bench: interrupted during {name}; rows so far are in {out / results.RESULTS} "
                      "(run again with --resume to go on)", file=sys.stderr)
                return 130
            code = 0  # stopped while the trainer was exiting, after it wrote its result: the run is whole
        options = prepared.record["simpletuner"]
        key = json.dumps({k: options.get(k) for k in ("model_type", "lora_type", "lora_rank", "peft_lora_target_modules",
                                                      "tokenizer_max_length", "train_batch_size")}, sort_keys=True)
        if key not in counted:
            counted[key] = flops.per_image(config, options, settings.resolution) if config else None
        row = rows.from_run(prepared.run, code, settings.warmup_steps, counted[key], peak)
        row.update(facts)
        row.update(preset=name, budget=cap.label, budget_gib=cap.gib, speed=variant.label, round=round_,
                   speed_patches=speeds.patches_on(prepared.preset.values), wall_s=round(time.time() - started, 1),
                   gpu_in_use_before_gib=None if in_use is None else round(in_use, 3),
                   model=presets.portable(model) if Path(model).exists() else model, model_label=label,
                   run=presets.portable(run_dir), command=command, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        results.append(out, row)
        failed += row["status"] == "failed"
        print("    " + summary_line(row), flush=True)
        if not settings.keep_weights and prepared.run.output.is_dir():
            shutil.rmtree(prepared.run.output)  # trained weights of a benchmark: gigabytes, and not what it measures
    if interrupted:
        print(f"sd3fit bench: interrupted; rows so far are in {out / results.RESULTS} (run again with --resume to go on)",
              file=sys.stderr)
        return 130
    print(f"results: {shown(out / results.RESULTS)}, {shown(out / results.CSV)}; figures: sd3fit report {shown(out)}")
    return 1 if failed else 0


def summary_line(row: dict) -> str:
    processes = row.get("processes") or 1
    said = f"{row['status']} ({label(row)}" + (f", {processes} processes" if processes > 1 else "") + ")"
    if row["status"] != "finished":
        return f"{said}: {row.get('error')}"
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    return (f"{said}: median step {fmt(row['step_s_median'], '.3f')} s (p10 {fmt(row['step_s_p10'], '.3f')}, "
            f"p90 {fmt(row['step_s_p90'], '.3f')}), {fmt(row['images_per_s'], '.2f')} images/s, "
            f"peak in steps {fmt(row['step_peak_allocated_gib'], '.2f')} GiB allocated, whole run "
            f"{fmt(row['run_peak_reserved_gib'], '.2f')} GiB reserved"
            + (f", largest of any process {fmt(row.get('largest_rank_device_gib'), '.2f')} GiB on the device"
               if processes > 1 else "") + f" ({row['wall_s']:.0f} s)")
