"""`sd3fit infer base|lora|full`, also run by `inference/base.py`, `inference/lora.py` and `inference/full.py`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sd3fit import sd3_medium
from sd3fit.errors import UserError
from sd3fit.infer import sources
from sd3fit.infer.generate import Column, Settings

DEFAULT_MODEL = sd3_medium.HUB_ID


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or local diffusers folder (default {DEFAULT_MODEL})")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    p.add_argument("--prompts", help="text file, one prompt a line (blank lines and # comments skipped)")
    p.add_argument("--seed", type=int, action="append", help="seed (repeat for more; default 0)")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    p.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (default 7.0)")
    p.add_argument("--size", default="1024", help="WIDTHxHEIGHT or one number for a square (default 1024)")
    p.add_argument("--negative-prompt", help="negative prompt for every image")
    p.add_argument("--quantize", choices=["int8"], help="int8 weights for the transformer (optimum-quanto): less GPU memory")
    p.add_argument("--offload", choices=["none", "model", "sequential"], default="none",
                   help="CPU offload for small GPUs: model (whole components) or sequential (layer by layer, slowest)")
    p.add_argument("--drop-t5", action="store_true", help="load without the T5 text encoder (saves ~9 GB; prompts lose detail)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", help="new or empty folder for the images (default inference-out/<mode>-<date>-<time>)")


def add_parser(sub) -> None:
    p = sub.add_parser("infer", help="images from the base model, LoRA adapters or full fine-tunes, side by side")
    modes = p.add_subparsers(dest="mode", required=True)
    base = modes.add_parser("base", help="the base model alone")
    _common(base)
    lora = modes.add_parser("lora", help="one column per LoRA adapter (Hub id, .safetensors file or run folder)")
    lora.add_argument("--adapter", action="append", required=True, help="adapter to compare (repeat for more)")
    lora.add_argument("--scale", type=float, default=1.0, help="LoRA scale; 0 gives the base model's image (default 1)")
    lora.add_argument("--with-base", action="store_true", help="add a column for the base model")
    _common(lora)
    full = modes.add_parser("full", help="one column per full fine-tune (run folder)")
    full.add_argument("--checkpoint", action="append", required=True, help="run folder of a full fine-tune (repeat for more)")
    full.add_argument("--with-base", action="store_true", help="add a column for the base model")
    _common(full)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise UserError(f"prompt file not found: {path}")
        from_file = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#")]
        if not from_file:
            raise UserError(f"prompt file {path} holds no prompt; write one prompt a line")
        prompts += from_file
    if not prompts:
        raise UserError("no prompt given; use --prompt TEXT or --prompts FILE")
    return prompts


def _size(text: str) -> tuple[int, int]:
    try:
        w, sep, h = text.lower().partition("x")
        width, height = int(w), int(h if sep else w)
    except ValueError:
        raise UserError(f"--size must be WIDTHxHEIGHT or one number, not {text!r}") from None
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise UserError(f"--size {text}: width and height must be positive multiples of 16")
    return width, height


def settings_from(args) -> Settings:
    width, height = _size(args.size)
    if args.steps <= 0:
        raise UserError(f"--steps must be positive, not {args.steps}")
    for seed in args.seed or []:
        if not 0 <= seed < 2**63:
            raise UserError(f"--seed must be between 0 and 2**63-1, not {seed}")
    return Settings(
        model=args.model, prompts=_prompts(args), seeds=args.seed or [0], steps=args.steps, guidance=args.guidance,
        width=width, height=height, negative_prompt=args.negative_prompt, scale=getattr(args, "scale", 1.0),
        quantize=args.quantize, offload=args.offload, drop_t5=args.drop_t5, device=args.device,
    )


def columns_from(args) -> list[Column]:
    columns = [Column("base", "base")] if args.mode == "base" or args.with_base else []
    if args.mode == "lora":
        for spec in args.adapter:
            found = sources.adapter(spec)
            columns.append(Column(found.label, "lora", found))
    elif args.mode == "full":
        for spec in args.checkpoint:
            found = sources.full_checkpoint(spec)
            columns.append(Column(found.label, "full", found))
    return columns


def run(args) -> int:
    from sd3fit.infer import generate

    generate.quiet_imports()
    settings = settings_from(args)
    columns = columns_from(args)
    out = Path(args.out or time.strftime(f"inference-out/{args.mode}-%Y%m%d-%H%M%S"))
    sidecar = generate.run(settings, columns, out)
    print(f"{len(sidecar['images'])} images in {out}/images, contact sheet {out}/contact_sheet.png, settings {out}/images.json")
    return 0
