r"""A user-written SDE in a few lines: the variance-preserving SDE with the cosine schedule.

Nichol & Dhariwal (2021, eq. 17) define $\bar\alpha(t) = f(t)/f(0)$ with
$f(t) = \cos^2\!\big(\tfrac{\pi}{2}\tfrac{t + c}{1 + c}\big)$. The VP SDE $dx = -\tfrac12\beta(t)x\,dt + \sqrt{\beta(t)}\,dw$
has $m(t)^2 = \bar\alpha(t)$ exactly when $\beta(t) = -\tfrac{d}{dt}\log\bar\alpha(t)
= \tfrac{\pi}{1+c}\tan\!\big(\tfrac{\pi}{2}\tfrac{t+c}{1+c}\big)$. Giving ``sdegen.AffineSDE`` the drift
coefficient $a = -\beta/2$ and the diffusion $g = \sqrt\beta$ is all it takes: sdegen computes the
marginal $x_t \mid x_0 \sim \mathcal N(m(t)x_0, s(t)^2 I)$ numerically, and the score model, the
training loss and every sampler use it.

The script checks the numerical $m(t)^2$ against $\bar\alpha(t)$, trains a small MLP on the two-moons
data under this SDE and samples it with a stochastic and two deterministic samplers.

Run:  python examples/custom_sde.py [--fast] [--out outputs/custom_sde]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

import sdegen
from sdegen import plotting
from sdegen.demo import sliced_wasserstein

C = 0.008   # Nichol & Dhariwal's offset: keeps beta(0) > 0
T = 0.98    # beta(t) -> infinity at t = 1; stop where m(T) ~ 0.03 (x_T is nearly pure noise)


def beta(t: torch.Tensor) -> torch.Tensor:
    return math.pi / (1 + C) * torch.tan(0.5 * math.pi * (t + C) / (1 + C))


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    f = lambda u: torch.cos(0.5 * math.pi * (u + C) / (1 + C)).square()  # noqa: E731
    return f(t) / f(torch.zeros_like(t))


# ----- the whole user-defined SDE -----
cosine_vp = sdegen.AffineSDE(a=lambda t: -0.5 * beta(t), g=lambda t: beta(t).sqrt(), T=T)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fast", action="store_true", help="a few training steps and few samples (seconds)")
    p.add_argument("--out", default="outputs/custom_sde", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    steps, n, hidden, depth = (30, 128, 32, 1) if args.fast else (6000, 2000, 128, 3)

    # 1. The numerical marginal matches the closed form it was designed to have.
    t = torch.linspace(0, T, 50, dtype=torch.float64)
    m, s = cosine_vp.marginal(t)
    err = (m.square() - alpha_bar(t)).abs().max().item()
    print(f"max |m(t)^2 - alpha_bar(t)| over [0, T]: {err:.2e};  s(T) = {s[-1].item():.4f}")

    # 2. Train a small MLP (eps-prediction) under the custom SDE.
    gen = torch.Generator().manual_seed(args.seed)
    data = sdegen.data.toy_2d("moons", 20000, generator=gen)
    torch.manual_seed(args.seed)
    model = sdegen.ScoreModel(sdegen.nn.MLP(2, hidden=hidden, depth=depth), cosine_vp, parameterization="eps")
    t0 = time.perf_counter()
    out = sdegen.train(model, data, steps=steps, batch_size=256, lr=2e-3, ema=0.995, seed=args.seed,
                       progress=not args.fast)
    print(f"trained {steps} steps in {time.perf_counter() - t0:.1f} s, final loss {out.history[-1]:.4f}")

    # 3. Sample with a stochastic and two deterministic samplers.
    runs = {"Euler-Maruyama (reverse SDE)": dict(method="euler_maruyama", steps=20 if args.fast else 500),
            "Heun (probability-flow ODE)": dict(method="ode_heun", steps=10 if args.fast else 50),
            "RK45 (probability-flow ODE)": dict(method="rk45", rtol=1e-3 if args.fast else 1e-4,
                                                atol=1e-3 if args.fast else 1e-4)}
    ref = sdegen.data.toy_2d("moons", n, generator=torch.Generator().manual_seed(args.seed + 1))
    panels = {"data (two moons)": ref}
    results = {}
    for label, kw in runs.items():
        with torch.no_grad():
            res = sdegen.sample(cosine_vp, out.model, (n, 2), generator=torch.Generator().manual_seed(args.seed),
                                **kw)
        d = sliced_wasserstein(res.samples, ref)
        results[label] = {"nfe": res.nfe, "sw2": d}
        panels[f"{label}\nNFE {res.nfe}, SW2 {d:.3f}"] = res.samples
        print(f"{label:30s} NFE {res.nfe:4d}  SW2 to data {d:.4f}")

    fig = _schedule_figure()
    files = [plotting.save(fig, os.path.join(args.out, "schedule.png"))]
    fig = plotting.scatter_panels(panels, lim=3.5, title="VP SDE with a cosine schedule, written by the user "
                                                        "(SW2 = sliced Wasserstein-2 to data)")
    files.append(plotting.save(fig, os.path.join(args.out, "samples.png")))
    print(f"wrote {', '.join(files)}")
    return {"marginal_error": err, "samplers": results, "files": files}


def _schedule_figure():
    """m(t) and s(t) of the cosine SDE against the linear VP SDE, on time scaled to [0, 1]."""
    import matplotlib.pyplot as plt

    u = torch.linspace(0, 1, 200, dtype=torch.float64)
    lin = sdegen.VPSDE()
    with plt.rc_context(plotting.STYLE):
        fig, ax = plt.subplots(figsize=(7.0, 3.2))
        for sde, name, ls in ((cosine_vp, "cosine (custom)", "-"), (lin, "linear VP", "--")):
            m, s = sde.marginal(u * sde.T)
            ax.plot(u, m, ls, color="C0", label=f"mean coef m(t), {name}")
            ax.plot(u, s, ls, color="C3", label=f"std s(t), {name}")
        ax.set_xlabel("t / T (forward time; data at 0, noise at 1)")
        ax.set_ylabel("coefficient")
        ax.set_title("Gaussian kernel $x_t | x_0 \\sim N(m\\,x_0, s^2 I)$")
        ax.legend(frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
