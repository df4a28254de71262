#!/usr/bin/env bash
# Train SD3 from a preset: ./train.sh [CONFIG] [key=value ...] [--name NAME]
# With no CONFIG it trains the offline demo. Installs the environment on first use.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/scripts/setup.sh"
exec "$here/.venv/bin/sd3fit" train "$@"
