"""Shared fixtures: the tiny demo assets (built once per session) and helpers to run the `sd3fit` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SD3FIT = [sys.executable, "-m", "sd3fit.cli"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """SD3FIT_CACHE_DIR for the whole session: the demo model and images are built once."""
    path = tmp_path_factory.mktemp("sd3fit-cache")
    os.environ["SD3FIT_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def demo_assets(cache_dir) -> dict[str, Path]:
    from sd3fit.demo import ensure_demo_assets
    from sd3fit.presets import demo_assets_dir

    return ensure_demo_assets(demo_assets_dir())


@pytest.fixture
def image_folder(tmp_path, demo_assets) -> Path:
    """A private copy of the demo images, free to break."""
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(demo_assets["dataset"], folder)
    return folder


def run_sd3fit(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*SD3FIT, *args], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_all(commands: dict[str, list[str]], timeout: int = 900) -> dict[str, subprocess.CompletedProcess]:
    """Run independent commands (argument lists, from the project folder) as many at a time as the machine has cores,
    each command's result under its name. A tiny training run keeps about one core busy (mostly Python), so the
    fixtures that train several of them wait for the longest chain instead of their sum."""
    from concurrent.futures import ThreadPoolExecutor

    def one(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    with ThreadPoolExecutor(max_workers=max(1, min(len(commands), os.cpu_count() or 1))) as pool:
        futures = {name: pool.submit(one, command) for name, command in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def tree_snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file below a folder, to show that a failed command changed nothing."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """Assert the bad-input contract (exit 2, one stderr line `sd3fit: error: ...`) and return that line."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sd3fit: error: "), proc.stderr
    return lines[0]


def train_all(root: Path, runs: dict[str, list[str]], timeout: int = 900) -> dict[str, Path]:
    """`sd3fit train` once per entry (run name: its arguments), side by side (`run_all`); every run must end well.
    Their run folders by name."""
    done = run_all({name: [*SD3FIT, "train", *args, "--name", name, "--runs-dir", str(root)]
                    for name, args in runs.items()}, timeout)
    for name, proc in done.items():
        assert proc.returncode == 0, name + ": " + proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: root / name for name in runs}
