r"""SA-Solver (Xue et al. 2023): stochastic Adams predictor-corrector in $\lambda$, for any affine SDE.

With $m, s$ the marginal coefficients, $\lambda = \log(m/s)$ and a noise level $\tau \ge 0$, the reverse
SDEs $dx = [f - \tfrac{1+\tau^2}{2} g^2\nabla\log p_t]\,dt + \tau g\,d\bar w$ share the marginals $p_t$; in
data prediction $D = \hat x_0$ their solution over $\lambda_s \to \lambda_t$, $h = \lambda_t - \lambda_s$,
$c = 1 + \tau^2$, is (Xue et al. 2023, eq. 9-10)

$$x_t = \frac{s_t}{s_s}e^{-\tau^2 h}x_s + m_t\int_{\lambda_s}^{\lambda_t} c\,e^{-c(\lambda_t - \lambda)}D(\lambda)\,d\lambda
  + s_t\sqrt{1 - e^{-2\tau^2 h}}\;z .$$

SA-Solver replaces $D(\lambda)$ by the Lagrange polynomial through stored data predictions and
integrates it exactly: with $u = \lambda - \lambda_s$, $J_p = \int_0^h c\,e^{-c(h-u)}u^p\,du$
($J_0 = 1 - e^{-ch}$, $J_p = h^p - \tfrac pc J_{p-1}$), the weight of $D_j$ is
$m_t\sum_p a_{jp}J_p$ with $\ell_j(u) = \sum_p a_{jp}u^p$ the Lagrange basis.

- **Predictor** (stochastic Adams-Bashforth, order $k_p$): from $x_i$ over $[\lambda_i, \lambda_{i+1}]$
  with $D_i, D_{i-1}, \dots$ and a fresh draw $z_i$.
- **Corrector** (stochastic Adams-Moulton, order $k_c$): once $D_{i+1}$ is evaluated at the
  predicted $x_{i+1}$, redo the step from $x_i$ with $D_{i+1}, D_i, \dots$ and the *same* draw $z_i$;
  the next step starts from the corrected state. No extra evaluation (like UniC).

At order 2 both carry diffusers' modification (``SASolverScheduler``, "similar to UniPC"): the
$D'$ weight becomes $c\,m_t h^2/2$ (predictor) and $c\,m_t h/2$ times the difference (corrector), which
does not change the order. The first steps use the orders their history allows; with
``lower_order_final`` the last steps lower them ($k_p \le N - i$, $k_c \le N - i + 1$).
$\tau$ is ``tau`` inside the window ``tau_sigma`` $= (\sigma_\text{lo}, \sigma_\text{hi})$ of the step's
start noise level $\sigma = s/m$ and 0 outside (diffusers' default $\tau(t) = 1$ for training steps
200-800). One score evaluation per step.

Notation map (Xue et al. → sdegen): $\alpha_t, \sigma_t$ → ``mean_coef`` $m$, ``std`` $s$;
$x_\theta$ → $D$ (Tweedie); $\tau(t)$ → ``tau``, ``tau_sigma``; $s_p, s_c$ → ``predictor_order``,
``corrector_order``.
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

__all__ = ["SASolver", "build_sa_solver", "SA_SOLVER_OPTIONS"]


def _j_integrals(h: float, c: float, n: int) -> list[float]:
    r"""$J_0..J_{n-1}$ with $J_p = \int_0^h c\,e^{-c(h-u)}u^p\,du$ (recursion by parts)."""
    out = [-math.expm1(-c * h)]
    for p in range(1, n):
        out.append(h ** p - p / c * out[-1])
    return out


def _adams_weights(nodes: list[float], h: float, c: float) -> list[float]:
    r"""$\int_0^h c\,e^{-c(h-u)}\ell_j(u)\,du$ for the Lagrange basis $\ell_j$ on ``nodes`` ($u$ values).

    Plain Python on at most five nodes: expanding $\prod_{i \ne j}(u - u_i)$ term by term costs a few µs,
    which matters because the table is built once per run (per step of the grid)."""
    J = _j_integrals(h, c, len(nodes))
    weights = []
    for j, uj in enumerate(nodes):
        coef, denom = [1.0], 1.0                       # coefficients of u^0, u^1, ... of prod (u - u_i)
        for i, ui in enumerate(nodes):
            if i == j:
                continue
            coef = [(coef[p - 1] if p > 0 else 0.0) - ui * (coef[p] if p < len(coef) else 0.0)
                    for p in range(len(coef) + 1)]
            denom *= uj - ui
        weights.append(sum(a * J[p] for p, a in enumerate(coef)) / denom)
    return weights


@dataclass(frozen=True)
class SASolver(TabulatedSolver):
    r"""SA-Solver: stochastic Adams-Bashforth predictor and Adams-Moulton corrector (see the module docstring).

    Step $i$ ($t_i \to t_{i+1}$): evaluate $D_i = \hat x_0(x_i^\text{pred}, t_i)$; if $i > 0$, correct
    $x_i \leftarrow \frac{s_i}{s_{i-1}}e^{-\tau^2 h}x_{i-1} + \sum_j w^c_j D_j + s_i\sqrt{1 - e^{-2\tau^2 h}}\,z_{i-1}$;
    then predict $x_{i+1} = \frac{s_{i+1}}{s_i}e^{-\tau^2 h}x_i + \sum_j w^p_j D_j + s_{i+1}\sqrt{1 - e^{-2\tau^2 h}}\,z_i$.
    Order $\max(k_p, k_c)$ for the deterministic part ($\tau = 0$); the noise makes it weak order 1 in
    general (Xue et al. 2023, Thm. 5.1-5.2). One score evaluation per step.

    Args:
        predictor_order: $k_p \in \{1, 2, 3, 4\}$.
        corrector_order: $k_c \in \{0, 1, 2, 3, 4\}$ (0: no corrector).
        tau: $\tau \ge 0$ inside the window.
        tau_sigma: ``(sigma_lo, sigma_hi)``: $\tau$ applies to steps starting at $\sigma \in$ that window;
            ``None``: every step.
        n_steps: number of grid steps $N$ (for ``lower_order_final``); ``None``: the grid's (set by `prepare`).
        lower_order_final: lower the orders on the last steps.
        table: per-step host-float weights, built by `prepare` from the grid's
            [`GridCoefficients`][sdegen.solvers.marginal_rows.GridCoefficients] (the loop prepares a
            solver constructed without it).
        table_times: the grid ``table`` was built for (set by `prepare`; a run on another grid is a ``ValueError``).
    """

    predictor_order: int = 2
    corrector_order: int = 2
    tau: float = 1.0
    tau_sigma: tuple | None = None
    n_steps: int | None = None
    lower_order_final: bool = True

    stochastic: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 1

    @property
    def order(self) -> float:  # type: ignore[override]
        return float(max(self.predictor_order, self.corrector_order))

    def __post_init__(self):
        if self.predictor_order not in (1, 2, 3, 4) or isinstance(self.predictor_order, bool):
            raise ValueError(f"predictor_order must be 1, 2, 3 or 4, got {self.predictor_order!r}")
        if self.corrector_order not in (0, 1, 2, 3, 4) or isinstance(self.corrector_order, bool):
            raise ValueError(f"corrector_order must be 0, 1, 2, 3 or 4, got {self.corrector_order!r}")
        if not isinstance(self.tau, (int, float)) or isinstance(self.tau, bool) or not (0.0 <= self.tau < math.inf):
            raise ValueError(f"tau must be a finite float >= 0, got {self.tau!r}")
        win = self.tau_sigma
        if win is not None and not (isinstance(win, (tuple, list)) and len(win) == 2
                                    and all(isinstance(v, (int, float)) for v in win) and 0 <= win[0] <= win[1]):
            raise ValueError(f"tau_sigma must be None or a pair (sigma_lo, sigma_hi) with 0 <= lo <= hi, got {win!r}")

    def _tau_at(self, sigma: float) -> float:
        win = self.tau_sigma
        if win is None:
            return float(self.tau)
        # relative slack: a grid point on the window's edge (diffusers' 200 and 800) counts as inside
        inside = win[0] * (1 - 1e-9) <= sigma <= win[1] * (1 + 1e-9)
        return float(self.tau) if inside else 0.0

    def build_table(self, coefs: GridCoefficients) -> "SASolver":
        """The solver with its table for the grid of ``coefs`` (``n_steps`` defaults to the grid's); a solver
        that has one already is checked against that grid (``ValueError`` if it was built for another)."""
        solver = self if self.n_steps is not None else dataclasses.replace(self, n_steps=coefs.n)
        ms = list(zip(coefs.m, coefs.s))
        return dataclasses.replace(solver, table=solver._weights(ms, coefs.lam, coefs.t), table_times=tuple(coefs.t))

    def _update(self, ms, lams, a: int, b: int, nodes: list[int], tau: float, kind: str, scale: float):
        """``(lin, weights over nodes, noise coef)`` of one predictor/corrector update from grid point a to b."""
        (m0, s0), (m1, s1) = ms[a], ms[b]
        h = lams[b] - lams[a]
        c = 1.0 + tau * tau
        w = _adams_weights([lams[j] - lams[a] for j in nodes], h, c)
        if len(nodes) == 2:
            # diffusers' order-2 modification (see the module docstring); the derivative's weight becomes
            # c h^2/2 (predictor, over the previous spacing) or c h/2 (corrector).
            H = c * h
            base = (H - 1 + math.exp(-H)) / (c * c)
            delta = c * (h * h / 2 - base) / (lams[nodes[0]] - lams[nodes[1]]) if kind == "p" else c * (h / 2 - base / h)
            w = [w[0] + delta, w[1] - delta]
        lin = math.exp(-tau * tau * h) * s1 / s0
        noise = s1 * math.sqrt(-math.expm1(-2.0 * tau * tau * h)) * scale if tau > 0 else 0.0
        # the stored predictions are m_j * D_j (one kernel fewer per step): fold 1/m_j into the weights
        return lin, tuple(m1 * wj / ms[j][0] for wj, j in zip(w, nodes)), noise

    def _weights(self, ms: list, lams: list, tl: list) -> tuple:
        n = len(tl) - 1
        rows, prev_corr, done = [], 0, 0
        for i in range(n):
            tau_i = self._tau_at(ms[i][1] / ms[i][0])
            corr = None
            if i > 0 and prev_corr > 0:
                tau_prev = self._tau_at(ms[i - 1][1] / ms[i - 1][0])
                nodes = [i - k for k in range(prev_corr)]      # D_i (new), D_{i-1}, ...
                corr = self._update(ms, lams, i - 1, i, nodes, tau_prev, "c", 1.0 / math.sqrt(tl[i - 1] - tl[i]))
            kp, kc = self.predictor_order, self.corrector_order
            if self.lower_order_final:
                kp, kc = min(kp, n - i), min(kc, n - i + 1)
            kp, kc = min(kp, done + 1), min(kc, done + 2)
            nodes = [i - k for k in range(kp)]
            pred = self._update(ms, lams, i, i + 1, nodes, tau_i, "p", 1.0 / math.sqrt(tl[i] - tl[i + 1]))
            rows.append((ms[i][1] ** 2, corr, pred))
            prev_corr = kc if self.corrector_order > 0 else 0
            done = min(done + 1, max(self.predictor_order, self.corrector_order - 1))
        return tuple(rows)

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        if self.table is None:
            raise ValueError("SASolver needs its per-step table: run it through integrate_fixed_grid (which "
                             "prepares it) or build it with SASolver.tabulated(sde, times)")
        return 0, (), None, None

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        i, hist, x_prev, dw_prev = state
        s0sq, corr, pred = self.table[i]
        d = torch.add(x, dyn.score(x, t0), alpha=s0sq)                   # m0 * Tweedie x0_hat
        hist = (d, *hist)[:5]                                            # newest first
        if corr is not None:
            x = _update(corr, x_prev, hist, dw_prev)
        return _update(pred, x, hist, dw), None, (i + 1, hist, x, dw)


def _update(coefs: tuple, x: Tensor, hist: tuple, dw: Tensor | None) -> Tensor:
    r"""$\text{lin}\,x + \sum_j w_j d_j + c\,\Delta w$ for a row ``(lin, w, c)`` of host floats (``hist`` newest first,
    as ``w``); the noise term is skipped without ``dw`` or where $c = 0$. A new tensor, one kernel per term."""
    lin, w, cn = coefs
    out = x * lin
    for wj, dj in zip(w, hist):
        out.add_(dj, alpha=wj)
    if dw is not None and cn != 0.0:
        out.add_(dw, alpha=cn)
    return out


def build_sa_solver(ctx, opts: dict) -> SASolver:
    r"""``sdegen.sample`` builder: the grid from ``grid=`` (and ``rho=``) and the solver's options; the loop
    prepares its table on that grid."""
    from ..grids import get_grid

    ctx.dyn.affine      # TypeError for a non-affine SDE here, before the run
    grid_opts = {"rho": opts["rho"]} if isinstance(opts["grid"], str) and opts["grid"] == "karras" else {}
    ctx.times = get_grid(opts["grid"], ctx.sde, ctx.steps, ctx.eps, **grid_opts)
    win = opts["tau_sigma"]
    return SASolver(predictor_order=opts["predictor_order"], corrector_order=opts["corrector_order"], tau=opts["tau"],
                    tau_sigma=tuple(win) if isinstance(win, list) else win,
                    lower_order_final=check_bool(opts["lower_order_final"], "lower_order_final"))


#: ``sdegen.sample(method="sa_solver")`` options (diffusers' ``SASolverScheduler`` orders; $\tau = 1$ on
#: every step by default, the reverse SDE's noise level).
SA_SOLVER_OPTIONS = {"predictor_order": 2, "corrector_order": 2, "tau": 1.0, "tau_sigma": None, "grid": "karras",
                     "rho": 7.0, "lower_order_final": True}
