r"""Train an MLP score model on a 2-D data set (CPU), sample with RK45 and PC, and compare with the data.

Usage::

    python examples/train_2d.py --data 8gaussians --out outputs/train_2d
    python examples/train_2d.py --fast --out /tmp/train_2d

Writes ``samples_2d.png`` (data and each sampler's samples side by side) and ``metrics.json``: the
training time, each sampler's NFE and the two-sample distance (unbiased Gaussian-kernel MMD², bandwidth:
``--bandwidth``, default 0.25, the scale of the mixture components) to a fresh data draw, next to the same distance between two
independent data draws (the floor) and for the N(0, I) prior (the ceiling).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import sdegen
from sdegen.data import TOY_2D, median_bandwidth, mmd2, toy_2d
from sdegen.nn import MLP

SAMPLERS = {"rk45": dict(method="rk45", rtol=1e-4, atol=1e-4),
            # annealed_langevin: step 2 alpha (snr * s(t))^2. The "langevin" corrector's per-sample step
            # 2 alpha (snr |z| / |score|)^2 explodes in 2-D wherever a sample's score is near zero.
            "pc": dict(method="pc", steps=500, predictor="reverse_diffusion", corrector="annealed_langevin", snr=0.16)}


def train_and_sample(data_name="8gaussians", *, steps=3000, n=2000, seed=0, fast=False, bandwidth=0.25) -> dict:
    """Train the MLP, draw ``n`` samples with every sampler in :data:`SAMPLERS`; return a dict of results."""
    gen = torch.Generator().manual_seed(seed)
    data = toy_2d(data_name, 20000, generator=gen)
    torch.manual_seed(seed)
    model = sdegen.ScoreModel(MLP(2, hidden=128, depth=3), sdegen.VPSDE(), "eps")
    t0 = time.perf_counter()
    res = sdegen.train(model, data, steps=steps, batch_size=512, lr=2e-3, warmup=100, ema=0.995, seed=seed,
                       progress=False)
    train_time = time.perf_counter() - t0
    fresh = toy_2d(data_name, n, generator=gen)
    other = toy_2d(data_name, n, generator=gen)
    # The median heuristic (about 2.8 for 8gaussians) blurs the modes together; a width at the scale of
    # the structure (component std 0.2) makes the distance see mode shape and leakage between modes.
    h = median_bandwidth(fresh) if bandwidth is None else bandwidth
    out = {"data": data_name, "train_steps": steps, "train_time_s": train_time, "bandwidth": h,
           "mmd2_data_vs_data": mmd2(other, fresh, bandwidth=h),
           "mmd2_prior_vs_data": mmd2(torch.randn(n, 2, generator=gen), fresh, bandwidth=h),
           "samplers": {}, "_samples": {}, "_data": fresh}
    for name, opts in SAMPLERS.items():
        opts = dict(opts)
        if fast and "steps" in opts:
            opts["steps"] = 50
        t0 = time.perf_counter()
        r = sdegen.sample(res.model.sde, res.model, (n, 2), generator=torch.Generator().manual_seed(seed + 1), **opts)
        # Off-support share: samples farther than 0.5 from every training point (MMD with a narrow kernel
        # barely sees a few far outliers, so count them).
        off = torch.cdist(r.samples.double(), data.double()).min(1).values > 0.5
        out["samplers"][name] = {"nfe": r.nfe, "time_s": time.perf_counter() - t0,
                                 "mmd2_vs_data": mmd2(r.samples, fresh, bandwidth=h),
                                 "off_support_share": float(off.double().mean())}
        out["_samples"][name] = r.samples
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="8gaussians", choices=list(TOY_2D))
    p.add_argument("--out", default="outputs/train_2d")
    p.add_argument("--fast", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bandwidth", type=float, default=0.25, help="MMD kernel width (<= 0: median heuristic)")
    args = p.parse_args(argv)
    res = train_and_sample(args.data, steps=args.steps or (100 if args.fast else 3000),
                           n=500 if args.fast else 2000, seed=args.seed, fast=args.fast,
                           bandwidth=args.bandwidth if args.bandwidth > 0 else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in res.items() if not k.startswith("_")}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("data", res["_data"], None)] + [(k, v, res["samplers"][k]) for k, v in res["_samples"].items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2), sharex=True, sharey=True)
    lo, hi = float(res["_data"].min()) - 0.5, float(res["_data"].max()) + 0.5
    for ax, (name, pts, info) in zip(axes, panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        title = name if info is None else (f"{name}: NFE {info['nfe']}, MMD² {info['mmd2_vs_data']:.1e}, "
                                           f"off-support {100 * info['off_support_share']:.1f}%")
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
    fig.suptitle(f"MLP on {args.data}: {metrics['train_steps']} steps in {metrics['train_time_s']:.0f} s; "
                 f"MMD² data vs data {metrics['mmd2_data_vs_data']:.1e}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "samples_2d.png", dpi=100)
    plt.close(fig)
    print(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    main()
