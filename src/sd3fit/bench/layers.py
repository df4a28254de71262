"""`sd3fit bench-layers`: SD3 Medium's linear layers at 1024 px, bf16 against sd3fit's int8 layer, side by side.

Each row is one layer shape of an MMDiT block (tokens x in -> out, with how many such layers a block has): the time
of the forward and the input gradient (the two products a LoRA step needs from a frozen base layer), eager and under
torch.compile, for `nn.Linear` in bf16 and `sd3fit.quant.int8.Int8Linear`, timed with CUDA events (wall clock on a
CPU) as the median of repeated calls after warm-up, plus the int8 layer's error against bf16 on inputs with outlier
channels. Torch only: no SimpleTuner, no model download.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

IMAGE_TOKENS = 4096  # 1024 px: 128x128 latents in 2x2 patches
TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens
WIDTH, MLP = 1536, 6144
# (name, tokens, in, out, layers of this shape in one block)
SHAPES = [
    ("attn.to_q/k/v, to_out.0", IMAGE_TOKENS, WIDTH, WIDTH, 4),
    ("attn.add_q/k/v_proj, to_add_out", TEXT_TOKENS, WIDTH, WIDTH, 4),
    ("ff.net.0.proj", IMAGE_TOKENS, WIDTH, MLP, 1),
    ("ff.net.2", IMAGE_TOKENS, MLP, WIDTH, 1),
    ("ff_context.net.0.proj", TEXT_TOKENS, WIDTH, MLP, 1),
    ("ff_context.net.2", TEXT_TOKENS, MLP, WIDTH, 1),
]
FIELDS = ("layer", "tokens", "in_features", "out_features", "per_block", "compiled", "bf16_ms", "int8_ms", "ratio",
          "output_error", "input_grad_error")


CALLS_PER_SAMPLE = 10  # back to back: the host queues ahead, so a layer the GPU is busy with is timed by the GPU


def _timer(device: str):
    import torch

    if device == "cuda":
        def timed(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(CALLS_PER_SAMPLE):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / CALLS_PER_SAMPLE
    else:
        def timed(fn) -> float:
            started = time.perf_counter()
            for _ in range(CALLS_PER_SAMPLE):
                fn()
            return (time.perf_counter() - started) * 1000 / CALLS_PER_SAMPLE
    return timed


def _step(layer, x, grad):
    import torch

    def run():
        y = layer(x)
        torch.autograd.grad(y, x, grad)
    return run


def measure(shapes=SHAPES, device: str | None = None, repeats: int = 20, compiled=(False, True),
            token_scale: float = 1.0) -> list[dict]:
    """One row per shape and compile setting; `token_scale` shrinks the token counts (for a quick look on a CPU)."""
    import torch
    from torch import nn

    from sd3fit.quant.int8 import Int8Linear

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    timed = _timer(device)
    rows = []
    for name, tokens, k, n, per_block in shapes:
        tokens = max(1, int(tokens * token_scale))
        torch.manual_seed(0)
        reference = nn.Linear(k, n, device=device, dtype=torch.bfloat16).requires_grad_(False)
        quantized = Int8Linear.from_linear(reference)
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        x[:, :8] *= 20  # outlier channels, as transformer activations have
        x.requires_grad_(True)
        grad = torch.randn(tokens, n, device=device, dtype=torch.bfloat16)
        y_ref = reference(x)
        dx_ref, = torch.autograd.grad(y_ref, x, grad)
        y_q = quantized(x)
        dx_q, = torch.autograd.grad(y_q, x, grad)
        error = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
        for compile_it in compiled:
            times = {}
            for label, layer in (("bf16", reference), ("int8", quantized)):
                fn = torch.compile(layer) if compile_it else layer
                step = _step(fn, x, grad)
                for _ in range(3):
                    step()
                times[label] = statistics.median(timed(step) for _ in range(repeats))
            rows.append({"layer": name, "tokens": tokens, "in_features": k, "out_features": n, "per_block": per_block,
                         "compiled": compile_it, "bf16_ms": round(times["bf16"], 4), "int8_ms": round(times["int8"], 4),
                         "ratio": round(times["int8"] / times["bf16"], 3), "output_error": round(error(y_q, y_ref), 5),
                         "input_grad_error": round(error(dx_q, dx_ref), 5)})
    return rows


def block_totals(rows: list[dict]) -> dict[bool, dict[str, float]]:
    """Per compile setting: one block's linear layers in all (ms), bf16 and int8, from the rows' shapes and counts."""
    totals: dict[bool, dict[str, float]] = {}
    for row in rows:
        t = totals.setdefault(row["compiled"], {"bf16_ms": 0.0, "int8_ms": 0.0})
        t["bf16_ms"] += row["bf16_ms"] * row["per_block"]
        t["int8_ms"] += row["int8_ms"] * row["per_block"]
    return totals


def markdown(record: dict) -> str:
    facts = record["facts"]
    lines = [f"GPU {facts.get('gpu') or 'none (CPU)'}, torch {facts.get('torch')}, torchao {facts.get('torchao')}, "
             f"median of {record['repeats']} samples of {record.get('calls_per_sample', 1)} calls back to back "
             f"(forward and input gradient), after 3 warm-up calls; {facts.get('date')}; `{record['command']}`",
             "",
             "| layer | tokens | in → out | per block | compiled | bf16 (ms) | int8 (ms) | int8 / bf16 | output error | "
             "input-gradient error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| `{r['layer']}` | {r['tokens']} | {r['in_features']} → {r['out_features']} | {r['per_block']} | "
                     f"{'yes' if r['compiled'] else 'no'} | {r['bf16_ms']:.3f} | {r['int8_ms']:.3f} | {r['ratio']:.2f} | "
                     f"{100 * r['output_error']:.2f} % | {100 * r['input_grad_error']:.2f} % |")
    for compiled, t in sorted(block_totals(record["rows"]).items()):
        lines.append(f"\nOne block's linear layers, {'compiled' if compiled else 'eager'}: bf16 {t['bf16_ms']:.2f} ms, "
                     f"int8 {t['int8_ms']:.2f} ms ({t['int8_ms'] / t['bf16_ms']:.2f}x).")
    return "\n".join(lines) + "\n"


def run(out: Path, command: str, repeats: int = 20, token_scale: float = 1.0, compiled=(False, True)) -> Path:
    """Measure, then write `layers.json` and `layers.md` into `out` (a new or empty folder)."""
    from sd3fit import host
    from sd3fit.runs import require_free_folder

    require_free_folder(out, "--out")
    rows = measure(repeats=repeats, token_scale=token_scale, compiled=compiled)
    record = {"facts": host.describe(), "command": command, "repeats": repeats, "calls_per_sample": CALLS_PER_SAMPLE,
              "token_scale": token_scale, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "layers.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "layers.md").write_text(markdown(record))
    return out
