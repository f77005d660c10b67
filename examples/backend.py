r"""Using sdegen as a sampling backend for models trained elsewhere (runnable tour, CPU, seconds).

    python examples/backend.py                 # the tour: adapters, guidance, inpainting, chunked sampling
    python examples/backend.py --memory        # peak RSS of a chunked 1e6-sample run vs one unchunked batch

The "foreign models" here are exact ones built from sdegen's Gaussian-mixture oracle, so every
printed number can be checked against the truth; swap in your own network with the same signature.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import sdegen
from sdegen import adapters, guidance
from sdegen.chunked import sample_chunked
from sdegen.conditional import inpaint


def tour(n: int = 2000) -> dict:
    """Run the five backend uses; return the sample sets for the figure."""
    panels = {}
    gm = sdegen.named_mixture("8gaussians")
    g = torch.Generator().manual_seed(0)

    # 1. A discrete eps-model with its own beta schedule, called as eps_model(x, step) with
    #    diffusers-style steps 0..N-1 (first_step=0). Here: the exact eps of the mixture.
    betas = torch.linspace(1e-4, 0.05, 200, dtype=torch.float64)
    sde_ref = adapters.DiscreteVPSDE(betas)

    def eps_model(x, step):
        t = (step.to(x.dtype) + 1) / 200                      # the adapter's time map, inverted
        return -sde_ref.marginal(t)[1][:, None] * gm.score(x, t, sde_ref)

    sde, score_fn = adapters.from_discrete_eps(eps_model, betas, first_step=0)
    res = sdegen.sample(sde, score_fn, (n, 2), method="ancestral", steps=199, eps=1 / 200, generator=g,
                        dtype=torch.float64)
    radius = res.samples.norm(dim=1)
    panels[f"eps-model adapter\nancestral, {res.nfe} NFE"] = res.samples
    print(f"[eps adapter]  ancestral, {res.nfe} NFE: mean radius {radius.mean():.3f} (exact 2.0 + O(std^2))")

    # 2. An EDM-style denoiser D(x, sigma): the exact one of the mixture under the VE SDE.
    def denoiser(x, sigma):
        sde_ve = sdegen.VESDE(0.002, 80.0)
        t = sde_ve.t_from_sigma(sigma)
        return x + sigma[:, None] ** 2 * gm.score(x, t, sde_ve)

    sde_ve, score_ve = adapters.from_denoiser(denoiser, 0.002, 80.0)
    t_min = float(sde_ve.t_from_sigma(torch.tensor(0.002)))
    res = sdegen.sample(sde_ve, score_ve, (n, 2), method="ode_heun", steps=60, eps=t_min, generator=g,
                        dtype=torch.float64)
    panels[f"EDM denoiser adapter\nHeun, {res.nfe} NFE"] = res.samples
    print(f"[denoiser]     probability-flow Heun from t_min={t_min:.4f}: mean radius "
          f"{res.samples.norm(dim=1).mean():.3f}")

    # 3. Classifier-free guidance with a label passed as model_kwargs: class 0 = the 4 upper modes.
    vp = sdegen.VPSDE()
    upper = sdegen.GaussianMixture(gm.means[gm.means[:, 1] > 0.1], stds=0.2)

    def cond_score(x, t, y=None):
        return gm.score(x, t, vp) if y is None else upper.score(x, t, vp)

    guided = guidance.classifier_free(cond_score, scale=1.0, null_kwargs={"y": None})
    res = sdegen.sample(vp, guided, (n // 2, 2), method="reverse_diffusion", steps=200, generator=g,
                        dtype=torch.float64, model_kwargs={"y": 0})
    panels["classifier-free guidance\nclass 0 (upper modes)"] = res.samples
    print(f"[guidance]     fraction of class-0 samples in the upper half: {(res.samples[:, 1] > 0).double().mean():.3f}")

    # 4. Inpainting: know x_0 = 2 (the right-most mode column), sample x_1 | x_0 with the SMC sampler.
    x_known = torch.zeros(n // 4, 2, dtype=torch.float64)
    x_known[:, 0] = 1.41
    res = inpaint(vp, gm.score_fn(vp), x_known, torch.tensor([[1, 0]]), method="smc", steps=100, particles=16,
                  generator=g)
    panels["inpainting (SMC)\nx1 given x0 = 1.41"] = res.samples
    print(f"[inpaint/smc]  x1 | x0=1.41: fraction above 0 = {(res.samples[:, 1] > 0).double().mean():.3f} "
          f"(exact 0.5 by symmetry), {res.stats['resampling_steps']} resampling steps")

    # 5. A large job in chunks, streamed to disk.
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "samples.npy")
        res = sample_chunked(vp, gm.score_fn(vp), 10 * n, (2,), batch_size=5000, method="euler_maruyama", steps=50,
                             seed=1, out=out)
        import numpy as np

        arr = np.load(out, mmap_mode="r")
        print(f"[chunked]      {arr.shape} written in {res.seconds:.1f}s over {len(res.chunks)} chunks, "
              f"{res.nfe} NFE")
    return panels


def save_figure(panels: dict, out: str) -> str:
    """Scatter every sample set over the 8-gaussians density and save ``<out>/backend.png``."""
    from sdegen import plotting

    gm = sdegen.named_mixture("8gaussians")
    fig = plotting.scatter_panels(panels, log_prob=gm.log_prob, lim=3.0, ncols=4)
    os.makedirs(out, exist_ok=True)
    return plotting.save(fig, os.path.join(out, "backend.png"))


# ---------------------------------------------------------------------------------------------- memory figure
def _peak_rss_mb() -> float:
    # ru_maxrss is the process's peak resident set size, in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(n: int, batch_size: int, steps: int, out: str) -> dict:
    """One measured run in a fresh process: import, warm up, then the full job."""
    gm = sdegen.named_mixture("8gaussians", dtype=torch.float32)
    sde = sdegen.VPSDE()
    sample_chunked(sde, gm.score_fn(sde), 64, (2,), batch_size=64, method="euler_maruyama", steps=2, seed=0)
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    res = sample_chunked(sde, gm.score_fn(sde), n, (2,), batch_size=batch_size, method="euler_maruyama",
                         steps=steps, seed=0, out=out)
    return {"n": n, "batch_size": batch_size, "steps": steps, "baseline_peak_rss_mb": round(base, 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "seconds": round(time.perf_counter() - t0, 1),
            "nfe": res.nfe, "output_mb": round(os.path.getsize(out) / 2**20, 1)}


def memory(n: int, batch_size: int, steps: int, json_path: str | None, compare: bool) -> dict:
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        sizes = [batch_size] + ([n] if compare else [])
        for bs in sizes:
            cmd = [sys.executable, __file__, "--memory-child", str(n), str(bs), str(steps), os.path.join(d, f"{bs}.npy")]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs["chunked" if bs == batch_size else "one_batch"] = json.loads(out.strip().splitlines()[-1])
    if compare:
        runs["ratio_peak_one_batch_over_chunked"] = round(runs["one_batch"]["peak_rss_mb"] / runs["chunked"]["peak_rss_mb"], 2)
    print(json.dumps(runs, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(runs, f, indent=2)
    return runs


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        n, bs, steps, out = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        print(json.dumps(memory_child(n, bs, steps, out)))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory", action="store_true", help="measure peak RSS of a chunked run")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--compare", action="store_true", help="also run the whole job as one batch")
    p.add_argument("--json", default=None, help="write the memory figures here")
    p.add_argument("--fast", action="store_true", help="fewer samples (for the test suite)")
    p.add_argument("--out", default="outputs/backend", help="folder for the figure")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.memory:
        memory(args.n, args.batch_size, args.steps, args.json, args.compare)
    else:
        path = save_figure(tour(n=400 if args.fast else 2000), args.out)
        print(f"figure: {path}")


if __name__ == "__main__":
    main()
