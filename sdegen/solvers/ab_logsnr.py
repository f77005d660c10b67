r"""Adams–Bashforth 2/3 in log-SNR: a linear multistep solver of the probability-flow ODE of any affine SDE.

With $\hat x = x/m$, $\sigma = s/m$ and $\lambda = -\log\sigma$ (half the log-SNR $\log(m^2/s^2)$), the
probability-flow ODE reads $d\hat x/d\lambda = F = -\sigma\hat\epsilon = \sigma s\,\nabla\log p_t$
(from $d\hat x/d\sigma = \hat\epsilon$, Karras et al. 2022, eq. 4 with $\hat\epsilon = -s\nabla\log p_t$).
The variable-step Adams–Bashforth method of order $p$ integrates the Lagrange interpolant of the last
$p$ values of $F$ in $\lambda$ (Hairer, Nørsett & Wanner, "Solving ODEs I", Sec. III.5, eq. 5.5):

$$\hat x_{i+1} = \hat x_i + \sum_{j=0}^{k-1} \beta_{ij} F_{i-j}, \qquad
  \beta_{ij} = \int_{\lambda_i}^{\lambda_{i+1}} \prod_{l \ne j} \frac{\lambda - \lambda_{i-l}}{\lambda_{i-j} - \lambda_{i-l}}\,d\lambda,$$

$k = \min(p, i + 1)$ (lower orders while the history fills), then $x_{i+1} = m_{i+1}\hat x_{i+1}$. Unlike
DEIS and DPM-Solver no part is integrated exactly: it is the textbook multistep method in the
variable where the flow is smooth. One score evaluation per step. Global order 2 for $p = 2$; for
$p = 3$ also 2, because the Euler first step's $O(h^2)$ local error stays in the result (measured on
Gaussian data under VP, 64-256 log-SNR steps: slopes 2.04 for $p = 2$ and 2.26 for $p = 3$, whose
error is 3-4x lower). The weights,
with $\sigma_j s_j$ folded in, are computed once per grid in float64 on the host.

**Not a few-step sampler.** $F = -\sigma\hat\epsilon$ carries the factor $\sigma = e^{-\lambda}$, which a
polynomial in $\lambda$ follows poorly over the large $\lambda$-steps of a short grid; exponential
integrators (DPM-Solver, DEIS) integrate that factor exactly and interpolate only $\hat\epsilon$.
Measured on $\mathcal N(0.5, 0.5^2 I)$ under VP (exact score, 20,000 samples, default log-SNR grid),
error of the sample variance at 10 / 20 / 40 steps: AB2 +3228 % / +189 % / +33 %, AB3 diverges at 10
steps and gives -70 % / -12 % at 20 / 40; ``dpm_solver`` +0.7 % / +1.8 % / +1.3 %, ``lms`` -28 % / -6 % / +0.3 %.
Use it from about 100 steps, or as the reference for a plain multistep method.

This module is the worked example of adding a sampler (``docs/extending.md``): the solver here and
one row in [`sdegen.METHODS`][sdegen.sampling.METHODS] make it a ``sample`` method, a PC predictor,
an inpainting predictor, a row of the contract test and of the benchmarks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .._utils import check_int
from .marginal_rows import GridCoefficients
from .multistep import ScoreHistoryMultistep, affine_grid, lagrange_rows

__all__ = ["ABLogSNR", "build_ab_logsnr", "AB_LOGSNR_OPTIONS"]


@dataclass(frozen=True)
class ABLogSNR(ScoreHistoryMultistep):
    r"""Adams–Bashforth of order 2 or 3 in $\lambda = -\log(s/m)$ (see the module docstring).

    Step $i$: $x_{i+1} = \frac{m_{i+1}}{m_i} x_i + m_{i+1}\sum_j \beta_{ij}\sigma_{i-j}s_{i-j}\,\nabla\log p_{t_{i-j}}$.

    Args:
        ab_order: $p$, 2 or 3 (the first steps use the orders their history allows).
        table: per-step ``(m_{i+1}/m_i, weights)`` for the grid the solver runs on (built by ``prepare``; leave
            ``None``).
    """

    ab_order: int = 2

    def __post_init__(self):
        check_int(self.ab_order, "ab_order", low=2, high=3)

    @property
    def order(self) -> float:  # type: ignore[override]
        """Global order: 2 (the Euler start limits $p = 3$ to 2, see the module docstring)."""
        return 2.0

    def prepare(self, coefs: GridCoefficients) -> "ABLogSNR":
        """This solver with its per-step weights for the grid of ``coefs`` (float64, host, once per run)."""
        affine_grid(self, coefs, log_snr=True)
        m, s, lam = coefs.m, coefs.s, coefs.lam
        return dataclasses.replace(self, table=lagrange_rows(
            m, lam, self.ab_order, lambda i, j, b: m[i + 1] * b * s[i - j] / m[i - j] * s[i - j]))

    @property
    def history(self) -> int:
        return self.ab_order


def build_ab_logsnr(ctx, opts: dict) -> ABLogSNR:
    """``sdegen.sample`` builder (``ctx.times`` is already the ``grid`` option's grid): the solver, whose weights
    the fixed-grid loop prepares for the grid."""
    return ABLogSNR(ab_order=opts["order"])


#: ``sdegen.sample(method="ab_logsnr")`` options: the solver's own defaults, and the grid uniform in log-SNR.
AB_LOGSNR_OPTIONS = {"order": ABLogSNR.__dataclass_fields__["ab_order"].default, "grid": "log_snr"}
