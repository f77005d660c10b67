r"""Solver benchmark against exact ground truth (issue 8): ``sdegen bench solvers``.

For each oracle problem (a [`sdegen.named_mixture`][sdegen.named_mixture] under VP, sub-VP or VE, exact score) and each
method over a range of NFE, it measures

(a) the sliced Wasserstein-2 and energy distances of the samples to exact data samples, with the
    exact-vs-exact noise floor of the same sample size;
(b) for probability-flow ODE methods, the mean error $\|x - x^\star\|$ at ``eps`` against the exact flow
    from the same $x_T$ (reference: ``rk45`` at rtol = atol = 1e-9 in float64, or DPM-Solver-3 on 2000
    log-SNR steps where ``rk45`` is unavailable);
(c) wall time, and the overhead of each native solver over bare score calls (an MLP-sized score at
    batch 4096 in 2-D on CPU): time(sampler) / time(the same number of score calls);

plus the variance-error table on $\mathcal N(0.5, 0.5^2)$ 2-D data under VP(0.1, 20) (the DDPM linear
schedule), computed exactly for the ODE methods (their maps are affine for Gaussian data).
plus (issue 16) a best-of comparison against diffusers' deterministic schedulers (`sdegen.bench.best_of`):
per problem and NFE, the best sdegen configuration (method, order, variant and grid) against the best
peer configuration (scheduler, order, variant and spacing; `sdegen.bench.peers`), picked on one seed
and re-measured on a held-out one, and on the Gaussian variance problem.
Writes ``solvers.json``, ``summary.md``, ``best.md`` and ``bench_solvers_*.png`` into ``out_dir``; see
`run` for what goes into ``docs/``.
"""

from __future__ import annotations

import functools
import json
import pathlib
import shutil
import time

import torch

import sdegen

from ._methods import adaptive_methods, fixed_step_methods, native_methods, steps_for_nfe
from ._metrics import energy_distance, sliced_wasserstein
from ._problems import EPS, F64, _reference, _sde
from .best_of import _best_plot, _gaussian_sweep, _peer_version, _traj_sweep, best_lines, best_table, verdict

__all__ = ["run", "best_table", "best_lines", "verdict"]   # the best-of helpers live in sdegen.bench.best_of

# method label -> (sdegen.sample method, options, NFE -> steps (None: adaptive), kind)
_ODE = "ode"
_SDE = "sde"


def _methods(quick: bool) -> dict:
    m = {
        "ode_euler": ("ode_euler", {}, lambda n: n, _ODE),
        "ode_heun": ("ode_heun", {}, lambda n: max(1, n // 2), _ODE),
        "ode_heun (quadratic)": ("ode_heun", {"grid": "quadratic"}, lambda n: max(1, n // 2), _ODE),
        "ode_euler (quadratic)": ("ode_euler", {"grid": "quadratic"}, lambda n: n, _ODE),
        "heun_karras": ("heun_karras", {}, lambda n: (n + 1) // 2, _ODE),
        "dpm_solver-2": ("dpm_solver", {"order": 2}, lambda n: n, _ODE),
        "dpm_solver-3": ("dpm_solver", {}, lambda n: n, _ODE),
        "ddim (dpm-1, uniform t)": ("dpm_solver", {"order": 1, "grid": "uniform"}, lambda n: n, _ODE),
        "dpm_solver-2 midpoint": ("dpm_solver", {"order": 2, "solver_type": "midpoint"}, lambda n: n, _ODE),
        "unipc-2": ("unipc", {}, lambda n: n, _ODE),
        "unipc-3": ("unipc", {"order": 3}, lambda n: n, _ODE),
        "deis-3": ("deis", {}, lambda n: n, _ODE),
        "plms (pndm, heun start)": ("pndm", {"warmup": "heun"}, lambda n: max(1, n - 1), _ODE),
        "ipndm": ("ipndm", {}, lambda n: n, _ODE),
        "lms-4": ("lms", {}, lambda n: n, _ODE),
        "ddpm_ancestral": ("ancestral", {}, lambda n: n, _SDE),
        "euler_maruyama": ("euler_maruyama", {}, lambda n: n - 1, _SDE),
        # NFE n: reverse-SDE methods spend one evaluation on the final denoising step.
        "sde_dpm_solver-2m (eta 1)": ("sde_dpm_solver", {}, lambda n: max(1, n - 1), _SDE),
        "sde_dpm_solver-3m (eta 1)": ("sde_dpm_solver", {"order": 3}, lambda n: max(1, n - 1), _SDE),
        "euler_ancestral": ("euler_ancestral", {}, lambda n: max(1, n - 1), _SDE),
        "dpm2": ("dpm2", {}, lambda n: max(1, n // 2), _ODE),
        "dpm2_ancestral": ("dpm2_ancestral", {}, lambda n: max(1, (n - 1) // 2), _SDE),
        # 2 restarts of 3 Heun steps cost 12 evaluations; the main grid gets the rest.
        "restart": ("restart", {}, lambda n: max(1, n // 2 - 7), _ODE),
        "sa_solver (2, 2; tau 1)": ("sa_solver", {}, lambda n: max(1, n - 1), _SDE),
        "dpm_solver_singlestep-3": ("dpm_solver_singlestep", {}, lambda n: n, _ODE),
        "dpm_fast": ("dpm_fast", {}, lambda n: n, _ODE),
    }
    # Every other row of sdegen.METHODS that takes steps, at its default options, so a new method is
    # benchmarked without an entry here: steps for an NFE measured from the method itself.
    covered = {method for method, *_ in m.values()}
    for method in fixed_step_methods():
        if method not in covered:
            m[method] = (method, {}, functools.partial(steps_for_nfe, method),
                         _SDE if sdegen.METHODS[method].reverse_sde else _ODE)
    return m


def _tol_methods(quick: bool) -> dict:
    """Every adaptive row of sdegen.METHODS (label = method) with its tolerances: the ODE integrators on
    one list, the adaptive SDE solvers on a coarser one (their error falls as tol^(1/2) or slower)."""
    tols = [1e-2, 1e-3] if quick else [1e-1, 1e-2, 1e-3, 1e-4]
    sde_tols = [0.1] if quick else [0.1, 0.03, 1e-2]
    return {**{m: (m, tols, _ODE) for m in adaptive_methods(reverse_sde=False)},
            **{m: (m, sde_tols, _SDE) for m in adaptive_methods(reverse_sde=True)}}


def _run_one(sde, sf, x_T, method, opts, steps, seed):
    t0 = time.perf_counter()
    res = sdegen.sample(sde, sf, None, x_T=x_T, method=method, steps=steps,
                        generator=torch.Generator().manual_seed(seed), **opts)
    return res, time.perf_counter() - t0


def _problem(sde_name, mix, n, nfes, quick, n_traj=256):
    sde, gm = _sde(sde_name), sdegen.named_mixture(mix)
    sf = gm.score_fn(sde)
    x_T = sde.prior_sample((n, gm.dim), generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = gm.sample(n, generator=torch.Generator().manual_seed(1))
    # The floor is the mean distance from the same exact set to 4 independent exact sets: one pair alone
    # scatters by ~10-20 % at n = 2000, which made good samplers look "below the floor".
    others = [gm.sample(n, generator=torch.Generator().manual_seed(k)) for k in (2, 3, 4, 5)]
    sws = [sliced_wasserstein(exact, o) for o in others]
    floor = {"sw": sum(sws) / len(sws), "sw_min": min(sws), "sw_max": max(sws),
             "energy": sum(energy_distance(exact, o) for o in others) / len(others)}
    ref, ref_name = _reference(sde, sf, x_T[:n_traj])
    rows = []

    def record(label, kind, res, wall, knob):
        row = {"method": label, "kind": kind, "nfe": res.nfe, "knob": knob, "wall_s": wall,
               "sw": sliced_wasserstein(res.samples, exact), "energy": energy_distance(res.samples, exact)}
        if kind == _ODE:
            row["traj_err"] = float((res.samples[:n_traj] - ref).norm(dim=1).mean())
        rows.append(row)

    for label, (method, opts, to_steps, kind) in _methods(quick).items():
        if method == "ancestral" and sde_name != "vp":
            continue
        for nfe in nfes:
            if method == "ancestral" and nfe <= 20:
                # the DDPM chain of VPSDE(0.1, 20) needs more than beta_max * T = 20 steps (every beta_i < 1)
                continue
            try:
                res, wall = _run_one(sde, sf, x_T, method, opts, to_steps(nfe), 3)
            except Exception as e:  # noqa: BLE001 - a missing method or invalid NFE must not sink the run
                rows.append({"method": label, "nfe_asked": nfe, "error": repr(e)})
                continue
            record(label, kind, res, wall, {"steps": to_steps(nfe)})
    from . import peers

    if peers.available():
        # diffusers' schedulers on the same problem, exact score and x_T (see sdegen.bench.peers)
        for label in peers.PEERS:
            for nfe in nfes:
                try:
                    t0 = time.perf_counter()
                    y, used, _ = peers.run_peer(label, sde, sf, x_T, nfe, EPS)
                    res = sdegen.solvers.SampleResult(samples=y, nfe=used)
                except Exception as e:  # noqa: BLE001 - a peer failing must not sink the run
                    rows.append({"method": label, "nfe_asked": nfe, "error": repr(e)})
                    continue
                record(label, _ODE, res, time.perf_counter() - t0, {"steps": nfe})
    for label, (method, tols, kind) in _tol_methods(quick).items():
        for tol in tols:
            try:
                res, wall = _run_one(sde, sf, x_T, method, {"rtol": tol, "atol": tol}, None, 3)
            except Exception as e:  # noqa: BLE001
                rows.append({"method": label, "error": repr(e)})
                break
            record(label, kind, res, wall, {"tol": tol})
    return {"sde": sde_name, "mixture": mix, "n": n, "floor": floor, "reference": ref_name, "rows": rows}


def _cached_problem(out_dir: pathlib.Path, sde_name, mix, n, nfes, quick):
    r"""`_problem`, kept in ``out_dir/problems/`` so that an interrupted run resumes where it stopped
    (a rerun with the same ``n``, ``nfes`` and ``quick`` reuses finished problems)."""
    path = out_dir / "problems" / f"{sde_name}_{mix}_n{n}_nfe{'-'.join(map(str, nfes))}{'_quick' if quick else ''}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    prob = _problem(sde_name, mix, n, nfes, quick)
    prob["wall_s"] = time.perf_counter() - t0
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(prob, indent=1, default=str))
    print(f"solvers bench: {sde_name}/{mix} done in {prob['wall_s']:.0f} s", flush=True)
    return prob


def _variance_table(nfes):
    r"""Relative variance error on N(0.5, 0.5^2) 2-D, VP(0.1, 20): exact for ODE methods (affine maps)."""
    sde, gm = sdegen.VPSDE(0.1, 20.0), sdegen.named_mixture("gaussian")
    sf = gm.score_fn(sde)
    m, s = sde.marginal(torch.tensor([EPS], dtype=F64))
    target = float(m.square() * 0.25 + s.square())
    x_T = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
    table = {}
    for label, (method, opts, to_steps, kind) in _methods(False).items():
        if kind != _ODE:
            continue
        for nfe in nfes:
            res = sdegen.sample(sde, sf, None, x_T=x_T, method=method, steps=to_steps(nfe), **opts)
            a = res.samples[1] - res.samples[0]
            table.setdefault(label, []).append({"nfe": res.nfe, "var_err": float(a.square().mean() / target - 1)})
    for label in adaptive_methods(reverse_sde=False):
        for tol in (1e-2, 1e-3):
            try:
                res = sdegen.sample(sde, sf, None, x_T=x_T, method=label, rtol=tol, atol=tol)
            except Exception:  # noqa: BLE001
                break
            a = res.samples[1] - res.samples[0]
            table.setdefault(label, []).append({"nfe": res.nfe, "tol": tol,
                                                "var_err": float(a.square().mean() / target - 1)})
    return table


# Options of the overhead runs chosen by hand; `_overhead_options` gives every other row its default.
_OVERHEAD_OPTIONS = {"pndm": {"warmup": "heun"}, "ancestral": {"steps": 40},
                     "pc": {"denoise": False, "corrector": "annealed_langevin"}}


def _overhead_options(method: str) -> dict:
    """``method``'s options in the overhead table: `_OVERHEAD_OPTIONS`, else no final denoising step for
    reverse-SDE methods (it is not the solver's cost) and rtol = atol = 1e-3 (ODE) or 0.05 (SDE) for
    adaptive ones (``steps=None``)."""
    if method in _OVERHEAD_OPTIONS:
        return _OVERHEAD_OPTIONS[method]
    spec = sdegen.METHODS[method]
    opts = {"denoise": False} if spec.reverse_sde else {}
    if not spec.fixed_grid:
        tol = 0.05 if spec.reverse_sde else 1e-3
        opts.update(rtol=tol, atol=tol, steps=None)
    return opts


def _overhead(batch: int, nfe_steps: int = 20, repeats: int = 7) -> dict:
    r"""time(sampler) / time(bare score calls) with an MLP-sized score (2-256-256-2, SiLU) at ``batch``, for
    every native solver (fixed-grid ones at ``nfe_steps`` steps, ancestral at 40 -- the DDPM chain of
    VPSDE(0.1, 20) needs more than 20 --, rk45 at rtol = 1e-3, adaptive_sde at 0.05)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256), torch.nn.SiLU(),
                              torch.nn.Linear(256, 2))

    def score(x, t):
        return net(torch.cat([x, t[:, None]], 1))

    inside = [0.0]

    def timed_score(x, t):
        t0 = time.perf_counter()
        out = score(x, t)
        inside[0] += time.perf_counter() - t0
        return out

    sde = sdegen.VPSDE()
    x_T = sde.prior_sample((batch, 2), generator=torch.Generator().manual_seed(0))
    out = {}
    # Every native solver (sdegen.METHODS rows in torch, not the library adapters): fixed-grid ones at
    # `nfe_steps` steps, adaptive ones at a tolerance, reverse-SDE ones without the final denoising step.
    cases = {m: _overhead_options(m) for m in native_methods()}
    with torch.no_grad():
        for method, opts in cases.items():
            opts = dict(opts)
            steps = opts.pop("steps", nfe_steps)
            # Sampler and bare calls alternate; the ratio of the two best times (of `repeats`) is the
            # least noisy estimate on a shared machine (timing noise only ever adds time).
            # `over_in_score`: the sampler's time over the time spent inside its own score calls, from the same
            # run -- the solver's own share, insensitive to the machine's load drifting between runs.
            t_s = t_b = t_in = float("inf")
            t = torch.full((batch,), 0.5)
            for _ in range(repeats):
                inside[0] = 0.0
                t0 = time.perf_counter()
                res = sdegen.sample(sde, timed_score, None, x_T=x_T, method=method, steps=steps,
                                    generator=torch.Generator().manual_seed(1), **opts)
                t_s = min(t_s, time.perf_counter() - t0)
                t_in = min(t_in, inside[0])
                t0 = time.perf_counter()
                for _ in range(res.nfe):
                    score(x_T, t)
                t_b = min(t_b, time.perf_counter() - t0)
            out[method] = {"nfe": res.nfe, "overhead": t_s / t_b, "over_in_score": t_s / t_in}
    return out


def _plots(result, out_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for prob in result["problems"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax in axes:  # more methods than the default 10-colour cycle: no two curves share a colour
            ax.set_prop_cycle(color=plt.cm.tab20.colors)
        by = {}
        for r in prob["rows"]:
            if "error" not in r:
                by.setdefault(r["method"], []).append(r)
        for label, rs in by.items():
            rs = sorted(rs, key=lambda r: r["nfe"])
            axes[0].plot([r["nfe"] for r in rs], [r["sw"] for r in rs], "o-", label=label, ms=3)
            if "traj_err" in rs[0]:
                axes[1].plot([r["nfe"] for r in rs], [r["traj_err"] for r in rs], "o-", label=label, ms=3)
        fl = prob["floor"]
        axes[0].axhline(fl["sw"], color="k", ls="--", lw=1, label="exact vs exact (mean of 4)")
        if "sw_min" in fl:
            axes[0].axhspan(fl["sw_min"], fl["sw_max"], color="0.85", zorder=0, label="exact vs exact range")
        axes[0].set(xscale="log", yscale="log", xlabel="NFE", ylabel="sliced W2 to exact samples",
                    title=f"{prob['mixture']} / {prob['sde']} (n={prob['n']})")
        axes[1].set(xscale="log", yscale="log", xlabel="NFE", ylabel="mean |x - x*| at eps",
                    title=f"ODE error vs exact flow ({prob['reference']})")
        axes[0].legend(fontsize=6, ncol=2)
        axes[1].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        p = out_dir / f"bench_solvers_{prob['sde']}_{prob['mixture']}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rs in result["variance"].items():
        ax.plot([r["nfe"] for r in rs], [100 * abs(r["var_err"]) for r in rs], "o-", label=label, ms=3)
    ax.axhline(2, color="k", ls=":", lw=1)
    ax.axhline(1, color="k", ls="--", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="|variance error| %",
           title="N(0.5, 0.5^2), VP(0.1, 20)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    p = out_dir / "bench_solvers_variance.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def _overhead_of(label: str) -> str:
    """The method a benchmark label runs (timed in the overhead table); ``""`` for a peer's label."""
    rows = {**_methods(False), **_tol_methods(False)}
    return rows[label][0] if label in rows else ""


def _row_line(r, floor, overhead) -> str:
    if "error" in r:
        return f"| {r['method']} | failed: {r['error'][:60]} | | | | |"
    te = f"{r['traj_err']:.2e}" if "traj_err" in r else "-"
    knob = f" (tol {r['knob']['tol']:g})" if "tol" in r.get("knob", {}) else ""
    ov = overhead.get(_overhead_of(r["method"]))
    ov = f"{ov['overhead']:.2f}" if ov else "-"
    return (f"| {r['method']}{knob} | {r['nfe']} | {r['sw']:.4f} | {r['sw'] / floor:.2f} | {te} | {ov} |")


def _order_ratios(result) -> list[str]:
    """Trajectory-error ratios at equal NFE: Euler (default uniform grid) over the best Heun, and the best
    Heun over the best DPM-Solver (issue 8's 5x targets), per problem and NFE."""
    heuns = ("ode_heun", "ode_heun (quadratic)", "heun_karras")
    dpms = ("dpm_solver-2", "dpm_solver-3")
    lines = ["## Order ratios at equal NFE (ODE trajectory error)", "",
             "Euler / Heun: `ode_euler` (uniform grid) over the best of " + ", ".join(f"`{h}`" for h in heuns)
             + "; Heun / DPM: that Heun over the best of `dpm_solver` orders 2 and 3. Heun's NFE is "
             "the even number at or below the Euler NFE (heun_karras: 2N - 1).", "",
             "| problem | NFE | Euler | best Heun | Euler / Heun | best DPM | Heun / DPM |", "|---|---|---|---|---|---|---|"]
    for prob in result["problems"]:
        rows = [r for r in prob["rows"] if "traj_err" in r]
        for nfe in sorted({r["nfe"] for r in rows if r["method"] == "ode_euler"}):
            def best(labels):
                cands = [r for r in rows if r["method"] in labels and nfe - 1 <= r["nfe"] <= nfe]
                return min(cands, key=lambda r: r["traj_err"]) if cands else None
            e, h, d = best(("ode_euler",)), best(heuns), best(dpms)
            if not (e and h and d):
                continue
            lines.append(f"| {prob['mixture']} / {prob['sde']} | {nfe} | {e['traj_err']:.2e} | {h['method']} "
                         f"{h['traj_err']:.2e} | {e['traj_err'] / h['traj_err']:.1f} | {d['method']} {d['traj_err']:.2e} | "
                         f"{h['traj_err'] / d['traj_err']:.1f} |")
    return lines + [""]


def _summary(result) -> str:
    cfg = result.get("config", {})
    # problems reused from an interrupted run carry their own wall time
    total = result.get("wall_s", 0) + sum(pr.get("wall_s", 0) for pr in result["problems"])
    head = "| method | NFE | sliced W2 | / noise floor | ODE traj. error | overhead |"
    rule = "|---|---|---|---|---|---|"
    lines = ["# Solver benchmark (exact oracle scores)", "",
             f"Run: {len(cfg.get('problems', []))} problems, NFE {cfg.get('nfes')}, n = {cfg.get('n')} samples, "
             f"{cfg.get('threads')} thread(s), {total:.0f} s. Sliced W2 is to exact data samples; "
             "'/ noise floor' divides by the sliced W2 between two independent exact sample sets of the same size "
             "(1 = indistinguishable). ODE trajectory error: mean |x - x*| at eps against the exact probability-flow "
             "solution from the same x_T. Overhead: time(sampler) / time(the same number of bare score calls) with an "
             "MLP score (2-256-256-2) on CPU, batch 4096, at 20 steps (ratio of the best of 7 alternated timings; "
             "values below 1 show the timing noise).", ""]
    ran = {tuple(pr) for pr in cfg.get("problems", [])}
    omitted = [f"{sd}/{mx}" for sd, mx in _PROBLEMS if (sd, mx) not in ran]
    if omitted and not cfg.get("quick"):
        lines += [f"Reduced run: the default problems {', '.join(omitted)} were left out (time on a shared "
                  "machine); rerun with `--problems` to add them.", ""]
    ov = result.get("overhead", {})
    first = result["problems"][0]
    conv = [r for r in first["rows"] if r.get("method") == "rk45" and "sw" in r]
    lines += [f"## Headline: {first['mixture']} / {first['sde']}, NFE <= 20 (tolerance methods at 1e-3)", "",
              head, rule]
    lines += [_row_line(r, first["floor"]["sw"], ov) for r in first["rows"]
              if "error" not in r and (r["knob"].get("tol") == 1e-3 if "tol" in r["knob"] else r["nfe"] <= 20)]
    if conv:
        lines += ["", f"Every ODE method converges to the same samples (they map the same x_T): the tightest rk45 "
                  f"run sits at {conv[-1]['sw'] / first['floor']['sw']:.2f}x the floor, so ratios near that value "
                  "mean 'converged', not 'worse than the floor'.", ""]
    lines += _order_ratios(result)
    lines += best_lines(result.get("best", []))
    lines += ["## Variance error on N(0.5, 0.5²), VP(0.1, 20) (exact: ODE maps are affine)", "",
              "| method | NFE | variance error |", "|---|---|---|"]
    for label, rs in result["variance"].items():
        for r in rs:
            tol = f" (tol {r['tol']:g})" if "tol" in r else ""
            lines.append(f"| {label}{tol} | {r['nfe']} | {100 * r['var_err']:+.2f} % |")
    for prob in result["problems"]:
        fl = prob["floor"]
        rng = f", range {fl['sw_min']:.4f}-{fl['sw_max']:.4f} over 4 pairs" if "sw_min" in fl else ""
        lines += ["", f"## {prob['mixture']} / {prob['sde']} (noise floor sliced W2 {fl['sw']:.4f}{rng}; "
                  f"reference {prob['reference']})", "", head, rule]
        lines += [_row_line(r, prob["floor"]["sw"], ov) for r in prob["rows"]]
    lines += ["", "## Overhead over bare score calls (MLP score, CPU)", "",
              "'overhead': time(sampler) / time(the same number of score calls in a bare loop); 'own share': "
              "time(sampler) / time spent inside its own score calls in the same run (the solver's own cost, "
              "free of load drifting between runs; score calls inside a sampler can run slower than in a tight "
              "loop, which only the first column sees).", "",
              "| method | NFE | overhead | own share |", "|---|---|---|---|"]
    for label, r in ov.items():
        own = f"{r['over_in_score']:.3f}" if "over_in_score" in r else "-"
        lines.append(f"| {label} | {r['nfe']} | {r['overhead']:.3f} | {own} |")
    return "\n".join(lines) + "\n"


_PROBLEMS = [("vp", "8gaussians"), ("vp", "anisotropic"), ("vp", "mixture16"), ("vp", "mixture64"),
             ("subvp", "8gaussians"), ("ve", "8gaussians"), ("ve", "mixture16")]


#: problems of the best-of comparison (the Gaussian variance problem is always added)
_SWEEP_PROBLEMS = [("vp", "8gaussians"), ("subvp", "8gaussians"), ("ve", "8gaussians"), ("vp", "mixture16")]


def run(out_dir, quick: bool = False, *, problems=None, nfes=None, n: int | None = None,
        sweep_problems=None, sweep_nfes=None, best_only: bool = False) -> dict:
    r"""Run the solver benchmark; write ``solvers.json``, ``summary.md``, ``best.md`` and PNGs into ``out_dir``.

    Run from the repository root (``docs/figures`` present) and not ``quick``, it also writes the
    best-of comparison into ``docs/benchmarks/solvers_best.json``, ``docs/benchmarks/solvers_best.txt``
    and ``docs/figures/bench_solvers_best.png``, and, when the default problems, NFE and sample size
    ran, the full summary into ``docs/benchmarks/solvers_summary.txt`` and the per-problem figures into
    ``docs/figures/`` (a reduced run leaves the documented full run in place).

    Args:
        out_dir: output folder (created).
        quick: one problem, two NFE values, 2000 samples, batch-1024 overhead (well under a minute).
        problems: ``(sde, mixture)`` pairs to run instead of the default grid (sde in vp/subvp/ve);
            lets a slow machine run a reduced grid.
        nfes: NFE values instead of the default ``[10, 20, 50, 100, 1000]``.
        n: samples per problem instead of 10000 (2000 with ``quick``).
        sweep_problems: ``(sde, mixture)`` pairs of the best-of comparison (every deterministic sdegen
            method on every grid against every peer configuration, two seeds) instead of VP, sub-VP and
            VE 8-Gaussians and VP 16-D; the N(0.5, 0.5²) variance problem always runs. ``[]``: none.
        sweep_nfes: NFE values of that comparison instead of ``[5, 10, 20, 50]`` (``[10]`` with ``quick``).
        best_only: run only the best-of comparison (no per-method tables, variance table or overhead).

    Returns:
        ``{"wall_s", "files"}``; the results are in ``solvers.json``.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    valid = {s for s, _ in _PROBLEMS}
    for s, _ in list(problems or []) + list(sweep_problems or []):
        if s not in valid:
            raise ValueError(f"problems: sde must be one of {sorted(valid)}, got {s!r}")
    full_default = problems is None and nfes is None and n is None and not quick and not best_only
    problems = list(problems or ([("vp", "8gaussians")] if quick else _PROBLEMS))
    nfes = list(nfes or ([10, 20] if quick else [10, 20, 50, 100, 1000]))
    n = int(n or (2000 if quick else 10000))
    snfes = list(sweep_nfes or ([10] if quick else [5, 10, 20, 50]))
    sprobs = list(_SWEEP_PROBLEMS[:1] if quick else _SWEEP_PROBLEMS) if sweep_problems is None else sweep_problems
    with torch.no_grad():
        result = {"config": {"quick": quick, "threads": torch.get_num_threads()}}
        if not best_only:
            result["config"].update({"problems": problems, "nfes": nfes, "n": n})
            result["problems"] = [_cached_problem(out_dir, s, m, n, nfes, quick) for s, m in problems]
            result["variance"] = _variance_table([10, 20] if quick else [10, 15, 20, 50])
        t0 = time.perf_counter()
        sweeps = [_traj_sweep(sd, mx, snfes, n_traj=64 if quick else 1000) for sd, mx in sprobs]
        sweeps.append(_gaussian_sweep(snfes))
        result["sweeps"] = sweeps
        result["best"] = best_table(sweeps, snfes)
        result["config"]["sweep"] = {"problems": sprobs, "nfes": snfes, "wall_s": time.perf_counter() - t0,
                                     "peers": _peer_version()}
        print(f"solvers bench: best-of sweep done in {time.perf_counter() - t0:.0f} s", flush=True)
        if not best_only:
            result["overhead"] = _overhead(1024 if quick else 4096, 10 if quick else 20)
    result["wall_s"] = time.perf_counter() - t_start
    (out_dir / "solvers.json").write_text(json.dumps(result, indent=1, default=str))
    figs = [] if best_only else _plots(result, out_dir)
    best_fig = _best_plot(result["best"], out_dir)
    best_md = "\n".join([f"Best-of run: {result['config']['sweep']}", ""] + best_lines(result["best"]))
    (out_dir / "best.md").write_text(best_md)
    if not best_only:
        (out_dir / "summary.md").write_text(_summary(result))
    docs = pathlib.Path("docs/figures")
    if docs.is_dir() and not quick:
        bench = docs.parent / "benchmarks"
        bench.mkdir(exist_ok=True)
        shutil.copy(best_fig, docs / best_fig.name)
        # .txt, not .md: every .md under docs/ must be a page in the mkdocs nav (tests/test_docs.py);
        # the content is markdown, for pasting into the README.
        shutil.copy(out_dir / "best.md", bench / "solvers_best.txt")
        (bench / "solvers_best.json").write_text(json.dumps({"config": result["config"], "best": result["best"]},
                                                            indent=1, default=str))
        if full_default:
            for p in figs:
                shutil.copy(p, docs / p.name)
            shutil.copy(out_dir / "summary.md", bench / "solvers_summary.txt")
    files = [str(p) for p in figs] + [str(best_fig), str(out_dir / "solvers.json")]
    return {"wall_s": result["wall_s"], "files": files}




if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser(description="sdegen solver benchmark (issue 8)")
    ap.add_argument("out_dir", nargs="?", default="bench_results/solvers")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--problems", default=None, help="comma list of sde:mixture, e.g. vp:8gaussians,ve:mixture16")
    ap.add_argument("--nfes", default=None, help="comma list of NFE values")
    ap.add_argument("--n", type=int, default=None, help="samples per problem")
    ap.add_argument("--sweep-problems", default=None, help="comma list of sde:mixture for the best-of comparison "
                    "('none': only the Gaussian variance problem)")
    ap.add_argument("--sweep-nfes", default=None, help="comma list of NFE values of the best-of comparison")
    ap.add_argument("--best-only", action="store_true", help="only the best-of comparison against the peers")
    a = ap.parse_args()
    probs = [tuple(p.split(":")) for p in a.problems.split(",")] if a.problems else None
    nf = [int(v) for v in a.nfes.split(",")] if a.nfes else None
    sp = None if a.sweep_problems is None else (
        [] if a.sweep_problems == "none" else [tuple(p.split(":")) for p in a.sweep_problems.split(",")])
    snf = [int(v) for v in a.sweep_nfes.split(",")] if a.sweep_nfes else None
    print(run(pathlib.Path(a.out_dir), quick=a.quick, problems=probs, nfes=nf, n=a.n, sweep_problems=sp,
              sweep_nfes=snf, best_only=a.best_only))

