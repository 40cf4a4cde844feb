#!/usr/bin/env bash
# Create .venv (Python 3.11) and install napari-graphkd with the given extras, pinned by constraints.txt.
# Usage: scripts/setup_env.sh [EXTRAS]   e.g. scripts/setup_env.sh napari,testing
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] >= (3, 10), "Python >= 3.10 needed"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
EXTRAS=${1:-napari}
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[${EXTRAS}]" 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import napari_graphkd, torch; print('napari-graphkd', napari_graphkd.__version__, '| torch', torch.__version__)"
