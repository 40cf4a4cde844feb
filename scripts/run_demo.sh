#!/usr/bin/env bash
# Fresh machine -> the main job: segment the bundled samples with the bundled models and print metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh napari
exec .venv/bin/graphkd demo --viewer "$@"
