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


def tree_snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file below a folder, to show that a failed command changed nothing."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """Assert the bad-input contract (exit 2, one stderr line `sd3fit: error: ...`) and return that line."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sd3fit: error: "), proc.stderr
    return lines[0]
