"""Presets: find one, read it, apply `key=value` overrides, validate it against the schema.

A preset is a JSON file in `config/` (or anywhere). Paths inside it follow two rules, so a preset can be copied:
`data_backend_config` is relative to the preset's own folder (presets and their dataset definitions travel
together); every other path is relative to the current directory, as on SimpleTuner's command line. Overrides on
the command line are relative to the current directory. sd3fit writes all of them as absolute paths into the run's
config, because training runs inside the run folder.

Strings may contain `{demo}`: the folder of the offline demo's tiny model and images, built on first use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd3fit import schema
from sd3fit.errors import UserError

PROJECT_DIR = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_DIR / "config"
DEMO_PRESET = CONFIG_DIR / "demo.json"
DEMO_TOKEN = "{demo}"
# option names whose values are file or folder paths (when such a path exists, it is made absolute)
_PATH_SUFFIXES = ("_dir", "_path", "_config", "_file", "_library", "name_or_path", "init_lora", "resume_from_checkpoint")


def portable(path: Path | str) -> str:
    """A path for records that travel (results, sidecars): relative to the project when inside it, `~/...` under
    the home folder, else as it is; the machine's own layout stays out of files others read."""
    path = Path(path).expanduser().resolve()
    for base, shown in ((PROJECT_DIR, ""), (Path.home().resolve(), "~/")):
        if path.is_relative_to(base):
            return shown + str(path.relative_to(base))
    return str(path)


def portable_override(text: str) -> str:
    """An override `key=value` for records: an absolute path value shown as `portable` shows it."""
    key, sep, raw = text.partition("=")
    return f"{key}={portable(raw)}" if sep and raw.startswith(("/", "~")) else text


def demo_assets_dir() -> Path:
    root = os.environ.get("SD3FIT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd3fit"
    return Path(root) / "demo-v1"


@dataclass
class Preset:
    path: Path
    values: dict[str, Any]  # validated, paths absolute
    overrides: list[str] = field(default_factory=list)
    uses_demo: bool = False

    @property
    def name(self) -> str:
        return self.path.stem


def find(arg: str | None) -> Path:
    """A preset file by path, or by name in config/ (`lora-r16-int8` means config/lora-r16-int8.json)."""
    if arg is None:
        return DEMO_PRESET
    path = Path(arg).expanduser()
    if path.is_file():
        return path
    by_name = CONFIG_DIR / f"{arg}.json"
    if path.suffix == "" and by_name.is_file():
        return by_name
    raise UserError(f"preset not found: {arg}; give a JSON file or one of: {', '.join(available())}")


def available() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"preset {path} is not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"preset {path} must be a JSON object of option names and values")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value`; the value is read as JSON when it parses (numbers, true/false, lists), else as text."""
    key, sep, raw = text.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key:
        raise UserError(f"cannot read override {text!r}: write key=value, e.g. max_train_steps=100")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _absolute(values: dict[str, Any], base: Path, keys) -> None:
    for key in keys:
        value = values.get(key)
        if not isinstance(value, str) or not key.endswith(_PATH_SUFFIXES) or DEMO_TOKEN in value:
            continue
        candidate = base / Path(value).expanduser()  # an absolute value replaces the base
        if key == "data_backend_config" or candidate.exists():
            values[key] = str(candidate.resolve())


def _expand_demo(values: dict[str, Any]) -> bool:
    used = False
    for key, value in values.items():
        if isinstance(value, str) and DEMO_TOKEN in value:
            values[key] = value.replace(DEMO_TOKEN, str(demo_assets_dir()))
            used = True
    return used


def load(arg: str | None, overrides: list[str] = ()) -> Preset:
    """Find, read, override and validate a preset."""
    path = find(arg)
    values = read(path)
    cwd = Path.cwd()
    _absolute(values, cwd, [k for k in values if k != "data_backend_config"])
    _absolute(values, path.resolve().parent, ["data_backend_config"])
    pairs = [parse_override(o) for o in overrides]
    for key, value in pairs:
        values[key] = value
    _absolute(values, cwd, [k for k, _ in pairs])
    uses_demo = _expand_demo(values)
    return Preset(path=path, values=schema.validate(values), overrides=list(overrides), uses_demo=uses_demo)
