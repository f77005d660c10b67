r"""Langevin corrector benchmark: sliced W2 / noise floor of ``pc`` with each corrector rule.

Problems (exact Gaussian-mixture scores, so every error is the sampler's; VP SDE, ``T = 1``):
``8gaussians`` (2-D), ``mixture16`` (16-D), ``mixture64`` (64-D), see
[`named_mixture`][sdegen.oracle.named_mixture]. Rows: ``pc`` (reverse-diffusion predictor, one corrector
step per step) with ``corrector="langevin"`` (default, ``data_std=0``), ``"langevin"`` with
``data_std`` set to the mixture's smallest smoothing scale (0.2 for ``8gaussians``, $\sqrt{0.02}$ for
the random mixtures, whose covariances are $0.1AA^\top + 0.02I$), ``"annealed_langevin"``, the paper's
``"langevin_batch"``, the removed per-sample rule $2\alpha(r\sqrt d/\lVert s_b\rVert)^2$ for reference
(registered for the run only), and ``euler_maruyama`` at the same number of steps and at the same NFE.

Metric: sliced Wasserstein-2 ([`sliced_wasserstein`][sdegen.bench._metrics.sliced_wasserstein]) of
``n`` samples to a fixed exact reference of ``4n`` draws, divided by the noise floor (the same distance
for ``n`` independent exact draws): about 1 means indistinguishable at that sample size. Also the
relative error of the mean per-coordinate variance, $\overline{\mathrm{var}}(x_j)/\overline{\Sigma_{jj}} - 1$
(standard error about $\sqrt{2/(nd)}$ for near-Gaussian coordinates), and for ``8gaussians`` the largest
sample norm (the data lie within radius 3).

Writes ``langevin.json`` and ``langevin.md`` (the table in docs/samplers.md) to ``OUT``. One thread,
float64, a few minutes: ``python -m sdegen.bench.langevin OUT [--quick]``.
"""

from __future__ import annotations

import json
import math
import pathlib
import platform
import sys
import time

from dataclasses import dataclass

import torch

from .. import VPSDE, named_mixture
from .. import sampling
from ..sampling import sample
from ..solvers.correctors import AbstractCorrector, _langevin_update
from ._metrics import sliced_wasserstein

__all__ = ["run"]

#: name -> (n samples, steps, smallest smoothing scale of the data)
PROBLEMS = {"8gaussians": (4000, 250, 0.2), "mixture16": (2000, 250, math.sqrt(0.02)),
            "mixture64": (1000, 200, math.sqrt(0.02))}


_OLD = "_per_sample_reference"


@dataclass(frozen=True)
class _PerSampleSNR(AbstractCorrector):
    """The removed rule, eps_b = 2 alpha (r sqrt(d)/||s_b||)^2 (zero score: zero step), for the table only."""

    snr: float = 0.16

    def correct(self, dyn, x, t, alpha, noise):
        score = dyn.score(x, t)
        sq = score.flatten(1).square().sum(1)
        step = torch.reciprocal(sq).mul_(2 * self.snr**2 * x[0].numel()).mul_(alpha).nan_to_num_(posinf=0.0)
        return _langevin_update(x, score, step, noise)


def _rows(steps: int, sigma: float):
    """(label, method options, steps) for one problem."""
    pc = {"method": "pc", "snr": 0.16}
    return [
        ("pc, langevin", {**pc, "corrector": "langevin"}, steps),
        (f"pc, langevin, data_std={sigma:.3g}", {**pc, "corrector": "langevin", "data_std": sigma}, steps),
        ("pc, annealed_langevin", {**pc, "corrector": "annealed_langevin"}, steps),
        ("pc, langevin_batch (paper)", {**pc, "corrector": "langevin_batch"}, steps),
        ("pc, old per-sample rule (removed)", {**pc, "corrector": _OLD}, steps),
        ("euler_maruyama, same steps", {"method": "euler_maruyama"}, steps),
        ("euler_maruyama, same NFE", {"method": "euler_maruyama"}, 2 * steps),
    ]


def run(out_dir, quick: bool = False) -> dict:
    """Run every problem and row; write ``langevin.json`` and ``langevin.md``; return the result dict."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sampling._CORRECTORS[_OLD] = _PerSampleSNR        # for this run only; removed in `finally`
    try:
        sde = VPSDE()
        result = {"sde": "VPSDE(T=1)", "snr": 0.16, "quick": quick, "torch": torch.__version__,
                  "machine": platform.processor() or platform.machine(), "problems": {}}
        for name, (n, steps, sigma) in PROBLEMS.items():
            if quick:
                n, steps = n // 4, steps // 5
            gm = named_mixture(name)
            ref = gm.sample(4 * n, generator=torch.Generator().manual_seed(1))
            floor = sliced_wasserstein(gm.sample(n, generator=torch.Generator().manual_seed(2)), ref)
            var = float(gm.covariance().diagonal().mean())
            rows = []
            for label, opts, k in _rows(steps, sigma):
                t0 = time.perf_counter()
                res = sample(sde, gm.score_fn(sde), (n, gm.dim), steps=k, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(0), **opts)
                wall = time.perf_counter() - t0
                w2 = sliced_wasserstein(res.samples, ref)
                var_err = float(res.samples.var(0).mean() / var - 1)
                rows.append({"row": label, "steps": k, "nfe": res.nfe, "sliced_w2": w2, "ratio": w2 / floor,
                             "rel_var_err": var_err, "max_norm": float(res.samples.norm(dim=1).max()),
                             "seconds": wall})
                print(f"{name:10s} {label:34s} W2/floor {w2 / floor:8.2f}  var {100 * var_err:+8.1f} %  "
                      f"max|x| {rows[-1]['max_norm']:7.2f}  ({wall:.1f} s)", flush=True)
            result["problems"][name] = {"dim": gm.dim, "n": n, "steps": steps, "floor": floor, "rows": rows}
    finally:
        torch.set_num_threads(threads)
        sampling._CORRECTORS.pop(_OLD, None)
    (out / "langevin.json").write_text(json.dumps(result, indent=1))
    (out / "langevin.md").write_text(_table(result))
    return result


def _table(result: dict) -> str:
    """Markdown: one row per sampler, one column per problem (W2/floor / variance error, max |x| in 2-D)."""
    probs = result["problems"]
    names = list(probs)
    head = ["sampler"] + [f"{k} ({p['dim']}-D, n={p['n']}, {p['steps']} steps)" for k, p in probs.items()]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(names) + "|"]
    labels = [r["row"].split(", data_std=")[0] + (", data_std=σ" if "data_std" in r["row"] else "")
              for r in probs[names[0]]["rows"]]
    for i, label in enumerate(labels):
        cells = []
        for k in names:
            r = probs[k]["rows"][i]
            cell = f"{r['ratio']:.2f} / {100 * r['rel_var_err']:+.1f} %"
            if probs[k]["dim"] == 2:
                cell += f" (max \\|x\\| {r['max_norm']:.2f})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    floors = ", ".join(f"{k} {p['floor']:.4f}" for k, p in probs.items())
    lines.append("")
    lines.append(f"Cells: sliced W2 / noise floor, then the relative error of the mean per-coordinate "
                 f"variance. Noise floors: {floors}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Langevin corrector benchmark (sliced W2 / floor)")
    p.add_argument("out", help="output folder")
    p.add_argument("--quick", action="store_true", help="4x fewer samples, 5x fewer steps (a smoke run)")
    a = p.parse_args(argv)
    run(a.out, quick=a.quick)


if __name__ == "__main__":
    main(sys.argv[1:])
