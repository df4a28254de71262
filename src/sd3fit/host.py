"""Facts about this machine and its GPU, and the sizes cards are sold in: the one low module that training, the
fit check and the benchmark all read (it imports nothing else of sd3fit's but errors)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version

from sd3fit.errors import UserError

GIB = 1024**3
_UNITS = {"gb": 1e9, "gib": GIB, "mb": 1e6, "mib": 1024**2}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gb|gib|mb|mib)\s*$", re.IGNORECASE)
# cards people train on, in the sizes they are sold in (GB); the figures mark them and the presets are made for them
CARD_SIZES_GB = (6, 8, 12, 16, 24)
PACKAGES = ("sd3fit", "simpletuner", "torch", "diffusers", "transformers", "peft", "accelerate", "optimum-quanto",
            "torchao", "bitsandbytes", "torch-optimi")


def size_gib(text: str, what: str = "GPU memory") -> float:
    """`24GB` (decimal, as cards are sold: 24e9 bytes = 22.35 GiB), `22.5GiB`, `16000MiB` -> GiB."""
    match = _SIZE.match(str(text))
    if not match:
        raise UserError(f"cannot read {what} {text!r}: write a size such as 24GB, 22.5GiB or 16000MiB")
    gib = float(match.group(1)) * _UNITS[match.group(2).lower()] / GIB
    if gib <= 0:
        raise UserError(f"{what} {text!r} must be more than zero")
    return gib


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


def _visible() -> list[str]:
    """nvidia-smi's selection of the GPUs CUDA_VISIBLE_DEVICES names (when it names them by number)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return ["-i", visible] if visible and all(part.strip().isdigit() for part in visible.split(",")) else []


def gpu_count() -> int | None:
    """How many GPUs are visible (nvidia-smi, honouring CUDA_VISIBLE_DEVICES given by number); None without a
    working nvidia-smi."""
    found = nvidia_smi("name", _visible())
    return None if found is None else len(found)


def gpu() -> tuple[str, float] | None:
    """Name and total memory (GiB) of the visible GPU with the most memory, from nvidia-smi. The largest:
    nvidia-smi's numbering may differ from CUDA's, and a refusal must never be wrong."""
    found = []
    for *name, mib in nvidia_smi("name,memory.total", _visible()) or []:
        try:
            found.append((",".join(name), float(mib) / 1024))
        except ValueError:  # "[N/A]" on some shared-memory and MIG systems: no verdict
            return None
    return max(found, key=lambda item: item[1]) if found else None


def gpu_capability() -> tuple[int, int] | None:
    """The highest CUDA compute capability among the visible GPUs, from nvidia-smi; None without one (or when it
    cannot say). The highest: a refusal must never be wrong."""
    found = []
    for row in nvidia_smi("compute_cap", _visible()) or []:
        major, _, minor = (row[0] if row else "").partition(".")
        if not (major.isdigit() and minor.isdigit()):
            return None
        found.append((int(major), int(minor)))
    return max(found) if found else None


GPU_BUSY_GIB = 0.5  # GPU memory others use before a run above which its device-wide figures are not its own


def gpu_memory_used_gib() -> float | None:
    """Memory in use on the visible GPUs (the most on any one, GiB) by every process, from nvidia-smi; None without
    it. Asked where this process holds no CUDA context, it is other processes' memory."""
    used = []
    for row in nvidia_smi("memory.used", _visible()) or []:
        try:
            used.append(float(row[0]) / 1024)
        except (ValueError, IndexError):
            return None
    return max(used) if used else None


def ram_gib() -> float | None:
    """Memory this machine can give a new process (MemAvailable), GiB; None where /proc/meminfo is missing."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    """Python's and the training stack's versions, as records name them."""
    out = {"python": sys.version.split()[0]}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    if out["sd3fit"] is None:  # run from a source tree without installing
        import sd3fit

        out["sd3fit"] = sd3fit.__version__
    return out


def describe() -> dict:
    """What a benchmark ran on: GPU model, memory and driver, CPU, library versions, date. Every results row carries
    these, so rows from different machines are never read as one comparison. Imports torch: call it in a child
    process when this one must hold no CUDA context."""
    import torch

    facts: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        answer = nvidia_smi("driver_version")
        facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 2),
                     driver=answer[0][0] if answer else None, cuda=torch.version.cuda)
    else:
        facts.update(gpu=None, gpu_memory_gib=None, driver=None, cuda=None)
    facts["cpu"] = cpu()
    facts["ram_gib"] = ram_gib()
    facts.update({name.replace("-", "_"): value for name, value in versions().items()})
    return facts
