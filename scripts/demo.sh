#!/usr/bin/env bash
# The main job: set up .venv if needed, then run `sdegen demo` (outputs under outputs/demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/sdegen demo "$@"
