"""The import graph follows STYLE.md: dependencies point one way.

Every ``import`` of an sdegen module (top level or inside a function) is an edge. The only allowed
back edge is ``VPSDE.discretize`` importing ``ddpm`` inside the method. Deliberate changes to
STYLE.md's table are marked below with the reason.
"""

import ast
from pathlib import Path

import sdegen

PKG = Path(sdegen.__file__).parent
FRONT_ENDS = {"cli", "bench", "demo", "plotting"}
COMMON = {"_utils", "typing"}
ALLOWED = {
    "_utils": set(),
    "typing": set(),
    "_rng": set(),
    "sdes": set(),
    "grids": {"sdes"},
    "oracle": {"sdes"},
    # ddpm -> sampling: DDPM.sample / ddim_sample are sdegen.sample on the chain's own SDE (one loop, issue 15).
    "ddpm": {"sdes", "gaussian", "vlb", "sampling"},
    # gaussian: closed forms (KL, log-densities) and the standard normal draw; vlb: the bounds built on them.
    "gaussian": set(),
    "vlb": {"sdes", "gaussian"},
    "parameterization": {"sdes"},
    "nn": set(),
    # training -> nn: `sdegen.load` rebuilds the network from its saved config, so training must
    # know the network classes (an explicit table, never import-by-string).
    "training": {"sdes", "parameterization", "ddpm", "nn"},
    "solvers": {"sdes", "grids"},
    # _sample_inputs: sample()'s checks and start states, split from sampling (issue 15: files under 600 lines).
    "sampling": {"solvers", "grids", "sdes", "_rng", "_sample_inputs"},
    "_sample_inputs": {"sdes", "solvers", "_rng"},
    "likelihood": {"solvers", "sdes"},
    "adapters": {"sdes", "ddpm", "parameterization", "x0_transforms"},
    # x0_transforms: data-prediction options (clip, dynamic thresholding) as score wrappers.
    "x0_transforms": {"sdes"},
    # diffusers_scheduler: sdegen's methods behind diffusers' scheduler protocol (runs sample() on an adapter).
    "diffusers_scheduler": {"adapters", "sampling"},
    "data": {"oracle"},
    "guidance": {"sdes"},
    "conditional": {"sampling", "solvers", "grids", "sdes"},
    "chunked": {"sampling", "solvers", "sdes", "_rng"},
    "distributed": {"sampling", "training", "parameterization", "solvers", "sdes", "_rng", "chunked"},
}
BACK_EDGES = {("sdes", "ddpm")}


def _group(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "sdegen"
    return parts[1] if len(parts) > 1 else "__init__"


def _edges():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        mod = ".".join(rel.parts)
        if mod.endswith(".__init__"):
            mod = mod[: -len(".__init__")]
            pkg = mod
        else:
            pkg = mod.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("sdegen")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                    if node.module is None:  # from . import x, y
                        targets = [f"{target}.{a.name}" for a in node.names]
                    else:
                        targets = [target]
                elif node.module and node.module.startswith("sdegen"):
                    targets = [node.module] if node.module != "sdegen" else [f"sdegen.{a.name}" for a in node.names]
            for tgt in targets:
                yield mod, tgt, path, node.lineno


def test_import_graph_points_one_way():
    bad = []
    for mod, tgt, path, line in _edges():
        src, dst = _group(mod), _group(tgt)
        if src == "__init__" or src == dst or dst in COMMON:
            continue
        if src in FRONT_ENDS:
            continue
        if dst in FRONT_ENDS:
            bad.append(f"{path.name}:{line}: {mod} imports front end {tgt}")
            continue
        if dst == "__init__":
            bad.append(f"{path.name}:{line}: {mod} imports the top-level package; import the defining module")
            continue
        if src not in ALLOWED:
            bad.append(f"{path.name}:{line}: module group {src!r} is not in the architecture table")
            continue
        if dst not in ALLOWED[src] and (src, dst) not in BACK_EDGES:
            bad.append(f"{path.name}:{line}: {mod} -> {tgt} is not an allowed edge ({src} -> {dst})")
    assert not bad, "\n".join(bad)


def test_graph_scanner_sees_edges():
    """The scanner itself finds known edges (so the test above cannot pass vacuously)."""
    edges = {(_group(m), _group(t)) for m, t, _, _ in _edges()}
    assert ("oracle", "sdes") in edges
    assert ("sdes", "ddpm") in edges
    assert ("sdes", "_utils") in edges


def test_optional_diffusers_is_imported_inside_functions_only():
    """``import sdegen`` (any module) never imports diffusers: only function bodies may (issue 17)."""
    bad = []
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:          # module level only; imports inside functions are lazy
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "diffusers" or n.startswith("diffusers.") for n in names):
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert not bad, f"module-level diffusers imports: {bad}"
