#!/usr/bin/env bash
# Fresh machine -> whole test suite: GUI libraries, .venv with the testing extra, pytest under a real Xvfb.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_gui_libs.sh
bash scripts/setup_env.sh testing
exec .venv/bin/python -m pytest --xvfb-backend xvfb -p no:cacheprovider "$@"
