"""Rewrite Sphinx roles (:class:`X`, :func:`X`, ...) in sdegen/ docstrings as mkdocstrings links.

Usage: .venv/bin/python -m mkdocs build -d /tmp/site   (warnings are fine here)
       .venv/bin/python scripts/convert_roles.py /tmp/site/objects.inv [--dry-run]

The inventory lists the identifiers the site renders (a built site's objects.inv, or a text file
with one identifier per line). tests/test_docs.py fails on any role left in sdegen/. A role whose target resolves to a rendered identifier becomes
[`X`][full.path]; any other becomes `X` in backticks, so the strict build never meets a dangling
cross-reference. Only the role syntax is touched; each file is read, rewritten and written in one
quick step because other people edit the same tree.
"""

import ast
import importlib
import inspect
import re
import sys
import zlib
from pathlib import Path

ROLE = re.compile(r":(?:py:)?(class|func|meth|data|mod|attr|obj|exc|const):`(~?)([^`\n]+?)(?:\(\))?`")
ROOT = Path(__file__).resolve().parent.parent


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _class_spans(source):
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [(n.lineno, n.end_lineno, n.name) for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]


def _lookup(path):
    """The Python object named by a dotted path, or None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                # Modules may load names lazily (module __getattr__); classes are read statically
                # so properties and classmethods give their own objects, not computed values.
                obj = getattr(obj, attr) if inspect.ismodule(obj) else inspect.getattr_static(obj, attr)
        except AttributeError:
            return None
        return getattr(obj, "__func__", obj)   # classmethod/staticmethod: the function
    return None


def _by_object(inventory):
    """Rendered identifiers grouped by the object they name (aliases share one object)."""
    table = {}
    for name in sorted(inventory, key=lambda n: (n.count("."), n)):
        obj = _lookup(name)
        if obj is not None and not isinstance(obj, (int, float, str, tuple, bool)):
            table.setdefault(id(obj), []).append(name)
    return table


def _resolve(target, module, cls, inventory, table):
    candidates = []
    if cls:
        candidates.append(f"{module}.{cls}.{target}")
    candidates += [f"{module}.{target}", f"sdegen.{target}", target]
    for c in candidates:
        if c in inventory:
            return c
        obj = _lookup(c) if c.startswith("sdegen") else None
        if obj is not None and id(obj) in table:
            return table[id(obj)][0]
    return None


def convert(path, inventory, table):
    source = path.read_text()
    if not ROLE.search(source):
        return 0
    module = _module_name(path)
    spans = _class_spans(source)
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))

    def lineno(pos):
        lo, hi = 0, len(line_starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if line_starts[mid] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1

    def repl(m):
        _, tilde, target = m.groups()
        ln = lineno(m.start())
        inside = [s for s in spans if s[0] <= ln <= s[1]]
        cls = max(inside, key=lambda s: s[0])[2] if inside else None
        shown = target.rsplit(".", 1)[-1] if tilde else target
        full = _resolve(target, module, cls, inventory, table)
        return f"[`{shown}`][{full}]" if full else f"`{shown}`"

    new, n = ROLE.subn(repl, source)
    if n and "--dry-run" not in sys.argv:
        path.write_text(new)
    return n


def main():
    source = Path(sys.argv[1])
    if source.name == "objects.inv":   # Sphinx inventory v2: four header lines, then zlib data
        body = zlib.decompress(source.read_bytes().split(b"\n", 4)[4]).decode()
        inventory = {line.split(" ", 1)[0] for line in body.splitlines() if line.strip()}
    else:
        inventory = set(source.read_text().split())
    table = _by_object(inventory)
    total = 0
    for path in sorted((ROOT / "sdegen").rglob("*.py")):
        n = convert(path, inventory, table)
        if n:
            print(f"{path.relative_to(ROOT)}: {n}")
        total += n
    print(f"total: {total}")


if __name__ == "__main__":
    main()
