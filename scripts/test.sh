#!/usr/bin/env bash
# The test command: set up .venv if needed, run the fast test suite, then build the docs strictly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -m "not slow" -q -n 2 "$@"
if [ -f mkdocs.yml ]; then
  .venv/bin/python -m mkdocs build --strict -q -d site
fi
