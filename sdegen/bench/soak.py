r"""Soak test: sample and compute likelihoods for many batches; memory must not grow, no graph may leak.

One iteration draws a batch with each of several samplers (reverse SDE, probability-flow ODE,
predictor–corrector, adaptive RK45, per-sample seeded noise) from a small MLP score model, and
computes exact and Hutchinson log-likelihoods of a data batch (which differentiate through the
model). After a warm-up (allocator pools, lazy imports, caches), we record per iteration:

* the resident set size (RSS, ``psutil``) of this process;
* the number of live ``torch.Tensor`` objects seen by the garbage collector;
* whether any result still carries an autograd graph (``requires_grad`` or ``grad_fn``), whether a
  weak reference to a result survives ``del`` (a reference cycle holding a graph would keep it
  alive), and whether model parameters received ``.grad`` (a likelihood must not accumulate
  gradients into the model).

Memory growth is the RSS difference between the first and last iteration after warm-up, and the
slope of a least-squares line through the per-iteration RSS (MiB per iteration), which is robust
to one-off allocator jumps. A separate section times the noise sources at batch 1,000 side by side:
`PerSampleNoise` against ``torch.randn`` and one ``torch.Generator`` per sample.

Writes ``soak.json`` and ``soak.png`` to ``out_dir``.
"""

from __future__ import annotations

import gc
import json
import pathlib
import platform
import sys
import time
import warnings
import weakref

import torch

__all__ = ["run"]


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():   # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _model(seed: int = 0):
    import sdegen

    torch.manual_seed(seed)
    net = sdegen.nn.MLP(2, hidden=64, depth=2)
    return sdegen.ScoreModel(net, sdegen.VPSDE()).eval()


def _iteration(model, data, it: int, batch: int, steps: int) -> dict:
    import sdegen
    from sdegen._rng import PerSampleNoise

    sde = model.sde
    gen = torch.Generator().manual_seed(it)
    leaks = {"requires_grad": 0, "weakref_alive": 0}
    results = []
    # Deliberately one method per code path, not every row of sdegen.METHODS: the soak looks for memory
    # growth and graph leaks, which live in the paths (the fixed-grid loop with a stochastic and a
    # deterministic step, the corrector, the adaptive integrator, per-sample seeds, the likelihood), and
    # it runs for a long time; every row is timed and checked by `sdegen bench samplers`.
    for method, kw in (("euler_maruyama", {"steps": steps}), ("ode_heun", {"steps": steps}),
                       ("pc", {"steps": steps}), ("rk45", {"rtol": 1e-3, "atol": 1e-3})):
        results.append(sdegen.sample(sde, model, (batch, 2), method=method, generator=gen, **kw).samples)
    seeds = PerSampleNoise.from_offset(it * batch, batch, (batch, 2))
    results.append(sdegen.sample(sde, model, (batch, 2), method="euler_maruyama", steps=steps, seeds=seeds).samples)
    for div in ("exact", "hutchinson"):
        results.append(sdegen.log_likelihood(sde, model, data, divergence=div, rtol=1e-3, atol=1e-3, eps=1e-3,
                                             generator=gen).log_prob)
    finite = all(bool(torch.isfinite(r).all()) for r in results)
    for r in results:
        if r.requires_grad or r.grad_fn is not None:
            leaks["requires_grad"] += 1
    refs = [weakref.ref(r) for r in results]
    del results, r
    gc.collect()
    leaks["weakref_alive"] = sum(ref() is not None for ref in refs)
    leaks["param_grads"] = sum(p.grad is not None for p in model.parameters())
    leaks["finite"] = finite
    return leaks


def _noise_timing(batch: int, shape_d: tuple[int, ...], repeats: int) -> dict:
    """Seconds per draw (best of ``repeats``) of (batch, *shape_d) unit normals by three mechanisms,
    side by side on one CPU thread (so that other load on the machine distorts the ratios least)."""
    from sdegen._rng import PerSampleNoise

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _noise_timing_1(batch, shape_d, repeats)
    finally:
        torch.set_num_threads(threads)


def _noise_timing_1(batch: int, shape_d: tuple[int, ...], repeats: int) -> dict:
    from sdegen._rng import PerSampleNoise

    shape = (batch, *shape_d)
    noise = PerSampleNoise.from_offset(0, batch, shape)
    gen = torch.Generator().manual_seed(0)
    gens = [torch.Generator().manual_seed(k) for k in range(batch)]

    def per_sample_generators():
        return torch.stack([torch.randn(shape_d, generator=g) for g in gens])

    candidates = {"per_sample_noise": lambda i: noise(i), "randn": lambda i: torch.randn(shape, generator=gen),
                  "generator_per_sample": lambda i: per_sample_generators()}
    best = {}
    for name, fn in candidates.items():
        fn(0)   # warm-up
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    return {"shape": list(shape), "threads": 1, "seconds": best,
            "ratio_per_sample_noise_over_randn": best["per_sample_noise"] / best["randn"],
            "ratio_generator_per_sample_over_randn": best["generator_per_sample"] / best["randn"]}


def _slope(y: list[float]) -> float:
    n = len(y)
    if n < 2:
        return 0.0
    xm, ym = (n - 1) / 2, sum(y) / n
    num = sum((i - xm) * (v - ym) for i, v in enumerate(y))
    den = sum((i - xm) ** 2 for i in range(n))
    return num / den


def _plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rss = result["rss_mib"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(range(len(rss)), rss, marker=".", lw=1)
    ax[0].axvline(result["config"]["warmup"] - 0.5, color="grey", ls="--", lw=0.8, label="end of warm-up")
    ax[0].set_xlabel("iteration")
    ax[0].set_ylabel("RSS (MiB)")
    ax[0].set_title(f"RSS, growth {result['growth_mib']:+.1f} MiB after warm-up")
    ax[0].legend(frameon=False)
    live = result["live_tensors"]
    ax[1].plot(range(len(live)), live, marker=".", lw=1, color="C1")
    ax[1].set_xlabel("iteration")
    ax[1].set_ylabel("live torch.Tensor objects")
    ax[1].set_title("live tensors (gc)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(out_dir, quick: bool = False) -> dict:
    r"""Run the soak loop, write ``soak.json`` and ``soak.png`` to ``out_dir``, return the summary.

    Args:
        out_dir: output folder (created).
        quick: 6 iterations after 2 warm-up ones, batch 64 (a smoke run); otherwise 40 after 5,
            batch 256.

    Returns:
        ``{"iterations", "rss_before_mib", "rss_after_mib", "growth_mib", "slope_mib_per_iter",
        "live_tensor_growth", "leaked_graphs", "alive_after_del", "param_grads", "all_finite",
        "noise_timing", "files"}``.
    """
    import sdegen

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    warmup, iters = (2, 6) if quick else (5, 40)
    batch, steps = (64, 10) if quick else (256, 20)
    model = _model()
    data = sdegen.named_mixture("8gaussians", dtype=torch.float32).sample(
        batch // 4, generator=torch.Generator().manual_seed(1))
    rss, live, leaks = [], [], []
    t0 = time.perf_counter()
    for it in range(warmup + iters):
        leaks.append(_iteration(model, data, it, batch, steps))
        rss.append(_rss_mib())
        live.append(_live_tensors())
    wall = time.perf_counter() - t0
    after = rss[warmup:]
    result = {
        "config": {"warmup": warmup, "iterations": iters, "batch": batch, "steps": steps, "quick": quick,
                   "methods": ["euler_maruyama", "ode_heun", "pc", "rk45", "euler_maruyama+seeds",
                               "log_likelihood exact", "log_likelihood hutchinson"],
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "python": sys.version.split()[0], "machine": platform.machine()},
        "rss_mib": rss,
        "live_tensors": live,
        "rss_before_mib": after[0],
        "rss_after_mib": after[-1],
        "growth_mib": after[-1] - after[0],
        "slope_mib_per_iter": _slope(after),
        "live_tensor_growth": live[-1] - live[warmup],
        "leaked_graphs": sum(x["requires_grad"] for x in leaks),
        "alive_after_del": sum(x["weakref_alive"] for x in leaks),
        "param_grads": max(x["param_grads"] for x in leaks),
        "all_finite": all(x["finite"] for x in leaks),
        "wall_s": wall,
        "noise_timing": _noise_timing(1000, (3, 32, 32) if not quick else (3, 8, 8), 3 if quick else 5),
    }
    with open(out / "soak.json", "w") as f:
        json.dump(result, f, indent=2)
    _plot(result, out / "soak.png")
    keys = ("rss_before_mib", "rss_after_mib", "growth_mib", "slope_mib_per_iter", "live_tensor_growth",
            "leaked_graphs", "alive_after_del", "param_grads", "all_finite", "wall_s")
    summary = {k: result[k] for k in keys}
    summary["iterations"] = iters
    summary["noise_timing"] = result["noise_timing"]
    summary["files"] = [str(out / "soak.json"), str(out / "soak.png")]
    return summary


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="soak test: memory and graph leaks over many batches")
    parser.add_argument("out", nargs="?", default="bench_results")
    parser.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    print(json.dumps(run(pathlib.Path(a.out), quick=a.quick), indent=2))
