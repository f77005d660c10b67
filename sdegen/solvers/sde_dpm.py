r"""Stochastic DPM-Solver++: SDE-DPM-Solver++(1), 2M-SDE and 3M-SDE with $\eta$, for any affine SDE.

With $m = m(t)$, $s = s(t)$, $\lambda = \log(m/s)$ and $\eta \ge 0$, the reverse-time SDEs

$$dx = \big[f(x,t) - \tfrac{1+\eta}{2}\,g(t)^2\,\nabla_x\log p_t(x)\big]\,dt + \sqrt{\eta}\,g(t)\,d\bar w$$

all have the marginals $p_t$ ($\eta = 0$: the probability-flow ODE; $\eta = 1$: the reverse SDE of
Song et al. 2021, eq. 6). In data prediction $\hat x_0$ their exact variation-of-constants solution
over a step $\lambda_0 \to \lambda_1$, $h = \lambda_1 - \lambda_0 > 0$, $c = 1 + \eta$, $H = c\,h$, is
(Lu et al. 2022b, §4 and App. for $\eta = 1$; Xue et al. 2023, eq. 9 with $\tau^2 = \eta$)

$$x_1 = \frac{s_1}{s_0}e^{-\eta h}x_0 + m_1\int_{\lambda_0}^{\lambda_1} c\,e^{-c(\lambda_1-\lambda)}\hat x_0(\lambda)\,d\lambda
  + s_1\sqrt{1 - e^{-2\eta h}}\;z .$$

Expanding $\hat x_0(\lambda) = D + D'(\lambda-\lambda_0) + \tfrac12 D''(\lambda-\lambda_0)^2$ and integrating exactly:

$$x_1 = \frac{s_1}{s_0}e^{-\eta h}x_0 + m_1\big[I_0 D + I_1 D' + I_2 D''\big] + s_1\sqrt{1-e^{-2\eta h}}\,z,$$
$$I_0 = 1 - e^{-H},\quad I_1 = h\Big(1 - \frac{1 - e^{-H}}{H}\Big),\quad
  I_2 = h^2\Big(\frac12 - \frac1H + \frac{1 - e^{-H}}{H^2}\Big)$$

(for $\eta = 0$ these are DPM-Solver++'s $\varphi_{1,2,3}$). The multistep forms estimate $D'$ and
$D''$ from the last two or three data predictions by divided differences in $\lambda$, exactly as
[`DPMSolver`][sdegen.solvers.dpm_solver.DPMSolver] does; so each step costs one score evaluation.

Notation map: k-diffusion's ``eta`` is $\eta$ here (its ``dpmpp_2m_sde`` multiplies $h$ by $\eta$);
diffusers' ``sde-dpmsolver++`` is $\eta = 1$; SA-Solver's $\tau$ is $\sqrt\eta$. DPM-Solver's
$\alpha_t, \sigma_t$ are ``mean_coef`` $m$ and ``std`` $s$ here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._utils import check_bool
from ..sdes import AffineSDE
from .base import TabulatedSolver, Dynamics
from .marginal_rows import GridCoefficients

__all__ = ["SDEDPMSolverPP", "build_sde_dpm_solver", "SDE_DPM_OPTIONS", "SOLVER_TYPES"]

#: The 2M correction: ``"exact"`` (the exact $I_1 D'$ term, sdegen's default; diffusers' ``"heun"``) or ``"midpoint"``
#: (diffusers' default ``solver_type``: $\tfrac12 I_0\,h D'$, the same to first order in $h$).
SOLVER_TYPES = ("exact", "midpoint")


def _integrals(h: float, eta: float) -> tuple[float, float, float]:
    r"""$(I_0, I_1, I_2)$ of the module docstring; $h = +\infty$ (a step into $s = 0$) gives $(1, \infty, \infty)$."""
    H = (1.0 + eta) * h
    if math.isinf(H):
        return 1.0, math.inf, math.inf
    i0 = -math.expm1(-H)
    return i0, h * (1.0 - i0 / H), h * h * (0.5 - 1.0 / H + i0 / (H * H))


@dataclass(frozen=True)
class SDEDPMSolverPP(TabulatedSolver):
    r"""SDE-DPM-Solver++ of order 1, 2 (2M-SDE) or 3 (3M-SDE) with noise level $\eta$.

    Step $t_i \to t_{i+1}$ with $D_i = \hat x_0(x_i, t_i)$ (Tweedie) and history $D_{i-1}, D_{i-2}$ (the state):

    - order 1 (SDE-DPM-Solver++1; Lu et al. 2022b, eq. 18 for $\eta = 1$):
      $x_{i+1} = \frac{s_{i+1}}{s_i}e^{-\eta h}x_i + m_{i+1}I_0 D_i + s_{i+1}\sqrt{1-e^{-2\eta h}}\,z$;
    - order 2 (2M-SDE, k-diffusion ``dpmpp_2m_sde``): $+\ m_{i+1} I_1 (D_i - D_{i-1})/h_{i-1}$
      (``solver_type="exact"``, diffusers' ``"heun"``) or $+\ \tfrac12 m_{i+1} I_0\,h (D_i - D_{i-1})/h_{i-1}$ (``"midpoint"``);
    - order 3 (3M-SDE): $+\ m_{i+1}(I_1 p' + I_2 p'')$ with $p$ the quadratic through the last three $D$'s in $\lambda$.

    $z = \Delta w/\sqrt{|\Delta t|}$ is the loop's unit draw. The first steps use the orders their
    history allows; with ``lower_order_final`` the last steps lower it too ($\min(k, N - i)$), and a
    step ending at $s = 0$ is order 1 (it is then the Tweedie denoiser $x = m\,D$). With $\eta = 0$ it
    is exactly [`DPMSolver`][sdegen.solvers.dpm_solver.DPMSolver] (data prediction). The linear part
    and the noise are integrated exactly; measured weak order (exact Gaussian moments,
    ``tests/solvers/test_stochastic_samplers.py``): 1 for order 1, 2 for 2M-SDE; 3M-SDE is 15-50x more
    accurate than 2M-SDE at 40-80 steps without a clean asymptotic order. ``order`` is the order of the
    deterministic part ($\eta = 0$). One score evaluation per step.

    Args:
        order: 1, 2 or 3.
        eta: $\eta \ge 0$, the noise level (1: the reverse SDE; 0: the probability-flow ODE).
        solver_type: ``"exact"`` (the exact integral; diffusers' ``"heun"``) or ``"midpoint"`` (diffusers' default), for order 2.
        n_steps: number of grid steps $N$ for ``lower_order_final``; ``None``: the grid's (set by `prepare`).
        lower_order_final: lower the order on the last steps.
        table: per-step host-float weights, built by `prepare` from the grid's
            [`GridCoefficients`][sdegen.solvers.marginal_rows.GridCoefficients] (the loop prepares a
            solver constructed without it).
        table_times: the grid ``table`` was built for (set by `prepare`; a run on another grid is a ``ValueError``).
    """

    order: int = 2  # type: ignore[misc]  # an option here
    eta: float = 1.0
    solver_type: str = "exact"
    n_steps: int | None = None
    lower_order_final: bool = True

    stochastic: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 1

    def __post_init__(self):
        if self.order not in (1, 2, 3) or isinstance(self.order, bool):
            raise ValueError(f"order must be 1, 2 or 3, got {self.order!r}")
        if not isinstance(self.eta, (int, float)) or isinstance(self.eta, bool) or not (0.0 <= self.eta < math.inf):
            raise ValueError(f"eta must be a finite float >= 0, got {self.eta!r}")
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {', '.join(SOLVER_TYPES)}, got {self.solver_type!r}")

    def build_table(self, coefs: GridCoefficients) -> "SDEDPMSolverPP":
        """The solver with its table for the grid of ``coefs`` (``n_steps`` defaults to the grid's); a solver
        that has one already is checked against that grid (``ValueError`` if it was built for another)."""
        solver = self if self.n_steps is not None else dataclasses.replace(self, n_steps=coefs.n)
        return dataclasses.replace(solver, table=solver._weights(coefs), table_times=tuple(coefs.t))

    def _weights(self, coefs: GridCoefficients) -> tuple:
        r"""Per step ``(s0^2, lin, (w_0, w_1, ...), c)``: the update is
        $x_1 = \text{lin}\,x + \sum_j w_j\,\tilde D_j + c\,\Delta w$ with the stored $\tilde D_j = x_j + s_j^2 s_\theta(x_j)$
        (Tweedie's $\hat x_0 = \tilde D/m$: the $1/m_j$ is folded into $w_j$), newest first."""
        rows, lams, inv_m = [], [], []
        m, s, lam, tl = coefs.m, coefs.s, coefs.lam, coefs.t
        for i in range(coefs.n):
            m0, s0, m1, s1 = m[i], s[i], m[i + 1], s[i + 1]
            lam0, lam1 = lam[i], lam[i + 1]
            lams, inv_m = (lams + [lam0])[-self.order:], (inv_m + [1.0 / m0])[-self.order:]
            k = len(lams)
            if self.lower_order_final and self.n_steps is not None:
                k = max(1, min(k, self.n_steps - i))
            if s1 == 0.0:
                k = 1
            h = lam1 - lam0
            i0, i1, i2 = _integrals(h, self.eta)
            # Divided differences folded into one weight per stored D (newest first):
            # D10 = (D0 - D1)/h0, D21 = (D1 - D2)/r1, d2 = (D10 - D21)/(h0 + r1), p' = D10 + h0 d2, p'' = 2 d2.
            if k == 1:
                w = [i0]
            else:
                h0 = lams[-1] - lams[-2]
                if k == 2:
                    g = 0.5 * i0 * h if self.solver_type == "midpoint" else i1
                    w = [i0 + g / h0, -g / h0]
                else:
                    r1 = lams[-2] - lams[-3]
                    e = (i1 * h0 + 2.0 * i2) / (h0 + r1)
                    g = i1 + e
                    w = [i0 + g / h0, -g / h0 - e / r1, e / r1]
            w = tuple(m1 * wj * im for wj, im in zip(w, reversed(inv_m)))
            lin = 0.0 if s1 == 0.0 else (s1 / s0) * math.exp(-self.eta * h)
            c = 0.0
            if self.eta > 0.0 and s1 > 0.0:
                c = s1 * math.sqrt(-math.expm1(-2.0 * self.eta * h)) / math.sqrt(abs(tl[i] - tl[i + 1]))
            rows.append((s0 * s0, lin, w, c))
        return tuple(rows)

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        if self.table is None:
            raise ValueError("SDEDPMSolverPP needs its per-step table: run it through integrate_fixed_grid (which "
                             "prepares it) or build it with SDEDPMSolverPP.tabulated(sde, times)")
        return 0, ()

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        i, hist = state
        s0sq, lin, w, c = self.table[i]
        d = torch.add(x, dyn.score(x, t0), alpha=s0sq)          # m0 * Tweedie x0_hat
        hist = (d, *hist)[:self.order]                          # newest first
        x_new = x * lin
        for wj, dj in zip(w, hist):
            x_new.add_(dj, alpha=wj)
        if dw is not None and c != 0.0:
            x_new.add_(dw, alpha=c)
        return x_new, None, (i + 1, hist)


def build_sde_dpm_solver(ctx, opts: dict) -> SDEDPMSolverPP:
    r"""``sdegen.sample`` builder: the grid from ``grid=`` (and ``rho=`` for ``"karras"``) and the solver's
    options; the loop prepares its table on that grid."""
    from ..grids import get_grid

    ctx.dyn.affine      # TypeError for a non-affine SDE here, before the run
    grid_opts = {"rho": opts["rho"]} if isinstance(opts["grid"], str) and opts["grid"] == "karras" else {}
    ctx.times = get_grid(opts["grid"], ctx.sde, ctx.steps, ctx.eps, **grid_opts)
    return SDEDPMSolverPP(order=opts["order"], eta=opts["eta"], solver_type=opts["solver_type"],
                          lower_order_final=check_bool(opts["lower_order_final"], "lower_order_final"))


#: ``sdegen.sample(method="sde_dpm_solver")`` options and defaults (k-diffusion's ``dpmpp_2m_sde``
#: defaults: order 2, $\eta = 1$; the exact second-order coefficient).
SDE_DPM_OPTIONS = {"order": 2, "eta": 1.0, "solver_type": "exact", "grid": "karras", "rho": 7.0,
                   "lower_order_final": True}
