#!/usr/bin/env bash
# Install sd3fit's locked environment into .venv (Python 3.12, SimpleTuner 4.10.1, torch 2.11.0).
#
# Finds a Python 3.12 first on PATH, then under pyenv; only if neither has one does it let uv fetch a Python.
# Installs uv into .tools/uv when none is on PATH. Safe to run again: an up-to-date environment is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9

is_py312() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }

find_python() {
  local c
  for c in python3.12 python3 python; do
    if is_py312 "$(command -v "$c" 2>/dev/null)"; then command -v "$c"; return; fi
  done
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  if command -v pyenv >/dev/null 2>&1; then root="$(pyenv root)"; fi
  for c in $(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r); do
    if is_py312 "$c"; then echo "$c"; return; fi
  done
}

find_uv() {
  if command -v uv >/dev/null 2>&1; then command -v uv; return; fi
  if [ -x .tools/uv/bin/uv ]; then echo .tools/uv/bin/uv; return; fi
  local boot
  boot="$(command -v python3 || command -v python)" || { echo "setup: need python3 to install uv" >&2; exit 1; }
  echo "setup: installing uv $UV_VERSION into .tools/uv" >&2
  "$boot" -m venv .tools/uv >&2
  .tools/uv/bin/python -m pip install -q "uv==$UV_VERSION" >&2
  echo .tools/uv/bin/uv
}

UV="$(find_uv)"
PY="$(find_python || true)"
if [ -n "$PY" ]; then
  PYTHON_ARG="$PY"
else
  echo "setup: no Python 3.12 on PATH or under pyenv; asking uv to provide one" >&2
  PYTHON_ARG=3.12
fi
# --compile-bytecode: every trainer process imports SimpleTuner, diffusers and transformers; with bytecode compiled
# once here, that takes half the time (and where PYTHONDONTWRITEBYTECODE is set, Python would never cache it)
"$UV" sync --locked --quiet --compile-bytecode --python "$PYTHON_ARG" "$@"
