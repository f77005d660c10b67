r"""DDPM is the VP SDE discretized: one exact model, sampled by the discrete chain and by SDE/ODE solvers.

The model is the exact score of the VP SDE's marginals for the oracle's "8 gaussians" mixture, so
every error measured here belongs to the sampler. The DDPM side uses the chain
``VPSDE().discretize(N)`` ($\beta_i = 10^{-4} \dots 0.02$ for $N = 1000$) with the score wrapped as an
$\epsilon$-model ($\epsilon(x, i) = -\sqrt{1-\bar\alpha_i}\,s(x, t_i)$, $t_i = i/N$).

It prints and saves:

1. the equivalence check: DDPM ancestral sampling and ``sdegen.sample(vp, ..., method="ancestral")``
   from the same generator agree sample for sample;
2. a table (NFE, wall time, sliced Wasserstein-2 distance to exact samples, with the exact-vs-exact
   noise floor) for DDPM ancestral, DDIM, Euler–Maruyama, predictor–corrector and RK45;
3. the variational bound of the DDPM (``variance="beta"``) and its continuous-time limit against the
   exact $-\log p(x)$, in nats per sample;
4. one figure: each method's samples over the target's density contours (``ddpm_vs_sde.png``), and
   ``results.json``.

With ``--train STEPS`` a small MLP is also trained with DDPM's $\epsilon$ objective (``sdegen.train``,
``loss="ddpm"``) and sampled the same way, as a second row of the table and figure.

Run:  python examples/ddpm_vs_sde.py [--fast] [--train 3000] [--out outputs/ddpm_vs_sde]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import sdegen
from sdegen import plotting
from sdegen.ddpm import DDPM
from sdegen.vlb import continuous_vlb
from sdegen.demo import sliced_wasserstein


def _counted(fn, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapped


def run_methods(vp, score_fn, n: int, budgets: dict, seed: int) -> dict:
    """``{label: (samples, nfe, seconds)}`` for every method, all from generators seeded with ``seed``."""
    ddpm = vp.discretize(budgets["ddpm"])
    out = {}

    def timed(label, fn):
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            x, nfe = fn(gen)
        out[label] = (x, nfe, time.perf_counter() - t0)

    def ddpm_ancestral(gen):
        calls = []
        eps = ddpm.eps_model_from_score(_counted(score_fn, calls))
        return ddpm.sample(eps, (n, 2), generator=gen, dtype=torch.float64), len(calls)

    def ddim(gen):
        calls = []
        eps = ddpm.eps_model_from_score(_counted(score_fn, calls))
        return ddpm.ddim_sample(eps, (n, 2), steps=budgets["ddim"], generator=gen, dtype=torch.float64), len(calls)

    def sde_method(method, steps=None, **opts):
        def fn(gen):
            res = sdegen.sample(vp, score_fn, (n, 2), method=method, steps=steps, generator=gen,
                                dtype=torch.float64, **opts)
            return res.samples, res.nfe
        return fn

    timed(f"DDPM ancestral, N={budgets['ddpm']}", ddpm_ancestral)
    timed(f"DDIM eta=0, {budgets['ddim']} steps", ddim)
    timed(f"Euler-Maruyama, {budgets['em']} steps", sde_method("euler_maruyama", budgets["em"]))
    # Annealed Langevin (step 2 alpha (snr * std)^2): the SNR rule with per-sample norms takes huge steps in
    # 2-D wherever the score nearly vanishes (between and at the modes), so it is not used here.
    timed(f"PC (RD + ann. Langevin), {budgets['pc']} steps",
          sde_method("pc", budgets["pc"], corrector="annealed_langevin", snr=0.16))
    timed(f"RK45, tol {budgets['rk45']:g}", sde_method("rk45", rtol=budgets["rk45"], atol=budgets["rk45"]))
    return out


def equivalence_check(vp, score_fn, n: int, N: int, seed: int) -> float:
    """Max |DDPM ancestral - sdegen.sample(method="ancestral")| from the same generator (float64)."""
    ddpm = vp.discretize(N)
    a = ddpm.sample(ddpm.eps_model_from_score(score_fn), (n, 2), generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    b = sdegen.sample(vp, score_fn, (n, 2), method="ancestral", steps=N,
                      generator=torch.Generator().manual_seed(seed), dtype=torch.float64).samples
    return float((a - b).abs().max())


def bounds(vp, gm, score_fn, n: int, N: int, seed: int) -> dict:
    """Mean DDPM VLB (sigma^2 = beta) and continuous VLB against the exact mean -log p, in nats per sample."""
    x0 = gm.sample(n, generator=torch.Generator().manual_seed(seed + 1))
    ddpm = DDPM(vp.discretize(N).betas, variance="beta")
    nll = -gm.log_prob(x0)
    # The SDE's exact score as the chain's eps-model: exact up to the O(1/N) schedule gap, which the bound includes.
    vlb = ddpm.vlb(ddpm.eps_model_from_score(score_fn), x0, generator=torch.Generator().manual_seed(seed + 2))
    cont = continuous_vlb(vp, score_fn, x0, n_t=64, generator=torch.Generator().manual_seed(seed + 3))
    se = lambda v: float(v.std()) / n ** 0.5  # noqa: E731
    return {"nll": float(nll.mean()), "nll_se": se(nll),
            "ddpm_vlb": float(vlb.total.mean()), "ddpm_vlb_se": se(vlb.total),
            "ddpm_gap": float((vlb.total - nll).mean()), "ddpm_gap_se": se(vlb.total - nll),
            "continuous_vlb": float(cont.total.mean()), "continuous_gap": float((cont.total - nll).mean()),
            "continuous_gap_se": se(cont.total - nll), "N": N, "n": n}


def trained_score(vp, gm, steps: int, seed: int):
    """A small MLP eps-model trained with DDPM's simple objective on ``vp.discretize(1000)``, as a score.

    Needs :func:`sdegen.train` (imported here, so the rest of the example runs without it)."""
    from sdegen.nn import MLP

    model = sdegen.ScoreModel(MLP(2, hidden=128, depth=3), vp, parameterization="eps")
    data = gm.sample(20_000, generator=torch.Generator().manual_seed(seed + 7)).float()
    out = sdegen.train(model, data, steps=steps, batch_size=256, lr=2e-3, loss="ddpm", n_steps=1000,
                       warmup=100, seed=seed, progress=False)
    return out.model.double().eval()


def table(label: str, results: dict, ref, floor: float) -> list[dict]:
    rows = []
    print(f"\n{label}\n{'method':40s} {'NFE':>6s} {'seconds':>8s} {'SW2':>8s}")
    for method, (x, nfe, secs) in results.items():
        d = sliced_wasserstein(x, ref)
        rows.append({"model": label, "method": method, "nfe": nfe, "seconds": secs, "sw2": d})
        print(f"{method:40s} {nfe:6d} {secs:8.2f} {d:8.4f}")
    print(f"{'exact vs exact (noise floor)':40s} {'-':>6s} {'-':>8s} {floor:8.4f}")
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fast", action="store_true", help="fewer samples and steps (seconds)")
    p.add_argument("--out", default="outputs/ddpm_vs_sde", help="output folder")
    p.add_argument("--n", type=int, default=None, help="samples per method (default 4000; 500 with --fast)")
    p.add_argument("--train", type=int, default=0, metavar="STEPS",
                   help="also train a small MLP with the DDPM loss for STEPS steps and sample it (default: oracle only)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n = args.n or (500 if args.fast else 4000)
    budgets = ({"ddpm": 200, "ddim": 20, "em": 200, "pc": 100, "rk45": 1e-3, "vlb": 100} if args.fast else
               {"ddpm": 1000, "ddim": 100, "em": 1000, "pc": 500, "rk45": 1e-5, "vlb": 1000})
    os.makedirs(args.out, exist_ok=True)

    vp = sdegen.VPSDE(0.1, 20.0)
    gm = sdegen.named_mixture("8gaussians")                      # float64
    models = {"exact score": gm.score_fn(vp)}
    if args.train > 0:
        t0 = time.perf_counter()
        models[f"trained MLP, DDPM loss, {args.train} steps"] = trained_score(vp, gm, args.train, args.seed)
        print(f"trained the MLP in {time.perf_counter() - t0:.1f} s")

    diff = equivalence_check(vp, models["exact score"], min(n, 256), budgets["ddpm"], args.seed)
    print(f"DDPM ancestral vs sdegen.sample(method='ancestral'), same generator: max |diff| = {diff:.2e}")

    ref = gm.sample(n, generator=torch.Generator().manual_seed(10_000 + args.seed))
    floor = sliced_wasserstein(ref, gm.sample(n, generator=torch.Generator().manual_seed(20_000 + args.seed)))
    rows, panels, row_labels = [], {}, []
    for label, score_fn in models.items():
        results = run_methods(vp, score_fn, n, budgets, args.seed)
        rows += table(label, results, ref, floor)
        row_labels.append(label.split(",")[0])
        pad = " " * len(row_labels)        # invisible: keeps the panel titles of different rows distinct
        panels["exact samples" + pad] = ref
        for r in rows[-len(results):]:
            panels[f"{r['method']}\nNFE {r['nfe']}, SW2 {r['sw2']:.3f}{pad}"] = results[r["method"]][0]

    b = bounds(vp, gm, models["exact score"], 256 if args.fast else 2000, budgets["vlb"], args.seed)
    print(f"\nexact score, nats per sample: exact -log p = {b['nll']:.3f};  DDPM VLB (N={b['N']}, sigma^2=beta) = "
          f"{b['ddpm_vlb']:.3f} (gap {b['ddpm_gap']:+.3f} +- {b['ddpm_gap_se']:.3f});  continuous VLB = "
          f"{b['continuous_vlb']:.3f} (gap {b['continuous_gap']:+.3f} +- {b['continuous_gap_se']:.3f})")

    fig = plotting.scatter_panels(panels, log_prob=gm.log_prob, lim=3.0, ncols=6, max_points=1500,
                                  row_labels=row_labels,
                                  title=f"8 gaussians, VP SDE: DDPM chain vs SDE/ODE solvers ({n} samples per panel)")
    figure = plotting.save(fig, os.path.join(args.out, "ddpm_vs_sde.png"))
    summary = {"n": n, "budgets": budgets, "equivalence_max_abs_diff": diff, "floor": floor, "rows": rows,
               "bounds": b, "figure": figure}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {figure}")
    return summary


if __name__ == "__main__":
    main()
