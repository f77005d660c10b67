r"""Likelihood benchmark: exact vs Hutchinson divergence across dimensions, native RK45 vs scipy.

With the Gaussian-mixture oracle (exact score, exact $p_T$ as the prior) the only error left in
``log_likelihood`` is the ODE solver's (and, for Hutchinson, the probe noise), so the error against
the true $\log p_\epsilon(x)$ is measured directly. Written to ``likelihood.json`` and
``likelihood.png``:

- for $d$ = 2, 16, 64 (``8gaussians``, ``mixture16``, ``mixture64``; VP SDE): NFE, VJPs and wall time
  per sample, and the error in nats per dimension, for the exact and the Hutchinson divergence;
- the native torch RK45 against every other integrator of ``log_likelihood`` (`ODE_METHODS`:
  ``scipy.integrate.solve_ivp``'s RK45 on NumPy copies, as the reference implementation does, and
  torchdiffeq's dopri5) on the same likelihood ODE at the same tolerance, timed side by side in one
  run (ratios of medians over repeats).

Run with ``sdegen bench likelihood`` or ``python -m sdegen.bench.likelihood OUT_DIR [--quick]``.
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

from .. import VPSDE, named_mixture
from ..likelihood import ODE_METHODS, encode, log_likelihood

_MIXTURES = {2: "8gaussians", 16: "mixture16", 64: "mixture64"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, repeats: int, device: torch.device):
    out, times = fn(), []  # untimed warm-up (first-call allocations, vmap set-up)
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), times


def _divergence_sweep(n: int, tol: float, eps: float, repeats: int, device: torch.device) -> list[dict]:
    rows = []
    sde = VPSDE()
    for d, name in _MIXTURES.items():
        gm = named_mixture(name, device=device)
        x = gm.sample(n, generator=torch.Generator(device).manual_seed(d))
        truth = gm.log_prob_t(x, eps, sde)
        prior = lambda z, gm=gm: gm.log_prob_t(z, sde.T, sde)  # noqa: E731
        for div in ("exact", "hutchinson"):
            def call(div=div):
                return log_likelihood(sde, gm.score_fn(sde), x, divergence=div, rtol=tol, atol=tol, eps=eps,
                                      prior=prior, generator=torch.Generator(device).manual_seed(0))
            res, med, times = _timed(call, repeats, device)
            err = (res.log_prob - truth) / d
            rows.append({
                "d": d, "mixture": name, "divergence": div, "n": n, "nfe": res.nfe, "vjp": res.stats["vjp"],
                "accepted": res.stats["accepted"], "rejected": res.stats["rejected"],
                "wall_s": med, "wall_s_all": times, "wall_ms_per_sample": 1e3 * med / n,
                "abs_err_nats_per_dim_mean": float(err.abs().mean()),
                "abs_err_nats_per_dim_max": float(err.abs().max()),
                "bias_nats_per_dim": float(err.mean()),
                "std_err_of_bias": float(err.std() / math.sqrt(n)) if n > 1 else float("nan"),
            })
    return rows


def _solver_comparison(n: int, tol: float, eps: float, repeats: int, device: torch.device) -> list[dict]:
    """Native RK45 vs every other integrator of `ODE_METHODS` on the same likelihood ODE, interleaved repeats."""
    rows = []
    sde = VPSDE()
    for d in (2, 16):
        gm = named_mixture(_MIXTURES[d], device=device)
        x = gm.sample(n, generator=torch.Generator(device).manual_seed(100 + d))
        truth = gm.log_prob_t(x, eps, sde)
        prior = lambda z, gm=gm: gm.log_prob_t(z, sde.T, sde)  # noqa: E731
        z_ref = encode(sde, gm.score_fn(sde), x, rtol=1e-9, atol=1e-9, eps=eps)
        for task in ("likelihood", "encode"):
            times = {method: [] for method in ODE_METHODS}   # every integrator log_likelihood takes
            results = {}
            for rep in range(repeats + 1):
                for method in times:  # interleaved, so load changes hit every method alike
                    _sync(device)
                    t0 = time.perf_counter()
                    if task == "likelihood":
                        results[method] = log_likelihood(sde, gm.score_fn(sde), x, rtol=tol, atol=tol, eps=eps,
                                                         prior=prior, method=method)
                    else:
                        results[method] = encode(sde, gm.score_fn(sde), x, rtol=tol, atol=tol, eps=eps,
                                                 method=method)
                    _sync(device)
                    if rep > 0:  # repeat 0 is the warm-up
                        times[method].append(time.perf_counter() - t0)
            med = {m: statistics.median(v) for m, v in times.items()}
            for method, res in results.items():
                row = {"task": task, "d": d, "n": n, "method": method, "tol": tol, "wall_s": med[method],
                       "wall_s_all": times[method], "time_ratio_vs_rk45": med[method] / med["rk45"]}
                if task == "likelihood":
                    row.update(nfe=res.nfe, abs_err_nats_per_dim_max=float(((res.log_prob - truth) / d).abs().max()))
                else:
                    row.update(max_abs_err_latent=float((res - z_ref).abs().max()))
                rows.append(row)
    return rows


def _plot(result: dict, path: pathlib.Path) -> None:
    from ..plotting import STYLE, log_ticks, plt, save

    sweep, comp = result["divergence_sweep"], result["solver_comparison"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
        for div, marker in (("exact", "o"), ("hutchinson", "s")):
            rows = [r for r in sweep if r["divergence"] == div]
            ds = [r["d"] for r in rows]
            axes[0].plot(ds, [r["wall_ms_per_sample"] for r in rows], marker=marker, label=div)
            axes[1].plot(ds, [r["nfe"] for r in rows], marker=marker, label=f"{div}: score calls")
            axes[1].plot(ds, [r["vjp"] for r in rows], marker=marker, ls="--", label=f"{div}: VJPs")
            axes[2].plot(ds, [r["abs_err_nats_per_dim_mean"] for r in rows], marker=marker, label=div)
        for ax, title in zip(axes[:3], ("wall time per sample [ms]", "evaluations", "|error| [nats/dim]")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            log_ticks(ax)  # no overlapping minor-tick labels on short log ranges
            ax.set_xlabel("dimension d")
            ax.set_title(title)
            ax.legend(fontsize=7)
        labels, ratios = [], []
        for r in comp:
            if r["method"] == "rk45":
                continue
            labels.append(f"{r['method']}\n{r['task']}\nd={r['d']}")
            ratios.append(r["time_ratio_vs_rk45"])
        colour = {m: f"C{i + 1}" for i, m in enumerate(ODE_METHODS)}
        axes[3].bar(range(len(ratios)), ratios, color=[colour[r["method"]] for r in comp if r["method"] != "rk45"])
        axes[3].set_xticks(range(len(ratios)), labels, fontsize=7)
        axes[3].axhline(1.0, color="k", lw=0.8)
        axes[3].set_title(f"time / native rk45, same run (tol {comp[0]['tol']:g})")
        fig.suptitle("log_likelihood on the Gaussian-mixture oracle (VP, exact score, exact p_T; "
                     f"{result['config']['device']}, n={result['config']['n']})")
        fig.tight_layout()
        save(fig, path)


def run(out_dir: pathlib.Path | str, quick: bool = False, device: str | torch.device | None = None) -> dict:
    r"""Run the benchmark, write ``likelihood.json`` and ``likelihood.png`` to ``out_dir``, return the summary.

    Args:
        out_dir: output folder (created).
        quick: fewer samples and repeats (a smoke run; figures are noisier).
        device: where to compute (default: ``"cpu"``).
    """
    device = torch.device(device or "cpu")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 8 if quick else 64
    repeats = 1 if quick else 3
    tol, eps = 1e-5, 1e-5
    result = {
        "config": {"n": n, "repeats": repeats, "tol": tol, "eps": eps, "dtype": "float64", "sde": "VPSDE()",
                   "prior": "exact p_T (oracle)", "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "python": sys.version.split()[0], "machine": platform.machine(), "quick": quick,
                   "device": str(device)},
        "divergence_sweep": _divergence_sweep(n, tol, eps, repeats, device),
        "solver_comparison": _solver_comparison(n, tol, eps, repeats, device),
    }
    with open(out / "likelihood.json", "w") as f:
        json.dump(result, f, indent=2)
    _plot(result, out / "likelihood.png")
    summary = {
        "wall_ms_per_sample": {f"{r['divergence']}_d{r['d']}": round(r["wall_ms_per_sample"], 3)
                               for r in result["divergence_sweep"]},
        "err_nats_per_dim": {f"{r['divergence']}_d{r['d']}": r["abs_err_nats_per_dim_mean"]
                             for r in result["divergence_sweep"]},
        # one ratio table per integrator other than the native rk45 (scipy_over_rk45, torchdiffeq_over_rk45, ...)
        **{f"{method}_over_rk45": {f"{r['task']}_d{r['d']}": round(r["time_ratio_vs_rk45"], 2)
                                   for r in result["solver_comparison"] if r["method"] == method}
           for method in ODE_METHODS if method != "rk45"},
        "files": [str(out / "likelihood.json"), str(out / "likelihood.png")],
    }
    return summary


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="likelihood benchmark")
    parser.add_argument("out", nargs="?", default="bench_results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    a = parser.parse_args()
    print(json.dumps(run(pathlib.Path(a.out), quick=a.quick, device=a.device), indent=2))
