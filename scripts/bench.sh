#!/usr/bin/env bash
# The benchmark command: the slow statistical checks, then `sdegen bench` (JSON + plots in bench_results/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/python -m pytest -m slow -q
.venv/bin/sdegen bench --out bench_results "$@"
