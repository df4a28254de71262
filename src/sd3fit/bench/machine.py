"""What a benchmark ran on: GPU model, memory and driver, CPU, library versions, date. Every results row carries
these, so rows from different machines are never read as one comparison."""

from __future__ import annotations

import platform
import subprocess
import time

def nvidia_smi(fields: str, select: list[str] = ()) -> list[list[str]] | None:
    """nvidia-smi's answer to `--query-gpu=fields`, one list of values per GPU; None without a working nvidia-smi.
    It needs no CUDA context, so asking costs the GPU nothing."""
    try:
        out = subprocess.run(["nvidia-smi", *select, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return [[value.strip() for value in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    import torch

    facts: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        answer = nvidia_smi("driver_version")
        facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 1024**3, 2),
                     driver=answer[0][0] if answer else None, cuda=torch.version.cuda)
    else:
        facts.update(gpu=None, gpu_memory_gib=None, driver=None, cuda=None)
    facts["cpu"] = _cpu()
    from sd3fit.train import versions  # here, not at the top: training's modules import this one

    facts.update({name.replace("-", "_"): value for name, value in versions().items()})
    if facts["sd3fit"] is None:  # run from a source tree without installing
        import sd3fit

        facts["sd3fit"] = sd3fit.__version__
    return facts
