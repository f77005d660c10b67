r"""Sampler benchmark: accuracy against NFE and wall time, loop overhead, native solvers vs backends.

Written to ``samplers.json`` and ``samplers.png`` in ``out_dir``:

- **accuracy**: for every method on the exact-score ``8gaussians`` mixture (VP, sub-VP and VE), the
  sliced Wasserstein-2 distance to exact mixture draws at several step counts (tolerances for adaptive
  methods), against the NFE and the wall time, with the noise floor (exact vs exact, same sizes);
- **overhead**: sampler time / time of the same number of bare score calls, at batch 4096 with a fixed
  random MLP score (2 -> 3 x 256 SiLU -> 2, a stand-in for a network), and the per-step overhead in
  microseconds at batch 16, ``(sampler - bare) / steps``;
- **backends**: the native Euler–Maruyama against ``torchsde`` (Euler), and the torch RK45 against
  ``scipy.integrate.solve_ivp`` (RK45) at equal tolerance, timed side by side in one run.

Timings are medians over interleaved repeats (sampler and bare calls alternate, so drifts in machine
load hit both); ratios are the figures to compare, absolute times depend on the machine.
Run with ``sdegen bench samplers`` or ``python -m sdegen.bench.samplers OUT_DIR [--quick]``.
"""

from __future__ import annotations

import json
import math
import pathlib
import platform
import statistics
import sys
import time

import torch

from .. import SubVPSDE, VESDE, VPSDE, named_mixture
from ..sampling import METHODS, sample
from ._methods import adaptive_methods, loop_methods, steps_for_nfe
from ._metrics import sliced_wasserstein

__all__ = ["run", "ScoreMLP"]


class ScoreMLP(torch.nn.Module):
    """A fixed random MLP ``(x, t) -> x``-shaped output: the cost of a small score network."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        sizes = [dim + 1] + [hidden] * depth + [dim]
        self.layers = torch.nn.ModuleList()
        for a, b in zip(sizes[:-1], sizes[1:]):
            lin = torch.nn.Linear(a, b)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(b, a, generator=g) / math.sqrt(a))
                lin.bias.zero_()
            self.layers.append(lin)

    def forward(self, x, t):
        h = torch.cat([x, t[:, None].to(x.dtype)], dim=1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = torch.nn.functional.silu(h)
        # keep the flow bounded (a random net is no score); the cost is what matters here
        return -0.1 * x + 0.1 * torch.tanh(h)


def _median_pair(fa, fb, repeats: int) -> tuple[float, float]:
    """Interleaved timing of two callables; medians in seconds (after one warm-up each)."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def _bare_calls(score, x, t, n: int):
    def go():
        with torch.no_grad():
            for _ in range(n):
                score(x, t)
    return go


def _trivial_op_us(n: int = 5000) -> float:
    x = torch.randn(16, 2)
    x * 2
    t0 = time.perf_counter()
    for _ in range(n):
        x * 2
    return (time.perf_counter() - t0) / n * 1e6


#: Every method the one fixed-grid loop runs (rows of `METHODS` with a builder): the loop's overhead is
#: measured on each. ``torchsde`` takes steps too but is a backend: `backends` times it against EM.
FIXED = loop_methods()


def overhead(batch: int, steps: int, repeats: int, methods=FIXED) -> dict:
    """Sampler time over bare score time for the MLP score (VP SDE, float32)."""
    torch.manual_seed(0)
    net = ScoreMLP().eval()
    sde = VPSDE()
    x = torch.randn(batch, 2)
    t = torch.full((batch,), 0.5)
    out = {}
    for method in methods:
        nfe = sample(sde, net, (batch, 2), method=method, steps=steps,
                     generator=torch.Generator().manual_seed(0)).nfe

        def run_sampler(method=method):
            sample(sde, net, (batch, 2), method=method, steps=steps, generator=torch.Generator().manual_seed(0))

        ts, tb = _median_pair(run_sampler, _bare_calls(net, x, t, nfe), repeats)
        out[method] = {"nfe": nfe, "sampler_s": ts, "bare_s": tb, "ratio": ts / tb,
                       "overhead_us_per_step": (ts - tb) / steps * 1e6}
    return out


def backends(batch: int, steps: int, repeats: int, tol: float) -> dict:
    """Native EM vs torchsde Euler (same steps), torch RK45 vs scipy RK45 (same tolerance)."""
    net = ScoreMLP().eval()
    sde = VPSDE()
    res = {}

    def em():
        return sample(sde, net, (batch, 2), method="euler_maruyama", steps=steps,
                      generator=torch.Generator().manual_seed(0))

    def tsde():
        return sample(sde, net, (batch, 2), method="torchsde", steps=steps, generator=torch.Generator().manual_seed(0))

    try:
        a, b = _median_pair(em, tsde, repeats)
        # the same number of bare score calls, to compare what each loop adds on top of the network
        x, t = torch.randn(batch, 2), torch.full((batch,), 0.5)
        _, bare = _median_pair(lambda: None, _bare_calls(net, x, t, em().nfe), repeats)
        res["em_vs_torchsde"] = {"native_s": a, "torchsde_s": b, "bare_score_s": bare, "speedup": b / a,
                                 "overhead_ratio": (b - bare) / (a - bare) if a > bare else None,  # None: below timing noise
                                 "steps": steps, "batch": batch}
    except ImportError as e:  # optional dependency
        res["em_vs_torchsde"] = {"skipped": str(e)}

    gm = named_mixture("8gaussians", dtype=torch.float32)
    score = gm.score_fn(sde)

    def ode(method):
        return lambda: sample(sde, score, (batch, 2), method=method, rtol=tol, atol=tol,
                              generator=torch.Generator().manual_seed(0))

    a, b = _median_pair(ode("rk45"), ode("scipy"), repeats)
    nfe_a, nfe_b = ode("rk45")().nfe, ode("scipy")().nfe
    res["rk45_vs_scipy"] = {"rk45_s": a, "scipy_s": b, "speedup": b / a, "rk45_nfe": nfe_a, "scipy_nfe": nfe_b,
                            "tol": tol, "batch": batch}
    return res


#: Hand-picked step counts (tolerances for adaptive methods) of the accuracy sweep; every other row of
#: `METHODS` gets the defaults of `accuracy_knobs`.
ACCURACY = {
    "euler_maruyama": [25, 50, 100, 200, 400],
    "reverse_diffusion": [25, 50, 100, 200, 400],
    "ancestral": [25, 50, 100, 200, 400],
    "pc": [25, 50, 100, 200],
    "ode_euler": [25, 50, 100, 200, 400],
    "ode_heun": [10, 20, 40, 80, 160],
    "rk45": [1e-2, 1e-3, 1e-4, 1e-5],
}
_ACC_OPTS = {"pc": {"corrector": "annealed_langevin", "snr": 0.1}}
#: The NFE the derived step counts aim at, and the tolerances of adaptive ODE and SDE methods.
_ACC_NFE = (25, 50, 100, 200, 400)
_ACC_TOL_ODE = [1e-2, 1e-3, 1e-4, 1e-5]
# An adaptive SDE solver's error falls as tol^(1/2) or slower: below 1e-2 its step counts explode.
_ACC_TOL_SDE = [1e-1, 3e-2, 1e-2]


def accuracy_knobs() -> dict[str, list]:
    """Step counts or tolerances for every row of `METHODS`: `ACCURACY` where chosen by hand, else steps
    spending about 25-400 evaluations (measured per method, `sdegen.bench._methods.steps_for_nfe`) or
    the adaptive tolerances."""
    knobs = {}
    for method, spec in METHODS.items():
        if method in ACCURACY:
            knobs[method] = ACCURACY[method]
        elif spec.fixed_grid:
            knobs[method] = sorted({steps_for_nfe(method, n) for n in _ACC_NFE})
        else:
            knobs[method] = _ACC_TOL_SDE if method in adaptive_methods(reverse_sde=True) else _ACC_TOL_ODE
    return knobs


def accuracy(n: int, quick: bool) -> dict:
    """Sliced W2 to exact draws against NFE and time, per SDE and method, with the noise floor."""
    gm = named_mixture("8gaussians")
    ref = gm.sample(n, generator=torch.Generator().manual_seed(1))
    floor = sliced_wasserstein(gm.sample(n, generator=torch.Generator().manual_seed(2)), ref)
    out = {"n": n, "mixture": "8gaussians", "noise_floor": floor, "sdes": {}}
    sdes = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_max=10.0)}
    for name, sde in sdes.items():
        per = {}
        for method, grid in accuracy_knobs().items():
            grid = grid[::2] if quick else grid
            rows = []
            for k in grid:
                if method == "ancestral" and isinstance(sde, VPSDE) and k <= sde.beta_max * sde.T:
                    continue  # the DDPM chain needs every beta_i < 1
                kw = {"rtol": k, "atol": k} if not METHODS[method].fixed_grid else {"steps": k}
                t0 = time.perf_counter()
                try:
                    r = sample(sde, gm.score_fn(sde), (n, 2), method=method,
                               generator=torch.Generator().manual_seed(3), **kw, **_ACC_OPTS.get(method, {}))
                except Exception as e:  # noqa: BLE001 - one failing method must not sink the sweep; reported
                    rows.append({"param": k, "error": repr(e)})
                    continue
                wall = time.perf_counter() - t0
                rows.append({"param": k, "nfe": r.nfe, "time_s": wall, "sw2": sliced_wasserstein(r.samples, ref)})
            per[method] = rows
        out["sdes"][name] = per
    return out


def _plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import log_ticks

    acc = result["accuracy"]
    sdes = list(acc["sdes"])
    fig, axes = plt.subplots(2, len(sdes) + 1, figsize=(5 * (len(sdes) + 1), 8))
    for j, name in enumerate(sdes):
        for row, key, label in [(0, "nfe", "NFE"), (1, "time_s", "wall time (s)")]:
            ax = axes[row, j]
            for i, (method, rows) in enumerate(acc["sdes"][name].items()):
                rows = [r for r in rows if "error" not in r]
                if rows:
                    # more methods than a colour cycle: 20 colours, then dashed lines
                    ax.loglog([r[key] for r in rows], [r["sw2"] for r in rows], "o-" if i < 20 else "o--",
                              color=plt.cm.tab20(i % 20), label=method, ms=3)
            ax.axhline(acc["noise_floor"], color="k", ls=":", label="noise floor")
            ax.set_xlabel(label)
            ax.set_ylabel("sliced W2 to exact")
            ax.set_title(f"{name}, {acc['mixture']}, n={acc['n']}")
            log_ticks(ax)  # no overlapping minor-tick labels on short log ranges
    axes[0, 0].legend(fontsize=6, ncol=2)
    bars = [("overhead_4096", "ratio", 1.05, "sampler / bare score time (batch 4096)"),
            ("overhead_16", "overhead_us_per_step", 30, "overhead per step at batch 16 (us)")]
    for row, (part, key, target, ylabel) in enumerate(bars):
        ax, ov = axes[row, -1], result[part]
        ax.bar(list(ov), [v[key] for v in ov.values()])
        ax.axhline(target, color="r", ls="--", label=f"target {target}")
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", rotation=90, labelsize=7)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir: pathlib.Path, quick: bool = False, threads: int | None = 1) -> dict:
    """Run the sampler benchmark, write ``samplers.json`` and ``samplers.png``; return the results.

    ``threads``: torch intra-op threads during the run (restored after); 1 by default because on a
    shared machine a parallel kernel waits for a busy core's time slice, which swamps small kernels.
    ``None`` keeps the current setting.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(pathlib.Path(out_dir), quick)
    finally:
        torch.set_num_threads(previous)


def _run(out_dir: pathlib.Path, quick: bool) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    reps = 3 if quick else 7
    result = {
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "threads": torch.get_num_threads()},
        # One trivial kernel's time (x * 2 at batch 16): divides out machine load when comparing runs.
        "trivial_op_us": _trivial_op_us(),
        "overhead_4096": overhead(4096, 25 if quick else 100, reps),
        "overhead_16": overhead(16, 100 if quick else 500, reps),
        "backends_16": backends(16, 100 if quick else 500, reps, 1e-4),
        "backends_4096": backends(4096, 25 if quick else 100, reps, 1e-4),
        "accuracy": accuracy(1000 if quick else 4000, quick),
    }
    (out_dir / "samplers.json").write_text(json.dumps(result, indent=2))
    _plot(result, out_dir / "samplers.png")
    return result


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    res = run(pathlib.Path(args[0] if args else "bench_results"), quick="--quick" in sys.argv)
    print(json.dumps({k: v for k, v in res.items() if k != "accuracy"}, indent=1))
