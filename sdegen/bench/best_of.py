r"""Best-of comparison against diffusers' deterministic schedulers (issue 16), part of ``sdegen bench solvers``.

Per problem and NFE, the best sdegen configuration (method, order, variant and grid) against the best
peer configuration (scheduler, order, variant and spacing; `sdegen.bench.peers`), picked on one seed
and re-measured on a held-out one, and on the Gaussian variance problem $\mathcal N(0.5, 0.5^2)$.
`sdegen.bench.solvers.run` runs it and writes the results.
"""

from __future__ import annotations

import functools
import pathlib

import torch

import sdegen

from ._methods import loop_methods, steps_for_nfe
from ._problems import EPS, F64, _reference, _sde


#: grid label -> (sdegen.grids name, options): the grids sdegen's best may pick from
GRID_SWEEP = {"uniform": ("uniform", {}), "quadratic": ("quadratic", {}), "log_snr": ("log_snr", {}),
              "karras": ("karras", {}), "polyexponential rho 2": ("polyexponential", {"rho": 2.0}),
              "beta": ("beta", {})}


def _sweep_methods() -> dict:
    r"""Deterministic sdegen configurations of the best-of comparison: label -> (method, options, NFE -> steps).

    Each runs on every grid of `GRID_SWEEP` (a method without a ``grid`` option, such as ``dpm_fast``, on
    its own grid), the freedom the peers get from their spacing and order options
    (`sdegen.bench.peers.sweep_configs`). Besides the hand-picked variants, every other deterministic
    probability-flow row of ``sdegen.METHODS`` competes at its default options."""
    m = {"ode_euler": ("ode_euler", {}, lambda n: n), "ode_heun": ("ode_heun", {}, lambda n: n // 2),
         "heun_karras": ("heun_karras", {}, lambda n: (n + 1) // 2)}
    for o in (1, 2, 3):
        for pred in ("noise", "data"):
            m[f"dpm_solver-{o} {pred}"] = ("dpm_solver", {"order": o, "prediction": pred}, lambda n: n)
        m[f"deis-{o}"] = ("deis", {"order": o}, lambda n: n)
        for v in ("bh1", "bh2"):
            for pred in ("data", "noise"):
                m[f"unipc-{o} {v} {pred}"] = ("unipc", {"order": o, "variant": v, "prediction": pred}, lambda n: n)
    m["dpm_solver-2 midpoint"] = ("dpm_solver", {"order": 2, "solver_type": "midpoint", "prediction": "data"},
                                  lambda n: n)
    m["plms (pndm, heun start)"] = ("pndm", {"warmup": "heun"}, lambda n: n - 1)
    m["ipndm"] = ("ipndm", {}, lambda n: n)
    for o in (2, 3, 4):
        m[f"lms-{o}"] = ("lms", {"order": o}, lambda n: n)
    m["dpm2"] = ("dpm2", {}, lambda n: n // 2)
    for o in (2, 3):
        m[f"dpm_solver_singlestep-{o}"] = ("dpm_solver_singlestep", {"order": o}, lambda n: n)
    m["dpm_fast"] = ("dpm_fast", {}, lambda n: n)
    # sdegen's lower_order_final (default on for these) lowers the last steps' order at every step count;
    # diffusers only below 15 steps. Both settings are the user's choice, so both compete.
    for label, (method, opts, to_steps) in list(m.items()):
        if method in ("unipc", "deis", "dpm_solver_singlestep"):
            m[f"{label}, final full order"] = (method, {**opts, "lower_order_final": False}, to_steps)
    covered = {method for method, *_ in m.values()}
    for method in loop_methods():
        if method not in covered and not sdegen.METHODS[method].reverse_sde and method not in _NOT_DETERMINISTIC:
            m[method] = (method, {}, functools.partial(steps_for_nfe, method))
    return m


# Probability-flow rows (reverse_sde False) that still draw noise: Restart re-noises between its ODE
# segments, so its end point is no deterministic map of x_T to compare with the flow's.
_NOT_DETERMINISTIC = frozenset({"restart"})


def _sweep(sde, sf, x_T, nfes, error) -> list[dict]:
    r"""Every configuration of `_sweep_methods` on every grid, and every peer of `peers.sweep_configs`,
    at each target NFE: rows ``{"who", "method", "grid", "nfe_target", "nfe", "err"}`` with
    ``err = error(samples)``. A configuration that would spend more than the target NFE is dropped."""
    from sdegen.grids import get_grid

    from . import peers

    rows = []
    for label, (method, opts, to_steps) in _sweep_methods().items():
        grids = GRID_SWEEP if "grid" in sdegen.METHODS[method].options else {"own": None}
        for glabel, spec in grids.items():
            for nfe in nfes:
                steps = to_steps(nfe)
                try:
                    kw = dict(opts)
                    if spec is not None:
                        kw["grid"] = get_grid(spec[0], sde, steps, eps=EPS, **spec[1])
                    res = sdegen.sample(sde, sf, None, x_T=x_T, method=method, steps=steps, **kw)
                except Exception as e:  # noqa: BLE001 - one failing configuration must not sink the run
                    rows.append({"who": "sdegen", "method": label, "grid": glabel, "nfe_target": nfe, "error": repr(e)})
                    continue
                if res.nfe <= nfe:
                    rows.append({"who": "sdegen", "method": label, "grid": glabel, "nfe_target": nfe,
                                 "nfe": res.nfe, "err": error(res.samples)})
    if peers.available():
        for label, spacing, name, opts in peers.sweep_configs():
            for nfe in nfes:
                try:
                    y, used, _ = peers.run_scheduler(name, opts, sde, sf, x_T, nfe, EPS)
                except Exception as e:  # noqa: BLE001 - configurations that do not start at T are reported
                    rows.append({"who": "peer", "method": label, "grid": spacing, "nfe_target": nfe, "error": repr(e)})
                    continue
                err = error(y)
                if used <= nfe and err == err:  # a NaN (a zero-length step of the peer) is no result
                    rows.append({"who": "peer", "method": label, "grid": spacing, "nfe_target": nfe,
                                 "nfe": used, "err": err})
    return rows


def _best(rows, who, nfe):
    cands = [r for r in rows if r["who"] == who and r["nfe_target"] == nfe and "err" in r]
    return min(cands, key=lambda r: abs(r["err"])) if cands else None


def _lookup(rows, like):
    for r in rows:
        if (r["who"], r["method"], r["grid"], r["nfe_target"]) == (like["who"], like["method"], like["grid"],
                                                                   like["nfe_target"]) and "err" in r:
            return r
    return None


def _traj_sweep(sde_name, mix, nfes, seeds=(0, 1), n_traj=1000):
    r"""Best-of comparison on one mixture problem: mean $\|x - x^\star\|$ at eps against the exact flow
    (rk45 at 1e-9) from ``n_traj`` prior draws, for the selection seed and a held-out seed."""
    sde, gm = _sde(sde_name), sdegen.named_mixture(mix)
    sf = gm.score_fn(sde)
    out = {"sde": sde_name, "mixture": mix, "metric": "trajectory error", "n_traj": n_traj, "seeds": list(seeds),
           "rows": {}}
    for seed in seeds:
        x_T = sde.prior_sample((n_traj, gm.dim), generator=torch.Generator().manual_seed(seed), dtype=F64)
        ref, _ = _reference(sde, sf, x_T)
        out["rows"][str(seed)] = _sweep(sde, sf, x_T, nfes, lambda y, ref=ref: float((y - ref).norm(dim=1).mean()))
        print(f"solvers bench: best-of {sde_name}/{mix} seed {seed} done", flush=True)
    return out


def _gaussian_sweep(nfes):
    r"""Best-of comparison on $\mathcal N(0.5, 0.5^2)$ 2-D, VP(0.1, 20): the relative variance error at eps,
    exact for every deterministic method (sdegen's and the peers' maps are affine in $x_T$ here)."""
    sde, gm = sdegen.VPSDE(0.1, 20.0), sdegen.named_mixture("gaussian")
    sf = gm.score_fn(sde)
    m, s = sde.marginal(torch.tensor([EPS], dtype=F64))
    target = float(m.square() * 0.25 + s.square())
    x_T = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)

    def var_err(y):
        return float((y[1] - y[0]).square().mean() / target - 1)

    return {"sde": "vp(0.1, 20)", "mixture": "gaussian", "metric": "variance error", "seeds": ["exact"],
            "rows": {"exact": _sweep(sde, sf, x_T, nfes, var_err)}}


def best_table(sweeps, nfes=(5, 10, 20, 50)) -> list[dict]:
    r"""Per problem and NFE: the best sdegen configuration and the best peer on the selection seed, and on
    the held-out seed the error of that same sdegen configuration against the best peer picked there."""
    table = []
    for sw in sweeps:
        keys = list(sw["rows"])
        sel, held = sw["rows"][keys[0]], sw["rows"][keys[-1]]
        for nfe in nfes:
            a, b = _best(sel, "sdegen", nfe), _best(sel, "peer", nfe)
            if a is None:
                continue
            row = {"problem": f"{sw['mixture']}/{sw['sde']}", "metric": sw["metric"], "nfe": nfe,
                   "sdegen": a, "peer": b}
            if len(keys) > 1:
                row["held_out_seed"] = keys[-1]
                row["sdegen_held"] = _lookup(held, a)
                row["peer_held"] = _best(held, "peer", nfe)
            table.append(row)
    return table


def verdict(ours, peer) -> str:
    r"""``"yes"`` if ``|ours| <= |peer|``, ``"tie"`` within a relative $10^{-6}$ (the same algorithm on the same
    grid, equal to round-off), else ``"no (+x %)"``; ``"-"`` when either is missing."""
    if not ours or not peer:
        return "-"
    a, b = abs(ours["err"]), abs(peer["err"])
    if abs(a - b) <= 1e-6 * max(a, b):
        return "tie"
    return "yes" if a < b else f"no (+{100 * (a / b - 1):.1f} %)"


def best_lines(table) -> list[str]:
    """Markdown of `best_table`."""
    if not table:
        return []

    def fmt(r, metric):
        if r is None:
            return "-", "-"
        v = f"{100 * r['err']:+.3f} %" if metric == "variance error" else f"{r['err']:.3e}"
        spent = f", {r['nfe']} NFE" if r["nfe"] != r["nfe_target"] else ""
        return f"{r['method']} ({r['grid']}{spent})", v

    lines = ["## Best sdegen configuration against the best diffusers peer", "",
             "Trajectory error: mean |x - x*| at eps against the exact flow from the same x_T (the sweep's n_traj "
             "draws, in solvers.json); variance error: exact, relative. 'held out': the configurations picked on "
             "seed 0 re-measured on seed 1, against the best peer re-picked on seed 1. '<=': sdegen's best at or "
             "below the best peer ('tie': equal to 1e-6 relative, the same algorithm on the same grid).", "",
             "| problem | NFE | best sdegen (method, grid) | error | best peer (scheduler, spacing) | error | <= | "
             "held out: sdegen / best peer | <= |", "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        a, ea = fmt(row["sdegen"], row["metric"])
        b, eb = fmt(row["peer"], row["metric"])
        held, vh = "-", "-"
        if row.get("sdegen_held") and row.get("peer_held"):
            held = f"{row['sdegen_held']['err']:.3e} / {row['peer_held']['err']:.3e}"
            vh = verdict(row["sdegen_held"], row["peer_held"])
        lines.append(f"| {row['problem']} | {row['nfe']} | {a} | {ea} | {b} | {eb} | "
                     f"{verdict(row['sdegen'], row['peer'])} | {held} | {vh} |")
    return lines + [""]


def _peer_version() -> str | None:
    try:
        import diffusers
    except Exception:  # noqa: BLE001 - no peers
        return None
    return f"diffusers {diffusers.__version__}"


def _best_plot(table, out_dir: pathlib.Path) -> pathlib.Path:
    r"""``bench_solvers_best.png``: per problem, the best sdegen error and the best peer error against NFE
    (solid: selection seed; dashed: the held-out seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = list(dict.fromkeys(r["problem"] for r in table))
    fig, axes = plt.subplots(1, max(1, len(probs)), figsize=(3.2 * max(1, len(probs)), 3.2), squeeze=False)
    for ax, prob in zip(axes[0], probs):
        rows = [r for r in table if r["problem"] == prob]
        x = [r["nfe"] for r in rows]
        for key, held, colour, name in (("sdegen", "sdegen_held", "C0", "best sdegen"),
                                        ("peer", "peer_held", "C3", "best diffusers")):
            ys = [abs(r[key]["err"]) if r.get(key) else float("nan") for r in rows]
            ax.plot(x, ys, "o-", color=colour, label=name, ms=3)
            if any(r.get(held) for r in rows):
                yh = [abs(r[held]["err"]) if r.get(held) else float("nan") for r in rows]
                ax.plot(x, yh, "--", color=colour, lw=1, label=f"{name}, held-out seed")
        ylabel = "|variance error|" if rows[0]["metric"] == "variance error" else "mean |x - x*| at eps"
        ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel=ylabel, title=prob)
        ax.set_xticks(x, [str(v) for v in x], minor=False)
        ax.set_xticks([], minor=True)
        ax.legend(fontsize=6)
    fig.tight_layout()
    p = out_dir / "bench_solvers_best.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
