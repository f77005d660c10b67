r"""DEIS: the time-Adams-Bashforth (tAB) exponential integrator of Zhang & Chen 2022, any affine SDE.

With $\hat x = x/m$ and $\sigma = s/m$ (``sde.sigma``) the probability-flow ODE of any affine SDE is
$d\hat x/d\sigma = \hat\epsilon(\hat x, \sigma)$ with $\hat\epsilon = -s\nabla\log p_t$ (Zhang & Chen
2022, eq. 11, in $\rho = \sigma$). tAB-$p$ integrates it exactly for $\hat\epsilon$ replaced by its
Lagrange interpolant through the last $p$ predictions, in the variable $u = \log\sigma$ (diffusers'
``algorithm_type="deis"``, "log-rho"):

$$\hat x_{i+1} = \hat x_i + \sum_{j=0}^{p-1} C_{ij}\,\hat\epsilon_{i-j},\qquad
  C_{ij} = \int_{\sigma_i}^{\sigma_{i+1}} \prod_{k \ne j}\frac{\log\sigma - \log\sigma_{i-k}}
  {\log\sigma_{i-j} - \log\sigma_{i-k}}\,d\sigma,$$

then $x_{i+1} = m_{i+1}\hat x_{i+1}$ (Zhang & Chen 2022, eq. 15 and App. C). Order 1 is DDIM. With
$v = \log(\sigma/\sigma_i)$ the integral is $\sigma_i[e^{v}(L - L' + L'')]_0^{v_{i+1}}$ for the basis
polynomial $L$ (degree $\le 2$), computed once per grid in float64 on the host.

Notation map (DEIS → sdegen): $\rho$ → ``sigma`` $= s/m$; $\alpha_t$ → $m^2$; $\epsilon_\theta$ →
``eps_hat``; $\hat x$ → ``x / mean_coef``.

Reference: Q. Zhang, Y. Chen, *Fast Sampling of Diffusion Models with Exponential Integrator*,
ICLR 2023 (arXiv:2204.13902).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .._utils import check_bool, check_int
from .marginal_rows import GridCoefficients
from .multistep import ScoreHistoryMultistep, _basis, _grid, affine_grid, check_n_steps

__all__ = ["DEIS"]


def _exp_lagrange_integrals(v: list[float], v_end: float) -> list[float]:
    r"""$\int_0^{v_\text{end}} e^{v} L_j(v)\,dv$ for the Lagrange basis $L_j$ on the nodes ``v`` (``v[0] = 0``).

    The antiderivative of $e^v L$ is $e^v(L - L' + L'' - \dots)$; plain Python floats (fast to tabulate)."""
    ev = math.exp(v_end)
    out = []
    for j in range(len(v)):
        c = _basis(v, j)
        F = [0.0] * len(c)
        d, sign = c, 1.0
        while d:
            for n, dn in enumerate(d):
                F[n] += sign * dn
            d, sign = [n * dn for n, dn in enumerate(d)][1:], -sign
        out.append(ev * sum(fn * v_end ** n for n, fn in enumerate(F)) - F[0])
    return out


@dataclass(frozen=True)
class DEIS(ScoreHistoryMultistep):
    r"""DEIS tAB multistep sampler of order 1-3 on the probability-flow ODE of any affine SDE.

    Step $i$: $x_{i+1} = \frac{m_{i+1}}{m_i}x_i + m_{i+1}\sum_j C_{ij}\hat\epsilon_{i-j}$ (module docstring),
    with order $\min(\text{order}, i + 1)$ (and $\le N - i$ with ``lower_order_final``). One score
    evaluation per step; global order ``order`` (``lower_order_final=False``). Equals diffusers'
    ``DEISMultistepScheduler`` (``algorithm_type="deis"``, ``solver_order=order``) on the same grid;
    diffusers lowers the final orders only when $N < 15$.

    Args:
        order: 1, 2 or 3.
        n_steps: number of grid steps $N$ (for ``lower_order_final``).
        lower_order_final: order $\min(p, N - i)$ on step $i$ (default on).
        table: per-step coefficients for the grid the solver runs on (built by ``prepare``; leave ``None``).
    """

    order: int = 2  # type: ignore[misc]
    n_steps: int | None = None
    lower_order_final: bool = True

    def __post_init__(self):
        check_int(self.order, "order", low=1, high=3)
        check_bool(self.lower_order_final, "lower_order_final")
        if self.n_steps is not None and (not isinstance(self.n_steps, int) or self.n_steps < 1):
            raise ValueError(f"n_steps must be a positive int or None, got {self.n_steps!r}")

    def prepare(self, coefs: GridCoefficients) -> "DEIS":
        r"""This solver with row $i$ = ``(m_{i+1}/m_i, [-s_{i-j} m_{i+1} C_{ij}]_j)`` computed in float64 (the
        weights act on the stored scores, $\hat\epsilon_j = -s_j\nabla\log p$)."""
        affine_grid(self, coefs, log_snr=True)
        n = check_n_steps(self, coefs)
        m, s = coefs.m, coefs.s
        logsig = [math.log(si / mi) for mi, si in zip(m, s)]
        rows = []
        for i in range(n):
            k = min(self.order, i + 1)
            if self.lower_order_final:
                k = max(1, min(k, n - i))
            v = [logsig[i - j] - logsig[i] for j in range(k)]
            C = _exp_lagrange_integrals(v, logsig[i + 1] - logsig[i])
            sig_i = s[i] / m[i]
            # weights on the stored scores: eps_hat_j = -s_j * score_j folded in
            rows.append((m[i + 1] / m[i], [-s[i - j] * m[i + 1] * sig_i * c for j, c in enumerate(C)]))
        return dataclasses.replace(self, n_steps=n, table=tuple(rows))

    @property
    def history(self) -> int:
        return self.order


def build_deis(ctx, opts: dict) -> DEIS:
    r"""``sdegen.sample`` builder: sets ``ctx.times`` to the ``grid`` option and returns the solver (the loop
    prepares its rows)."""
    _grid(ctx, opts)
    return DEIS(order=opts["order"], n_steps=ctx.times.numel() - 1, lower_order_final=opts["lower_order_final"])


#: ``sdegen.sample(method="deis")`` options and defaults.
DEIS_OPTIONS = {"order": 3, "lower_order_final": True, "grid": "log_snr", "rho": 7.0}
