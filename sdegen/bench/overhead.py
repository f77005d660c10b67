"""Per-step solver overhead at small batch, and native RK45 against scipy, on the CPU.

``python -m sdegen.bench.overhead`` prints, for each fixed-grid method, the time of a 500-step run
at batch 16 minus the time of its bare score calls, per step (best of 3, one thread), then the
wall time of ``rk45`` and ``scipy`` at the same tolerance for two score functions and two batch
sizes. Run it on an idle machine: these are microsecond figures.
"""

from __future__ import annotations

import time

import torch

from ..oracle import named_mixture
from ..sampling import sample
from ..sdes import VPSDE

FIXED = ("euler_maruyama", "ode_euler", "ode_heun", "ancestral", "reverse_diffusion", "dpm_solver", "heun_karras")


def _best(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def per_step_overhead(steps: int = 500, batch: int = 16) -> dict:
    """Microseconds per step spent outside the score function, per method."""
    sde = VPSDE()
    W = torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    score = lambda x, t: x @ W  # noqa: E731  (a trivially cheap score)
    x, t = torch.randn(batch, 2), torch.rand(batch)
    bare = _best(lambda: [score(x, t) for _ in range(2000)]) / 2000
    out = {}
    for m in FIXED:
        sample(sde, score, (batch, 2), method=m, steps=steps)  # warm-up
        res = sample(sde, score, (batch, 2), method=m, steps=steps)
        wall = _best(lambda: sample(sde, score, (batch, 2), method=m, steps=steps))
        out[m] = 1e6 * (wall - res.nfe * bare) / (len(res.times) - 1)
    return out


def rk45_vs_scipy(tol: float = 1e-4) -> list[dict]:
    """Wall time of ``rk45`` and ``scipy`` (solve_ivp RK45) at the same tolerance."""
    sde = VPSDE()
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))
    gm = named_mixture("8gaussians", dtype=torch.float32)
    scores = {"oracle": gm.score_fn(sde),
              "tiny-mlp": lambda x, t: -x + 0.01 * mlp(torch.cat([x, t[:, None]], 1))}
    rows = []
    with torch.no_grad():
        for name, score in scores.items():
            for B in (16, 4096):
                row = {"score": name, "batch": B}
                for m in ("rk45", "scipy"):
                    run = lambda: sample(sde, score, (B, 2), method=m, rtol=tol, atol=tol,  # noqa: E731
                                         generator=torch.Generator().manual_seed(0))
                    row[f"{m}_ms"] = 1e3 * _best(run)
                    row[f"{m}_nfe"] = run().nfe
                row["ratio"] = row["scipy_ms"] / row["rk45_ms"]
                rows.append(row)
    return rows


def main() -> None:
    torch.set_num_threads(1)
    for m, us in per_step_overhead().items():
        print(f"{m:18s} per-step overhead {us:7.1f} us (batch 16)")
    for r in rk45_vs_scipy():
        print(f"{r['score']:8s} B={r['batch']:5d} rk45 {r['rk45_ms']:7.1f} ms ({r['rk45_nfe']} NFE)  "
              f"scipy {r['scipy_ms']:7.1f} ms ({r['scipy_nfe']} NFE)  ratio {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
