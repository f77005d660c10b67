"""The documentation site: it builds with ``mkdocs build --strict`` and what it points to exists.

The cheap checks name the broken reference directly (a missing page, figure, example or API
target); the strict build then catches everything mkdocs itself warns about.
"""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import sdegen

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def _nav_files(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from _nav_files(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from _nav_files(value)


def _config():
    # mkdocs.yml is plain YAML (no Python tags), so the safe loader reads it.
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_every_nav_entry_is_a_page_and_every_page_is_in_the_nav():
    nav = set(_nav_files(_config()["nav"]))
    for rel in nav:
        assert (DOCS / rel).is_file(), f"mkdocs.yml nav names {rel}, which does not exist"
    on_disk = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert on_disk <= nav, f"pages missing from the nav: {sorted(on_disk - nav)}"


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_references_in_page_exist(page):
    text = page.read_text()
    for target in re.findall(r"^::: ([\w.]+)", text, flags=re.M):
        module, _, attr = target.rpartition(".")
        try:
            importlib.import_module(target)
        except ModuleNotFoundError:
            obj = importlib.import_module(module)
            assert hasattr(obj, attr), f"{page.name}: API target {target} does not exist"
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (page.parent / img).is_file(), f"{page.name}: figure {img} does not exist"
    for script in set(re.findall(r"examples/(\w+\.py)", text)):
        assert (ROOT / "examples" / script).is_file(), f"{page.name}: examples/{script} does not exist"


def test_sampler_guide_covers_every_method():
    guide = (DOCS / "samplers.md").read_text()
    missing = [m for m in sdegen.METHODS if f'`"{m}"`' not in guide]
    assert not missing, f"docs/samplers.md does not describe {missing}"


def test_site_builds_strictly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    html = (tmp_path / "site" / "theory" / "index.html").read_text()
    assert html.count('class="arithmatex"') > 50          # the mathematics is marked up for MathJax
