r"""Linear multistep samplers in $(\hat x = x/m,\ \sigma = s/m)$: PNDM/PLMS, iPNDM and LMS, any affine SDE.

With $\hat x = x/m$ and $\sigma = s/m$ the probability-flow ODE of any affine SDE reads
$d\hat x/d\sigma = \hat\epsilon(\hat x, \sigma)$, $\hat\epsilon = -s\nabla\log p_t$ (Karras et al. 2022,
eq. 4 with $s(t) \to m$; the derivative $(\hat x - D)/\sigma$ of k-diffusion equals $\hat\epsilon$ by Tweedie).

- **PNDM** (Liu et al. 2022, eqs. 9-13): the *transfer* $\phi(x, \epsilon, t_a, t_b) =
  m_b[x/m_a + (\sigma_b - \sigma_a)\epsilon]$ (a DDIM step, exact for constant $\hat\epsilon$) applied with
  the fourth-order Adams-Bashforth combination $\epsilon' = (55\epsilon_i - 59\epsilon_{i-1} +
  37\epsilon_{i-2} - 9\epsilon_{i-3})/24$ of the last four evaluations ("pseudo linear multistep":
  the weights are those of equal steps whatever the grid). The first three steps start the history:
  ``warmup="prk"`` pseudo Runge-Kutta (the classical RK4 weights on $\phi$, midpoints at
  $(t_a + t_b)/2$, 4 evaluations per step: the paper's PNDM, diffusers' default ``PNDMScheduler``);
  ``"heun"`` one pseudo-Heun step then AB2 and AB3 (PLMS as diffusers' ``skip_prk_steps=True``;
  2 evaluations on the first step); ``"ab"`` AB1, AB2, AB3 (iPNDM, Zhang & Chen 2022, App. D).
- **LMS** (k-diffusion's ``sample_lms``, diffusers' ``LMSDiscreteScheduler``): variable-step
  Adams-Bashforth in $\sigma$: $\hat x_{i+1} = \hat x_i + \sum_j C_{ij}\hat\epsilon_{i-j}$,
  $C_{ij} = \int_{\sigma_i}^{\sigma_{i+1}} L_j(\sigma)\,d\sigma$ with the Lagrange basis $L_j$ on the last
  $\min(p, i+1)$ noise levels, integrated exactly (a polynomial) once per grid on the host.

Notation map (PNDM → sdegen): $\bar\alpha_t$ → $m^2$; $\phi$ → ``_transfer``; $e_t$ → ``eps_hat``.

References: L. Liu, Y. Ren, Z. Lin, Z. Zhao, *Pseudo Numerical Methods for Diffusion Models on
Manifolds*, ICLR 2022 (arXiv:2202.09778); Q. Zhang, Y. Chen, *Fast Sampling of Diffusion Models with
Exponential Integrator*, ICLR 2023; K. Crowson, k-diffusion ``sampling.py`` (``sample_lms``).
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._utils import check_int
from .base import AbstractFixedGridSolver, Dynamics
from .marginal_rows import GridCoefficients

__all__ = ["PNDM", "LMS", "WARMUPS"]

#: How PNDM starts its 4-step history: pseudo Runge-Kutta, pseudo Heun (PLMS) or lower-order AB (iPNDM).
WARMUPS = ("prk", "heun", "ab")

#: Adams-Bashforth weights for equal steps, newest first (orders 1-4).
_AB = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def affine_grid(solver: AbstractFixedGridSolver, coefs: GridCoefficients, *, log_snr: bool = False) -> None:
    r"""Check that ``solver`` can be prepared on the grid of ``coefs``: an [`AffineSDE`][sdegen.AffineSDE]
    (``TypeError`` naming it otherwise: the rules below are written in its $m, s$), and with ``log_snr``
    a finite $\lambda = \log(m/s)$ at every grid time (``ValueError`` where $s = 0$, e.g. a user grid
    reaching $t = 0$: a step in $\lambda$ into $\lambda = \infty$ has no finite coefficients)."""
    if not coefs.affine:
        raise TypeError(f"{type(solver).__name__} needs an AffineSDE (a Gaussian kernel), "
                        f"got {type(coefs.sde).__name__}")
    if log_snr and 0.0 in coefs.s:
        t = coefs.t[coefs.s.index(0.0)]
        raise ValueError(f"{type(solver).__name__} steps in log-SNR and needs std s(t) > 0 at every grid time; "
                         f"the grid reaches t={t:.6g} where s(t) = 0 (end the grid at eps > 0)")


def check_n_steps(solver: AbstractFixedGridSolver, coefs: GridCoefficients) -> int:
    """The number of grid steps $N$: the solver's ``n_steps`` when set (it must be the grid's: the last steps
    it names are those of this grid), else the grid's."""
    if solver.n_steps is not None and solver.n_steps != coefs.n:
        raise ValueError(f"{type(solver).__name__} was built with n_steps={solver.n_steps} but runs on a grid "
                         f"of {coefs.n} steps; n_steps must be the grid's number of steps (or None)")
    return coefs.n


@dataclass(frozen=True)
class ScoreHistoryMultistep(AbstractFixedGridSolver):
    r"""A linear multistep rule on stored evaluations with per-step rows ``(lin, weights)``:
    $x_{i+1} = \text{lin}_i\,x_i + \sum_j w_{ij}\,z_{i-j}$ (weights newest first, host floats, any per-point
    factor folded in), $z_j$ the score at $t_j$ or what ``stored`` makes of it. The state is ``(i, z)``, the
    last ``history`` values, oldest first. Subclasses are frozen dataclasses with a ``table`` field and a
    ``history`` length; their ``prepare`` builds the rows from the grid's
    [`GridCoefficients`][sdegen.solvers.marginal_rows.GridCoefficients] (the fixed-grid loop calls it once
    per run, so every run takes this one step path)."""

    #: Per-step ``(lin, weights)`` rows for the grid (built by ``prepare``; leave ``None``). Keyword-only,
    #: so subclasses list their options first.
    table: tuple | None = field(default=None, repr=False, kw_only=True)

    stochastic: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1

    @property
    def history(self) -> int:
        """How many past scores a step may use."""
        raise NotImplementedError

    @abc.abstractmethod
    def prepare(self, coefs: GridCoefficients) -> "ScoreHistoryMultistep":
        """This solver with its rows for the grid of ``coefs`` (``TypeError`` for a non-affine SDE)."""

    def tabulated(self, sde, times: Tensor) -> "ScoreHistoryMultistep":
        """This solver with its per-step rows for the grid ``times`` (float64, on the host, once): what the
        fixed-grid loop does itself, ``self.prepare(GridCoefficients(sde, times))``."""
        return self.prepare(GridCoefficients(sde, times))

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        return 0, ()

    def stored(self, x: Tensor, score: Tensor, i: int) -> Tensor:
        """What step ``i`` keeps of its evaluation (default: the score itself)."""
        return score

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        i, hist = state
        lin, w = self.table[i]
        hist = (hist + (self.stored(x, dyn.score(x, t0), i),))[-self.history:]
        return combine_history(x, lin, w, hist), None, (i + 1, hist)


def lagrange_rows(m: list[float], nodes: list[float], order: int, weight) -> tuple:
    r"""Rows ``(m_{i+1}/m_i, [weight(i, j, C_ij)]_j)`` of a variable-step Adams-Bashforth method in the variable
    ``nodes`` (one value per grid point): $C_{ij} = \int_{v_i}^{v_{i+1}} L_j$ over the last $\min(p, i+1)$ nodes."""
    rows = []
    for i in range(len(m) - 1):
        k = min(order, i + 1)
        C = _lagrange_integrals([nodes[i - j] for j in range(k)], nodes[i], nodes[i + 1])
        rows.append((m[i + 1] / m[i], [weight(i, j, cj) for j, cj in enumerate(C)]))
    return tuple(rows)


@dataclass(frozen=True)
class PNDM(ScoreHistoryMultistep):
    r"""PNDM / PLMS / iPNDM: fourth-order pseudo linear multistep on the DDIM transfer (module docstring).

    Step $i \ge 3$: $x_{i+1} = \phi(x_i, \epsilon', t_i, t_{i+1})$ with the AB4 combination $\epsilon'$ of
    $\hat\epsilon$ at the last four grid points; steps 0-2 per ``warmup``. Evaluations: $N + 9$
    (``"prk"``), $N + 1$ (``"heun"``), $N$ (``"ab"``) for $N \ge 3$ steps. Global order: 4 with
    ``"prk"`` (the RK4 start keeps the local error $O(h^5)$), 3 with ``"heun"`` (one $O(h^3)$ start
    step), 2 with ``"ab"`` (one Euler start step, $O(h^2)$), on grids whose $\sigma$ steps vary
    smoothly; "pseudo" weights assume equal steps, so the AB4 part is fourth order only where the
    grid is uniform in $\sigma$ (else second order: the test measures both).

    Args:
        warmup: ``"prk"`` (PNDM, default), ``"heun"`` (PLMS) or ``"ab"`` (iPNDM).
        table: per-step coefficients for the grid the solver runs on (built by ``prepare``; leave ``None``).
    """

    warmup: str = "prk"

    evals_per_step: ClassVar[int] = 1  # after the warm-up; see the class docstring for the total

    def __post_init__(self):
        if self.warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {', '.join(WARMUPS)}, got {self.warmup!r}")

    @property
    def order(self) -> float:  # type: ignore[override]
        """Global order: 4 (``"prk"``), 3 (``"heun"``), 2 (``"ab"``); see the class docstring."""
        return {"prk": 4.0, "heun": 3.0, "ab": 2.0}[self.warmup]

    def nfe(self, steps: int) -> int:
        """$N + 9$ (``"prk"``: three RK4 start steps), $N + 1$ (``"heun"``), $N$ (``"ab"``)."""
        return steps + {"prk": 3 * min(steps, 3), "heun": min(steps, 1), "ab": 0}[self.warmup]

    def prepare(self, coefs: GridCoefficients) -> "PNDM":
        r"""Per step ``(-s_a, r, c, -s_mid, r_h, c_h, -s_b, w)``: $\phi(x, \epsilon) = r x + c\epsilon$ to $t_b$ and
        to the midpoint $(t_a + t_b)/2$ (PRK), with $r = m_b/m_a$, $c = s_b - m_b s_a/m_a$; and the
        Adams-Bashforth weights $w_j = c\,b_j\,(-s_{a-j})$ on the stored scores (newest first)."""
        affine_grid(self, coefs)
        m, s, t = coefs.m, coefs.s, coefs.times
        # The midpoints are not grid points: their m, s from one more vectorised marginal call.
        mid = GridCoefficients(coefs.sde, 0.5 * (t[:-1] + t[1:]))
        mh, sh = mid.m, mid.s
        rows = []
        for i in range(len(m) - 1):
            c = s[i + 1] - m[i + 1] * s[i] / m[i]
            w = [c * b * -s[i - j] for j, b in enumerate(_AB[min(i + 1, 4) - 1])]
            rows.append((-s[i], m[i + 1] / m[i], c, -sh[i], mh[i] / m[i], sh[i] - mh[i] * s[i] / m[i], -s[i + 1], w))
        return dataclasses.replace(self, table=tuple(rows))

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        i, hist = state
        neg_s, r, c, neg_sh, rh, ch, neg_s1, w = self.table[i]
        score = dyn.score(x, t0)
        hist = (hist + (score,))[-4:]      # scores; the AB weights carry -s_j
        if i < 3 and self.warmup == "prk":
            # Liu et al. 2022, eq. 13: RK4 weights on the transfer, midpoints at (t0 + t1)/2.
            tm = 0.5 * (t0 + t1)
            e0 = score * neg_s
            e1 = dyn.score(torch.add(x * rh, e0, alpha=ch), tm) * neg_sh
            e2 = dyn.score(torch.add(x * rh, e1, alpha=ch), tm) * neg_sh
            e3 = dyn.score(torch.add(x * r, e2, alpha=c), t1) * neg_s1
            return torch.add(x * r, (e0 + 2 * e1 + 2 * e2 + e3) / 6, alpha=c), None, (i + 1, hist)
        if i == 0 and self.warmup == "heun":
            e0 = score * neg_s
            e1 = dyn.score(torch.add(x * r, e0, alpha=c), t1) * neg_s1
            return torch.add(x * r, e0 + e1, alpha=0.5 * c), None, (i + 1, hist)
        return combine_history(x, r, w, hist), None, (i + 1, hist)


def _basis(w: list[float], j: int) -> list[float]:
    """Power-series coefficients (lowest first) of the Lagrange basis polynomial $L_j$ on the nodes ``w``."""
    c, d = [1.0], 1.0
    for k, wk in enumerate(w):
        if k != j:
            c = [0.0] + c                       # multiply by (x - wk): shift, then subtract wk * c
            for n in range(len(c) - 1):
                c[n] -= wk * c[n + 1]
            d *= w[j] - wk
    return [ci / d for ci in c]


def _lagrange_integrals(nodes: list[float], a: float, b: float) -> list[float]:
    r"""$\int_a^b L_j(\sigma)\,d\sigma$ for the Lagrange basis on ``nodes`` (shifted by ``a`` for conditioning).

    Plain Python floats: a grid of 1000 steps is tabulated in milliseconds."""
    w = [x - a for x in nodes]
    e = b - a
    return [sum(cn * e ** (n + 1) / (n + 1) for n, cn in enumerate(_basis(w, j))) for j in range(len(w))]


@dataclass(frozen=True)
class LMS(ScoreHistoryMultistep):
    r"""Variable-step linear multistep in $\sigma$ of order 1-4 (k-diffusion ``sample_lms``).

    Step $i$: $x_{i+1} = \frac{m_{i+1}}{m_i}x_i + m_{i+1}\sum_{j<k} C_{ij}\hat\epsilon_{i-j}$, $k = \min(p, i + 1)$,
    $C_{ij} = \int_{\sigma_i}^{\sigma_{i+1}} L_j(\sigma)\,d\sigma$ (exact Lagrange integrals). One evaluation
    per step. The start steps use the orders their history allows, so the global order is
    $\min(p, 2)$ asymptotically (the first, Euler, step has local error $O(h^2)$); measured slopes on
    the oracle problems are in the tests.

    Args:
        lms_order: $p \in \{1, 2, 3, 4\}$ (default 4, as k-diffusion and diffusers; the
            ``order`` option of ``sdegen.sample(method="lms")``).
        table: per-step coefficients for the grid the solver runs on (built by ``prepare``; leave ``None``).
    """

    lms_order: int = 4

    def __post_init__(self):
        check_int(self.lms_order, "order", low=1, high=4)

    @property
    def order(self) -> float:  # type: ignore[override]
        """Asymptotic global order $\\min(p, 2)$ (see the class docstring)."""
        return float(min(self.lms_order, 2))

    def prepare(self, coefs: GridCoefficients) -> "LMS":
        r"""Row $i$: ``(m_{i+1}/m_i, [-s_{i-j} m_{i+1} C_{ij}]_j)`` in float64 (weights on the stored scores)."""
        affine_grid(self, coefs)
        m, s = coefs.m, coefs.s
        sig = [si / mi for mi, si in zip(m, s)]
        return dataclasses.replace(self, table=lagrange_rows(m, sig, self.lms_order,
                                                             lambda i, j, cj: -s[i - j] * m[i + 1] * cj))

    @property
    def history(self) -> int:
        return self.lms_order


def _grid(ctx, opts: dict) -> None:
    """Set ``ctx.times`` from the ``grid`` option (a name, with ``rho`` for Karras, or a user tensor of times,
    which sets the number of steps and the final time itself). One rule for the multistep builders."""
    from ..grids import get_grid

    grid = opts["grid"]
    if isinstance(grid, str):
        ctx.times = get_grid(grid, ctx.sde, ctx.steps, ctx.eps, **({"rho": opts["rho"]} if grid == "karras" else {}))
    else:  # a user grid sets the number of steps and the final time itself
        ctx.times = get_grid(grid, ctx.sde, None, None)


def combine_history(x: Tensor, lin: float, weights, hist: list[Tensor]) -> Tensor:
    r"""$x_{i+1} = \text{lin}\,x_i + \sum_j w_j h_{i-j}$: a linear multistep update on stored evaluations
    ``hist`` (oldest first; ``weights`` newest first), precomputed host floats; one kernel per term."""
    x_new = x * lin
    for wj, hj in zip(weights, reversed(hist)):
        x_new.add_(hj, alpha=wj)
    return x_new


def build_pndm(ctx, opts: dict) -> PNDM:
    """``sdegen.sample`` builder for ``"pndm"``: the grid, then the solver (the loop prepares its rows)."""
    _grid(ctx, opts)
    return PNDM(warmup=opts["warmup"])


def build_ipndm(ctx, opts: dict) -> PNDM:
    """``sdegen.sample`` builder for ``"ipndm"``: PNDM with the lower-order Adams-Bashforth start."""
    return build_pndm(ctx, {**opts, "warmup": "ab"})


def build_lms(ctx, opts: dict) -> LMS:
    """``sdegen.sample`` builder for ``"lms"``: the grid, then the solver (the loop prepares its rows)."""
    _grid(ctx, opts)
    return LMS(lms_order=opts["order"])


#: ``sdegen.sample(method="pndm")`` options (``warmup="heun"`` is PLMS); ``"ipndm"`` is ``warmup="ab"``.
PNDM_OPTIONS = {"warmup": "prk", "grid": "uniform", "rho": 7.0}
IPNDM_OPTIONS = {"grid": "uniform", "rho": 7.0}
#: ``sdegen.sample(method="lms")`` options and defaults (k-diffusion: order 4 on the Karras grid).
LMS_OPTIONS = {"order": 4, "grid": "karras", "rho": 7.0}
