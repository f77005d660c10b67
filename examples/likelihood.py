r"""Exact log-likelihoods through the probability-flow ODE, and bits per dimension.

For a data point $x$, integrating the probability-flow ODE $dx/dt = \tilde f(x, t)$ from $t = \epsilon$
to $T$ together with the divergence of its drift gives (Song et al. 2021, eq. 39)

$$\log p_\epsilon(x) = \log p_T(x_T) + \int_\epsilon^T \nabla\cdot\tilde f(x_t, t)\,dt .$$

Three parts:

1. **Exact score, 2-D mixture.** With the oracle's exact score the only error is the ODE solver's,
   so the result must match the mixture's own density; the prior term $\log p_T$ is taken either
   from the true $p_T$ or from the SDE's $\mathcal N(0, I)$ (which costs a small, visible bias).
2. **Bits per dimension of 8×8 digits** under a Gaussian model fitted to the training digits (a
   one-component "mixture", so its score is exact in 64-D): the ODE with the Hutchinson divergence
   estimate against the closed-form density, after uniform dequantization.
3. **A trained model**: an MLP score model's negative log-likelihood on held-out data against the
   same points shifted off the data.

Run:  python examples/likelihood.py [--fast] [--out outputs/likelihood]
"""

from __future__ import annotations

import argparse
import math
import os

import torch

import sdegen
from sdegen import plotting


def part1_exact_score(n: int, tol: float, seed: int) -> dict:
    sde = sdegen.VPSDE()
    gm = sdegen.named_mixture("8gaussians")                      # float64
    x = gm.sample(n, generator=torch.Generator().manual_seed(seed))
    eps = 1e-5
    p_T = gm.perturbed(sde, sde.T)                               # the exact marginal at T
    exact = sdegen.log_likelihood(sde, gm.score_fn(sde), x, rtol=tol, atol=tol, eps=eps, prior=p_T.log_prob)
    approx = sdegen.log_likelihood(sde, gm.score_fn(sde), x, rtol=tol, atol=tol, eps=eps)  # prior N(0, I)
    hutch = sdegen.log_likelihood(sde, gm.score_fn(sde), x, rtol=tol, atol=tol, eps=eps, prior=p_T.log_prob,
                                  divergence="hutchinson", generator=torch.Generator().manual_seed(seed + 1))
    truth = gm.log_prob_t(x, eps, sde)
    out = {
        "truth": truth, "ode": exact.log_prob,
        "max_abs_error_exact_prior": (exact.log_prob - truth).abs().max().item(),
        "mean_bias_sde_prior": (approx.log_prob - truth).mean().item(),
        "hutchinson_mean_error": (hutch.log_prob - truth).mean().item(),
        "hutchinson_se": ((hutch.log_prob - truth).std() / math.sqrt(n)).item(),
        "nfe": exact.nfe,
    }
    print(f"[1] 8 gaussians, exact score, {n} points, rtol=atol={tol:g}, NFE {exact.nfe}")
    print(f"    max |ODE - true log p|, exact p_T prior:   {out['max_abs_error_exact_prior']:.2e} nats")
    print(f"    mean (ODE - true) with the N(0, I) prior:  {out['mean_bias_sde_prior']:+.2e} nats")
    print(f"    Hutchinson (1 probe) mean error:          {out['hutchinson_mean_error']:+.3f} "
          f"+- {out['hutchinson_se']:.3f} (standard error)")
    return out


def part2_digits_bpd(n: int, tol: float, seed: int) -> dict:
    x_train, _ = sdegen.data.digits("train", dtype=torch.float64)
    x_test, _ = sdegen.data.digits("test", dtype=torch.float64)
    flat = x_train.reshape(len(x_train), -1)
    cov = torch.cov(flat.T) + 1e-2 * torch.eye(64, dtype=torch.float64)   # ridge: some pixels are constant
    gauss = sdegen.GaussianMixture(flat.mean(0, keepdim=True), covs=cov[None])
    # Store the digits as 8-bit images (values on the 256-level grid of [-1, 1]), then dequantize.
    x8 = (((x_test[:n] + 1) / 2 * 255).round() / 255 * 2 - 1)
    y = sdegen.likelihood.dequantize(x8, generator=torch.Generator().manual_seed(seed))
    sde = sdegen.VPSDE()
    # The oracle accepts images (B, 1, 8, 8) as 64-vectors; its exact p_T isolates the solver error.
    res = sdegen.log_likelihood(sde, gauss.score_fn(sde), y, divergence="hutchinson", rtol=tol, atol=tol,
                                prior=gauss.perturbed(sde, sde.T).log_prob,
                                generator=torch.Generator().manual_seed(seed + 2))
    bpd_ode = sdegen.bits_per_dim(res.log_prob, y)
    bpd_true = sdegen.bits_per_dim(gauss.log_prob(y), y)
    out = {"n": n, "bpd_ode": bpd_ode.mean().item(), "bpd_true": bpd_true.mean().item(), "nfe": res.nfe,
           "bpd_se": (bpd_ode.std() / math.sqrt(n)).item() if n > 1 else float("nan")}
    print(f"[2] digits (64-D), Gaussian model, {n} test images, Hutchinson, NFE {res.nfe}")
    print(f"    bits/dim by the ODE {out['bpd_ode']:.3f} (+- {out['bpd_se']:.3f}),  exact {out['bpd_true']:.3f}")
    return out


def part3_trained(n: int, steps: int, tol: float, seed: int, hidden: int = 128, depth: int = 3) -> dict:
    sde = sdegen.VPSDE()
    gm = sdegen.named_mixture("8gaussians", dtype=torch.float32)
    data = gm.sample(20000, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    model = sdegen.ScoreModel(sdegen.nn.MLP(2, hidden=hidden, depth=depth), sde)
    out = sdegen.train(model, data, steps=steps, batch_size=256, lr=2e-3, ema=0.995, seed=seed, progress=False)
    held_out = gm.sample(n, generator=torch.Generator().manual_seed(seed + 3))
    shifted = held_out + torch.tensor([1.0, 1.0])                 # half-way between components
    nll = {}
    for name, x in (("held-out data", held_out), ("shifted data", shifted)):
        # eps = 1e-3: a learned eps-model's score -eps_hat/s(t) is stiff as s(t) -> 0.
        res = sdegen.log_likelihood(sde, out.model, x, rtol=tol, atol=tol, eps=1e-3)
        nll[name] = -res.log_prob.detach()
    true_nll = -gm.log_prob_t(held_out, 1e-3, sde).mean().item()
    print(f"[3] trained MLP ({steps} steps): NLL held-out {nll['held-out data'].mean():.3f}, "
          f"shifted {nll['shifted data'].mean():.3f} nats (true NLL of held-out {true_nll:.3f})")
    return {"nll": nll, "true_nll": true_nll}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fast", action="store_true", help="few points, loose tolerances, short training (seconds)")
    p.add_argument("--out", default="outputs/likelihood", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.fast:
        r1 = part1_exact_score(16, 1e-4, args.seed)
        r2 = part2_digits_bpd(4, 1e-3, args.seed)
        r3 = part3_trained(16, 30, 1e-3, args.seed, hidden=32, depth=1)
    else:
        r1 = part1_exact_score(500, 1e-6, args.seed)
        r2 = part2_digits_bpd(100, 1e-5, args.seed)
        r3 = part3_trained(500, 6000, 1e-5, args.seed)
    figure = plotting.save(_figure(r1, r2, r3), os.path.join(args.out, "likelihood.png"))
    print(f"wrote {figure}")
    return {"exact_score": {k: v for k, v in r1.items() if not torch.is_tensor(v)}, "digits": r2,
            "trained_true_nll": r3["true_nll"], "figure": figure}


def _figure(r1, r2, r3):
    import matplotlib.pyplot as plt
    import numpy as np

    with plt.rc_context(plotting.STYLE):
        fig, (a, b, c) = plt.subplots(1, 3, figsize=(11.0, 3.4))
        t, o = plotting.to_numpy(r1["truth"]), plotting.to_numpy(r1["ode"])
        a.plot([t.min(), t.max()], [t.min(), t.max()], color="0.6", lw=0.8, label="y = x")
        a.scatter(t, o, s=6, c="C3", label="data points")
        a.set_xlabel("true log p(x) (nats)")
        a.set_ylabel("ODE log-likelihood (nats)")
        a.set_title(f"2-D mixture, exact score: max |error| {r1['max_abs_error_exact_prior']:.1e} nats")
        a.legend(frameon=False)
        allv = np.concatenate([plotting.to_numpy(v) for v in r3["nll"].values()])
        bins = np.linspace(allv.min(), allv.max(), 40)          # shared bins: the two histograms compare
        for name, v in r3["nll"].items():
            b.hist(plotting.to_numpy(v), bins=bins, alpha=0.6, label=f"{name} (mean {float(v.mean()):.2f})")
        b.axvline(r3["true_nll"], color="k", ls="--", lw=0.8, label="true NLL, held-out")
        b.set_xlabel("negative log-likelihood (nats)")
        b.set_ylabel("count")
        b.set_title("trained MLP score model")
        b.legend(frameon=False, fontsize=7)
        vals = [r2["bpd_true"], r2["bpd_ode"]]
        c.bar([0, 1], vals, yerr=[0, r2["bpd_se"]], color=["0.6", "C0"], capsize=4)
        c.set_xticks([0, 1], ["closed form", "probability-flow ODE\n(Hutchinson)"])
        for k, v in enumerate(vals):
            c.text(k, v, f"{v:.2f}", ha="center", va="bottom")
        c.set_ylabel("bits / dim")
        c.set_title(f"{r2['n']} test digits (8-bit, dequantized), Gaussian model")
        c.set_ylim(0, max(vals) * 1.2 if np.isfinite(max(vals)) else 1)
        fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
