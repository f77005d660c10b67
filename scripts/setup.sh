#!/usr/bin/env bash
# Create .venv (if missing) and install sdegen with the pinned CPU torch. Idempotent.
#   bash scripts/setup.sh        what the demo needs: sdegen and its runtime dependencies only
#   bash scripts/setup.sh dev    also the test and docs tools (the "dev" extra, used by scripts/test.sh)
# .venv/.sdegen-installed records what was installed (a hash of the pins and the level); a dev
# install also serves the demo, so switching between the two commands reinstalls nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
level=${1:-demo}
case "$level" in
  demo) extras="" ;;
  dev) extras="[dev]" ;;
  *) echo "setup.sh: unknown level '$level' (expected 'demo' or 'dev')" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.sdegen-installed
pins=$(cat constraints.txt pyproject.toml | sha1sum | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$have" != "$pins dev" ] && [ "$have" != "$pins $level" ]; then
  echo "setup.sh: installing sdegen$extras into .venv (first time: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, from the pin, so nothing after it can pull a CUDA build.
  .venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
  .venv/bin/python -m pip install -q -c constraints.txt -e ".$extras"
  echo "$pins $level" > "$stamp"
fi
