#!/usr/bin/env bash
# The test command: set up .venv if needed, run the fast test suite, then build the docs strictly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/python -m pytest -m "not slow" -q -n 2 "$@"
if [ -f mkdocs.yml ]; then
  # No -q: every warning is printed, and --strict turns any warning into a failure.
  .venv/bin/python -m mkdocs build --strict -d site
fi
