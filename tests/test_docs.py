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


# A Sphinx role such as :class:`X` is not Markdown: mkdocstrings prints it literally. Write
# [`X`][sdegen.module.X] (resolved by autorefs) or plain `X` instead.
SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|data|mod|attr|obj|exc|const|ref|math):`")
# After Markdown, a role's backticks have become <code>; catch both spellings in the built HTML.
SPHINX_ROLE_HTML = re.compile(r":(?:py:)?(?:class|func|meth|data|mod|attr|obj|exc|const|ref|math):(?:`|<code>)")


def test_no_sphinx_roles_in_docstrings():
    hits = []
    for path in sorted((ROOT / "sdegen").rglob("*.py")):
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if SPHINX_ROLE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not hits, "Sphinx roles render literally; use [`X`][sdegen.path.X]:\n" + "\n".join(hits)


def test_docstring_entries_document_one_parameter_each():
    """An Args/Attributes entry whose text runs on into another parameter ("x: (B, *D). t: (B,). dt: ...")
    renders as one merged item; griffe cannot see it, so look for another parameter's ``name:`` inside."""
    import logging

    import griffe

    logging.getLogger("griffe").setLevel(logging.ERROR)   # the strict build reports griffe's own warnings
    pkg = griffe.load("sdegen", search_paths=[str(ROOT)], docstring_parser="google", resolve_aliases=False)
    inner = re.compile(r"(?:^|[.;,]\s+|\n)\s*\**([A-Za-z_]\w*)\s*(?:\([^)]*\))?:\s")
    hits = []

    def check(obj):
        target = obj.members.get("__init__", obj) if obj.is_class else obj
        names = {p.name for p in getattr(target, "parameters", [])} if not target.is_alias else set()
        if obj.is_class:
            names |= {n for n, m in obj.members.items() if not m.is_alias and m.is_attribute}
        for section in obj.docstring.parse("google", warn_unknown_params=False):
            if section.kind.value not in ("parameters", "attributes", "other parameters"):
                continue
            for entry in section.value:
                for other in inner.findall(entry.description or ""):
                    if other in names and other != entry.name:
                        hits.append(f"{obj.relative_filepath}:{obj.lineno} {obj.path}: '{entry.name}' runs into '{other}:'")

    def walk(obj):
        for member in obj.members.values():
            if member.is_alias:
                continue
            if (member.is_function or member.is_class) and member.docstring:
                check(member)
            if member.is_module or member.is_class:
                walk(member)

    walk(pkg)
    assert not hits, "one parameter per entry:\n" + "\n".join(sorted(set(hits)))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the site once, strictly and without -q, so every warning reaches stderr."""
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, out


def test_site_builds_strictly(site):
    proc, out = site
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert not warnings, "\n".join(warnings[:50])
    html = (out / "theory" / "index.html").read_text()
    assert html.count('class="arithmatex"') > 50          # the mathematics is marked up for MathJax


def test_site_has_no_literal_sphinx_roles(site):
    _, out = site
    hits = [f"{page.relative_to(out)}: ...{m.string[max(m.start() - 60, 0):m.end() + 60]}..."
            for page in sorted(out.rglob("*.html")) for m in SPHINX_ROLE_HTML.finditer(page.read_text())]
    assert not hits, "\n".join(hits[:20])


def test_site_loads_nothing_from_the_network(site):
    """Formulas and code must render offline: every script and stylesheet is served by the site."""
    _, out = site
    external = re.compile(r"<(?:script|img)\b[^>]*\bsrc=[\"']?(?:https?:)?//|"
                          r"<link\b[^>]*\brel=[\"']?stylesheet[^>]*\bhref=[\"']?(?:https?:)?//|"
                          r"<link\b[^>]*\bhref=[\"']?(?:https?:)?//[^>]*\brel=[\"']?stylesheet", re.I)
    hits = [f"{page.relative_to(out)}: {m.group(0)}" for page in sorted(out.rglob("*.html"))
            for m in external.finditer(page.read_text())]
    assert not hits, "\n".join(sorted(set(hits))[:20])
    theory = (out / "theory" / "index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*\bsrc=\"([^\"]+)\"", theory)
    mathjax = [s for s in scripts if s.endswith("mathjax/tex-svg-full.js")]
    assert mathjax, f"the theory page loads no MathJax; its scripts: {scripts}"
    assert (out / "theory" / mathjax[0]).resolve().stat().st_size > 1_000_000   # the whole renderer
