"""Every script in ``examples/`` runs in its fast mode, so that none can rot.

Scripts are discovered by glob (whoever adds an example gets it tested). Each one is loaded from its
path and its ``main(argv)`` is called in-process with ``--fast --out <tmp>`` (no second interpreter
start-up per script); a script without ``main`` runs in a subprocess instead. A run passes when it
finishes, writes at least one PNG into ``--out``, and every PNG it writes is a real image.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_examples_are_discovered():
    names = {p.name for p in EXAMPLES}
    assert {"custom_sde.py", "compare_samplers_2d.py", "likelihood.py"} <= names


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"sdegen_example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Examples whose fast mode still takes minutes on 2 cores run with the slow checks (scripts/bench.sh):
# digits trains a small UNet (164 s measured on 2 idle cores).
SLOW_EXAMPLES = {"digits"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_EXAMPLES else p
                                  for p in EXAMPLES], ids=[p.stem for p in EXAMPLES])
def test_example_runs_in_fast_mode(path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # anything written to a default relative path stays in tmp
    module = _load(path)
    if callable(getattr(module, "main", None)):
        module.main(["--fast", "--out", str(out)])
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, str(path), "--fast", "--out", str(out)], capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    pngs = sorted(out.rglob("*.png"))
    assert pngs, f"{path.name} wrote no figure into --out"
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 2000, png
