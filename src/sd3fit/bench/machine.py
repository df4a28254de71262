"""What a benchmark ran on: GPU model, memory and driver, CPU, library versions, date. Every results row carries
these, so rows from different machines are never read as one comparison."""

from __future__ import annotations

import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("sd3fit", "simpletuner", "torch", "diffusers", "transformers", "peft", "accelerate", "optimum-quanto")


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


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
        facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 1024**3, 2), driver=_driver(),
                     cuda=torch.version.cuda)
    else:
        facts.update(gpu=None, gpu_memory_gib=None, driver=None, cuda=None)
    facts["cpu"] = _cpu()
    facts["python"] = platform.python_version()
    for pkg in PACKAGES:
        try:
            facts[pkg.replace("-", "_")] = version(pkg)
        except PackageNotFoundError:
            facts[pkg.replace("-", "_")] = None
    if facts["sd3fit"] is None:  # run from a source tree without installing
        import sd3fit

        facts["sd3fit"] = sd3fit.__version__
    return facts
