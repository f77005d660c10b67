r"""Discrete and continuous samplers side by side on 2-D data: quality against the number of score evaluations.

The data are the oracle's "8 gaussians" mixture, so the exact score of every marginal $p_t$ of the
VP SDE is known and all the error measured here is the *sampler's*. For each method and budget we
draw samples and measure the sliced Wasserstein-2 distance to fresh exact samples; the distance
between two exact sample sets of the same size is drawn as the noise floor.

Discrete samplers: DDPM ancestral sampling (the VP SDE's own discretization, ``method="ancestral"``)
and DDIM ($\eta = 0$) on the chain ``VPSDE().discretize(N)``. Continuous samplers: Euler–Maruyama
and predictor–corrector on the reverse SDE; Euler, Heun and adaptive RK45 on the probability-flow
ODE; EDM's Heun on the Karras grid, DPM-Solver, and the adaptive reverse-SDE solver.

Run:  python examples/compare_samplers_2d.py [--fast] [--out outputs/compare_samplers_2d]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import sdegen
from sdegen import plotting
from sdegen.demo import sliced_wasserstein


def methods(sde) -> dict:
    """``{label: (run(score_fn, shape, budget, generator) -> (samples, nfe), budgets)}``.

    A budget is a step count for fixed-grid methods and a tolerance (rtol = atol) for adaptive ones.
    """
    def fixed(method, **opts):
        def run(score_fn, shape, steps, gen):
            res = sdegen.sample(sde, score_fn, shape, method=method, steps=steps, generator=gen,
                                dtype=torch.float64, **opts)
            return res.samples, res.nfe
        return run

    def ddim(score_fn, shape, steps, gen):
        ddpm = sde.discretize(1000)
        calls = []
        eps_model = ddpm.eps_model_from_score(lambda x, t: calls.append(1) or score_fn(x, t))
        x = ddpm.ddim_sample(eps_model, shape, steps=steps, generator=gen, dtype=torch.float64)
        return x, len(calls)

    def adaptive(method):
        def run(score_fn, shape, tol, gen):
            res = sdegen.sample(sde, score_fn, shape, method=method, rtol=tol, atol=tol, generator=gen,
                                dtype=torch.float64)
            return res.samples, res.nfe
        return run

    table = {
        "DDPM ancestral": (fixed("ancestral"), [25, 50, 100, 200, 500, 1000]),  # N > beta_max: beta_i < 1
        "DDIM (eta=0)": (ddim, [5, 10, 20, 50, 100]),
        "Euler-Maruyama": (fixed("euler_maruyama"), [10, 20, 50, 100, 200, 500]),
        "PC (annealed Langevin)": (fixed("pc", corrector="annealed_langevin", snr=0.16), [5, 10, 25, 50, 100, 250]),
        "ODE Euler": (fixed("ode_euler"), [10, 20, 50, 100, 200]),
        "ODE Heun": (fixed("ode_heun"), [5, 10, 25, 50, 100]),
        "RK45 (adaptive)": (adaptive("rk45"), [1e-2, 1e-3, 1e-4, 1e-5]),
    }
    # Fast solvers land in the METHODS table during development; include them when present.
    if "heun_karras" in sdegen.METHODS:
        table["Heun, Karras grid"] = (fixed("heun_karras"), [5, 10, 25, 50])
    if "dpm_solver" in sdegen.METHODS:
        table["DPM-Solver"] = (fixed("dpm_solver"), [5, 10, 20, 50])
    if "adaptive_sde" in sdegen.METHODS:
        table["adaptive SDE"] = (adaptive("adaptive_sde"), [1e-1, 3e-2, 1e-2, 3e-3])
    return table


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fast", action="store_true", help="one budget per method, 256 samples (seconds)")
    p.add_argument("--out", default="outputs/compare_samplers_2d", help="output folder")
    p.add_argument("--n", type=int, default=None, help="samples per run (default 4000; 256 with --fast)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n = args.n or (256 if args.fast else 4000)
    os.makedirs(args.out, exist_ok=True)

    sde = sdegen.VPSDE()
    gm = sdegen.named_mixture("8gaussians")                     # float64
    score_fn = gm.score_fn(sde)
    ref = gm.sample(n, generator=torch.Generator().manual_seed(10_000 + args.seed))
    # The distance between exact sample sets is itself random: its range over a few independent
    # pairs is the band within which two methods cannot be told apart at this n.
    floors = [sliced_wasserstein(ref, gm.sample(n, generator=torch.Generator().manual_seed(20_000 + args.seed + k)))
              for k in range(2 if args.fast else 8)]
    floor = sum(floors) / len(floors)

    curves, rows = {}, []
    for label, (run, budgets) in methods(sde).items():
        if args.fast:
            budgets = budgets[:1]
        nfes, dists = [], []
        for b in budgets:
            gen = torch.Generator().manual_seed(args.seed)
            t0 = time.perf_counter()
            with torch.no_grad():
                x, nfe = run(score_fn, (n, 2), b, gen)
            secs = time.perf_counter() - t0
            d = sliced_wasserstein(x, ref)
            nfes.append(nfe)
            dists.append(d)
            rows.append({"method": label, "budget": b, "nfe": nfe, "seconds": secs, "sw2": d})
            print(f"{label:36s} budget {b:>8g}  NFE {nfe:5d}  {secs:6.2f} s  SW2 {d:.4f}")
        curves[label] = (nfes, dists)

    fig = plotting.error_vs_nfe(curves, ylabel="sliced Wasserstein-2 to exact samples",
                                floor=(min(floors), floor, max(floors)),
                                floor_label=f"exact vs exact: mean, range of {len(floors)} pairs",
                                title=f"8 gaussians, VP SDE, exact score, {n} samples per point")
    figure = plotting.save(fig, os.path.join(args.out, "compare_samplers_2d.png"))
    lines = ["| method | budget | NFE | seconds | SW2 |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['budget']:g} | {r['nfe']} | {r['seconds']:.2f} | {r['sw2']:.4f} |" for r in rows]
    lines.append(f"| exact vs exact (floor) | - | - | - | {floor:.4f} |")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"n": n, "floor": floor, "floors": floors, "rows": rows}, f, indent=2)
    print(f"noise floor {floor:.4f}; wrote {figure}")
    return {"rows": rows, "floor": floor, "figure": figure}


if __name__ == "__main__":
    main()
