"""Wall time of every sampling method on the current device (CPU or CUDA), side by side in one run.

``python -m sdegen.bench.device OUT [--quick]`` writes ``device.json``: for each method the time per
sample at a few batch sizes, with an MLP-sized random score network and the exact oracle score, on
``cuda`` when available. Ratios, not absolute times, are what to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..oracle import named_mixture
from ..sampling import METHODS, sample
from ..sdes import VPSDE
from ._methods import adaptive_methods, steps_for_nfe

# Settings chosen by hand; `_method_options` gives every other row of METHODS its default.
_CHOSEN = {
    "euler_maruyama": dict(steps=100),
    "reverse_diffusion": dict(steps=100),
    "ancestral": dict(steps=100),
    "pc": dict(steps=100),
    "ode_euler": dict(steps=100),
    "ode_heun": dict(steps=50),
    "heun_karras": dict(steps=25),
    "dpm_solver": dict(steps=20),
    "rk45": dict(rtol=1e-4, atol=1e-4),
    "torchdiffeq": dict(rtol=1e-4, atol=1e-4),
    "adaptive_sde": dict(rtol=1e-2, atol=1e-2),
}


def _method_options() -> dict[str, dict]:
    """Every row of METHODS with its settings: `_CHOSEN`, else about 100 evaluations (fixed-step methods,
    steps measured per method) or rtol = atol = 1e-4 (adaptive ODE) / 1e-2 (adaptive SDE)."""
    out = {}
    for method, spec in METHODS.items():
        if method in _CHOSEN:
            out[method] = _CHOSEN[method]
        elif spec.fixed_grid:
            out[method] = dict(steps=steps_for_nfe(method, 100))
        else:
            tol = 1e-2 if method in adaptive_methods(reverse_sde=True) else 1e-4
            out[method] = dict(rtol=tol, atol=tol)
    return out


class _MLPScore(torch.nn.Module):
    def __init__(self, d: int = 2, width: int = 256):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d + 1, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                       torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, d))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(out_dir: Path, quick: bool = False) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sde = VPSDE()
    gm = named_mixture("8gaussians", dtype=torch.float32, device=device)
    mlp = _MLPScore().to(device)
    scores = {"oracle": gm.score_fn(sde), "mlp": lambda x, t: mlp(x, t)}
    batches = [4096] if quick else [1024, 16384, 131072]
    rows = []
    with torch.no_grad():
        for bname, score in scores.items():
            for B in batches:
                x = torch.randn(B, 2, device=device)
                t = torch.full((B,), 0.5, device=device)
                for _ in range(3):
                    score(x, t)
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(50):
                    score(x, t)
                _sync(device)
                bare = (time.perf_counter() - t0) / 50
                for method, opts in _method_options().items():
                    gen = torch.Generator(device=device).manual_seed(0)
                    sample(sde, score, (B, 2), method=method, generator=gen, device=device, **opts)  # warm-up
                    _sync(device)
                    t0 = time.perf_counter()
                    res = sample(sde, score, (B, 2), method=method, generator=gen, device=device, **opts)
                    _sync(device)
                    wall = time.perf_counter() - t0
                    rows.append(dict(score=bname, batch=B, method=method, nfe=res.nfe, wall_s=wall,
                                     us_per_sample=1e6 * wall / B, overhead=wall / (res.nfe * bare)))
                    print(f"{bname:6s} B={B:7d} {method:18s} nfe={res.nfe:5d} wall={wall:8.4f}s "
                          f"overhead={wall / (res.nfe * bare):6.2f}", flush=True)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "rows": rows}
    (out_dir / "device.json").write_text(json.dumps(out, indent=1))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    run(a.out, quick=a.quick)


if __name__ == "__main__":
    main()
