"""mkdocs hook: the site's scripts and styles come from pinned packages, not from a CDN.

The docs extra pins ``django-static-mathjax`` (a plain copy of MathJax's ``es5`` build; Django is
not needed to read it). This hook adds its single-file ``tex-svg-full.js`` to the site as
``javascripts/mathjax/tex-svg-full.js`` so the built site renders formulas with no network:
``tex-svg-full`` holds every TeX extension (nothing is fetched on demand) and draws glyphs as SVG
paths (no font files to load). It also writes ``css/pygments.css``, the style of the code
blocks that ``pymdownx.highlight`` colours at build time (the theme's own highlight.js would load
from a CDN, so it is switched off in mkdocs.yml).
"""

from pathlib import Path

from mkdocs.structure.files import File

SCRIPT = "tex-svg-full.js"
TARGET = f"javascripts/mathjax/{SCRIPT}"


def _source() -> Path:
    try:
        import mathjax  # the django-static-mathjax distribution
    except ImportError as exc:
        raise SystemExit("the docs need MathJax from the 'docs' extra: pip install -e '.[docs]' "
                         "(django-static-mathjax)") from exc
    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    for name in (SCRIPT, "../LICENSE"):
        if not (es5 / name).is_file():
            raise SystemExit(f"django-static-mathjax at {es5.parent} lacks {name}; reinstall the docs extra")
    return es5


def on_files(files, config):
    es5 = _source()
    files.append(File.generated(config, TARGET, abs_src_path=str(es5 / SCRIPT)))
    files.append(File.generated(config, "javascripts/mathjax/LICENSE", abs_src_path=str(es5.parent / "LICENSE")))
    files.append(File.generated(config, "css/pygments.css", content=_pygments_css()))
    return files


def _pygments_css() -> str:
    from pygments.formatters import HtmlFormatter

    return HtmlFormatter(style="default").get_style_defs(".highlight")
