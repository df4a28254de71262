"""Make images for several columns (base, LoRA adapters, full fine-tunes) on the same prompts and seeds.

Each column's images are made with exactly that column's weights: an adapter is loaded for its column and unloaded
before the next (unloading removes the LoRA layers, leaving the base weights untouched), and a full fine-tune's
transformer replaces the base one only for its column. Seeds drive a CPU generator, so a seed gives the same noise
on any device.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sd3fit import hub, presets
from sd3fit.errors import UserError
from sd3fit.infer import sheet, sources
from sd3fit.runs import require_free_folder



@dataclass
class Settings:
    model: str
    prompts: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 28
    guidance: float = 7.0
    width: int = 1024
    height: int = 1024
    negative_prompt: str | None = None
    scale: float = 1.0
    quantize: str | None = None  # "int8": optimum-quanto int8 weights for the transformer
    offload: str = "none"  # none, model or sequential (diffusers' CPU offload; needs CUDA)
    drop_t5: bool = False
    device: str | None = None


@dataclass
class Column:
    label: str
    kind: str  # base, lora or full
    source: sources.Adapter | sources.FullCheckpoint | None = None


def _device(settings: Settings) -> str:
    import torch

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    if settings.offload == "sequential" and settings.quantize:
        # accelerate's layer-by-layer offload cannot move optimum-quanto's packed int8 tensors
        raise UserError(f"--quantize {settings.quantize} cannot be combined with --offload sequential; use --offload model")
    if settings.offload != "none" and not device.startswith("cuda"):
        raise UserError(f"--offload {settings.offload} moves weights between CPU and GPU and needs a CUDA GPU; use --offload none")
    return device


def _quantize(transformer, how: str | None):
    if how is None:
        return transformer
    from optimum.quanto import freeze, qint8, quantize

    quantize(transformer, weights=qint8)
    freeze(transformer)
    return transformer


def quiet_imports() -> None:
    """Before importing diffusers: its optional back-ends (torchao, bitsandbytes, quanto's extension loader) print
    import-time notices that would bury sd3fit's one-line messages."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=SyntaxWarning)
    for name in ("bitsandbytes", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _quiet() -> None:
    """Loading bars and LoRA-prefix notices would bury the one line sd3fit prints."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def load_pipeline(settings: Settings):
    import torch
    from diffusers import StableDiffusion3Pipeline

    _quiet()
    device = _device(settings)
    source = hub.check_model(settings.model)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    extra = {"text_encoder_3": None, "tokenizer_3": None} if settings.drop_t5 else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(settings.model, dtype=dtype, **extra)
    _quantize(pipe.transformer, settings.quantize)
    _place(pipe, settings, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"device": device, "dtype": str(dtype).removeprefix("torch."), "model_source": source}


def _place(pipe, settings: Settings, device: str) -> None:
    if settings.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif settings.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)


def _images(pipe, settings: Settings, device: str, lora_scale: float | None) -> list[dict]:
    import torch

    out = []
    cuda = device.startswith("cuda")
    for prompt in settings.prompts:
        for seed in settings.seeds:
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            image = pipe(
                prompt,
                negative_prompt=settings.negative_prompt,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                width=settings.width,
                height=settings.height,
                generator=torch.Generator("cpu").manual_seed(seed),
                joint_attention_kwargs={"scale": lora_scale} if lora_scale is not None else None,
            ).images[0]
            if cuda:
                torch.cuda.synchronize(device)
            out.append({
                "image": image,
                "prompt": prompt,
                "seed": seed,
                "seconds": round(time.perf_counter() - started, 3),
                "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 1024**3, 3) if cuda else None,
            })
    return out


def _prepare(pipe, column: Column):
    """Everything that can be checked about a column before any image is made: weights read and checked against
    the loaded pipeline (adapters) or configuration compared (full fine-tunes). Returns what generation needs."""
    if column.kind == "lora":
        state = sources.load_adapter_weights(column.source)
        return state, sources.check_adapter_fits(column.source, state, pipe)
    if column.kind == "full":
        from diffusers import SD3Transformer2DModel

        try:
            config = SD3Transformer2DModel.load_config(column.source.transformer)
        except Exception as exc:
            raise UserError(f"full checkpoint {column.source.spec}: cannot read its transformer config ({type(exc).__name__})") from None
        base = pipe.transformer.config
        different = [k for k in config if not k.startswith("_") and k in base and config[k] != base[k]]
        if different:
            k = different[0]
            raise UserError(f"full checkpoint {column.source.spec} was trained from another model: {k} is {config[k]} there, {base[k]} here")
    return None, None


def _run_column(pipe, settings: Settings, column: Column, device: str, prepared) -> tuple[list[dict], dict]:
    if column.kind == "base":
        return _images(pipe, settings, device, None), {}
    if column.kind == "lora":
        state, rank = prepared
        scale = settings.scale * column.source.alpha_factor
        try:
            pipe.load_lora_weights(dict(state), adapter_name="sd3fit_column")
        except Exception as exc:
            pipe.unload_lora_weights()
            raise UserError(f"adapter {column.source.spec} could not be loaded: {str(exc).splitlines()[0][:200]}") from None
        try:
            images = _images(pipe, settings, device, scale)
        finally:
            pipe.unload_lora_weights()  # the next column must not see this adapter
        facts = {"adapter": column.source.spec, "adapter_file": presets.portable(column.source.file), "rank": rank, "scale": settings.scale,
                 "alpha_factor": column.source.alpha_factor, "alpha_from": column.source.alpha_source, "effective_scale": scale}
        return images, facts
    return _full_column(pipe, settings, column, device)


def _full_column(pipe, settings: Settings, column: Column, device: str) -> tuple[list[dict], dict]:
    import torch
    from diffusers import SD3Transformer2DModel

    base = pipe.transformer
    try:
        tuned = SD3Transformer2DModel.from_pretrained(column.source.transformer, dtype=base.dtype)
    except Exception as exc:
        raise UserError(f"full checkpoint {column.source.spec} cannot be loaded ({type(exc).__name__}); is the run complete?") from None
    _quantize(tuned, settings.quantize)
    if settings.offload != "none":
        pipe.remove_all_hooks()
    else:
        base.to("cpu")  # one transformer on the GPU at a time
    pipe.transformer = tuned
    _place(pipe, settings, device)
    try:
        images = _images(pipe, settings, device, None)
    finally:
        if settings.offload != "none":
            pipe.remove_all_hooks()
        pipe.transformer = base
        del tuned
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        _place(pipe, settings, device)
    return images, {"transformer": presets.portable(column.source.transformer)}


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return out


def run(settings: Settings, columns: list[Column], out: Path) -> dict:
    """Write out/images/*.png, out/images.json (sidecar) and out/contact_sheet.png; return the sidecar."""
    require_free_folder(out, "--out")
    pipe, facts = load_pipeline(settings)
    labels = _unique([c.label for c in columns])
    rows = [f"{p} (seed {s})" for p in settings.prompts for s in settings.seeds]
    prepared = [_prepare(pipe, column) for column in columns]  # every column is checked before the first image
    made = [_run_column(pipe, settings, column, facts["device"], ready) for column, ready in zip(columns, prepared)]
    (out / "images").mkdir(parents=True)
    records = []
    grid = [[None] * len(columns) for _ in rows]
    for col, ((images, column_facts), column, label) in enumerate(zip(made, columns, labels)):
        for row, item in enumerate(images):
            name = f"images/r{row:02d}-c{col:02d}-{label}.png"
            item["image"].save(out / name)
            grid[row][col] = item["image"]
            records.append({
                "file": name, "row": row, "column": col, "label": label, "kind": column.kind,
                "prompt": item["prompt"], "seed": item["seed"], "seconds": item["seconds"],
                "peak_gpu_gib": item["peak_gpu_gib"], **column_facts,
            })
    sheet.contact_sheet(grid, rows, labels).save(out / "contact_sheet.png")
    sidecar = {
        "model": presets.portable(settings.model) if hub.looks_like_path(settings.model) else settings.model,
        **facts,
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("model", "prompts", "seeds")},
        "prompts": settings.prompts,
        "seeds": settings.seeds,
        "columns": labels,
        "rows": rows,
        "contact_sheet": "contact_sheet.png",
        "images": records,
    }
    (out / "images.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar
