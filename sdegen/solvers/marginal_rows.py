r"""Per-step marginal coefficients of an affine SDE on a grid, as float64 host numbers.

The stochastic samplers of [`sdegen.solvers.sde_dpm`][sdegen.solvers.sde_dpm],
[`sdegen.solvers.ancestral_k`][sdegen.solvers.ancestral_k] and [`sdegen.solvers.restart`][sdegen.solvers.restart]
are written in the scaled picture $\hat x = x/m$, $\sigma = s/m$, $\lambda = \log(m/s) = -\log\sigma$ of
any [`AffineSDE`][sdegen.AffineSDE] (Karras et al. 2022, §4; Lu et al. 2022b, eq. 8). Their per-step
coefficients are computed here once per run, in float64 on the host, so a step is a few fused
kernels with Python-float weights (no per-step device sync, no per-step marginal call).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..sdes import AffineSDE

__all__ = ["marginal_rows", "grid_marginals", "sigma_to_time", "lambda_of"]


def marginal_rows(sde: AffineSDE, times: Tensor) -> list[tuple[float, float]]:
    r"""``[(m(t_k), s(t_k)), ...]`` for every time of ``times`` (float64 host floats)."""
    # dtype given: a list of Python floats would otherwise become a float32 tensor (1e-7 errors).
    t = torch.as_tensor(times, dtype=torch.float64).detach().to("cpu").reshape(-1)
    m, s = sde.marginal(t)
    return list(zip(m.tolist(), s.tolist()))


def grid_marginals(sde: AffineSDE, times: Tensor) -> tuple[list[float], list[float]]:
    r"""``(m, s)``: the lists $m(t_k)$ and $s(t_k)$ over ``times`` (float64 host floats, one marginal call).

    The one place the tabulated solvers (DEIS, UniPC, PNDM, LMS, AB in log-SNR) read the grid's marginal."""
    t = torch.as_tensor(times, dtype=torch.float64).detach().to("cpu").reshape(-1)
    m, s = sde.marginal(t)
    return m.tolist(), s.tolist()


def lambda_of(m: float, s: float) -> float:
    r"""$\lambda = \log(m/s)$; $+\infty$ at $s = 0$ (the data end of a grid that reaches $t = 0$)."""
    return math.inf if s == 0.0 else math.log(m / s)


def sigma_to_time(sde: AffineSDE, sigmas) -> list[float]:
    r"""Times $t$ with $\sigma(t) = $ ``sigmas`` (the SDE's inverse, bisection in float64); host floats."""
    sig = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    return sde.t_from_sigma(sig).to(torch.float64).tolist()
