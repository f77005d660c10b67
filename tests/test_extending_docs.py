"""docs/extending.md runs as printed: its ``python`` blocks execute in order in one namespace.

The blocks' own asserts are the claims (an SDE's closed-form marginal against the numerical one,
sampling against the oracle with standard-error tolerances stated in the page, a new prediction
row against the table's ``"eps"`` row and a pair with a known score).
"""

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def _blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def test_extending_page_has_runnable_examples():
    assert len(_blocks(PAGE.read_text())) >= 5


def test_extending_page_runs_as_printed():
    namespace = {"__name__": "extending_md"}
    for k, code in enumerate(_blocks(PAGE.read_text())):
        exec(compile(code, f"docs/extending.md (python block {k})", "exec"), namespace)
