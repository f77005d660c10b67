r"""Restart sampling (Xu et al. 2023): probability-flow ODE segments with forward re-noising restarts.

The main pass solves the probability-flow ODE with Heun's method in $(\hat x = x/m, \sigma = s/m)$
(EDM, Karras et al. 2022, Alg. 1) from ``T`` to ``eps``. On reaching $t_\text{min}$ it *restarts* $K$
times: it adds forward noise from $t_\text{min}$ up to $t_\text{max} > t_\text{min}$ with the SDE's exact
kernel,

$$x_{t_\text{max}} = r\,x_{t_\text{min}} + q\,z,\qquad (r, q) = \texttt{sde.transition}(t_\text{min}, t_\text{max})$$

(VE: $q^2 = \sigma_\text{max}^2 - \sigma_\text{min}^2$, Xu et al. 2023, Alg. 1 line 6), and solves the ODE
back down to $t_\text{min}$ again on its own short grid; then the main pass continues. The forward
noise contracts the accumulated error of the earlier ODE steps (Xu et al. 2023, Thm. 3), so Restart
combines the ODE's small discretization error with the SDE's contraction.

In the one loop every move is a step of the time list: the downward steps are ODE steps, the
upward jump $t_\text{min} \to t_\text{max}$ is the noising step. Its unit draw $z$ comes from ``draw(k)``
(``RunContext.unit_draw``: the generator, or the per-sample seeds), like a corrector's, so that the
loop draws nothing on the many ODE steps.

Notation map (Xu et al. → sdegen): $[t_\text{min}, t_\text{max}]$ are given as noise levels
``restart_sigma`` $= (\sigma_\text{min}, \sigma_\text{max})$ in the σ picture; $K$ → ``restart_count``;
$N_\text{Restart}$ → ``restart_steps``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from ..sdes import AffineSDE
from .base import TabulatedSolver, Dynamics
from .marginal_rows import GridCoefficients, sigma_to_time

__all__ = ["Restart", "restart_times", "default_interval", "build_restart", "RESTART_OPTIONS"]


def restart_times(sde: AffineSDE, main: Tensor, sigma_min: float, sigma_max: float, count: int,
                  steps: int, rho: float = 7.0) -> Tensor:
    r"""The time list of a restart run: the main grid with $t_\text{min}$ inserted, and after it ``count``
    copies of $[t_\text{max}, \dots, t_\text{min}]$ (a Karras $\rho$ grid in σ of ``steps`` steps).

    Args:
        sde: the affine SDE.
        main: decreasing main grid ``(N + 1,)``.
        sigma_min: σ where restarts begin, inside the main grid's σ range.
        sigma_max: σ the restarts jump up to, ``> sigma_min`` and below $\sigma(T)$.
        count: number of restarts $K \ge 0$.
        steps: ODE steps per restart segment, >= 1.
        rho: the segment grid's $\rho$.

    Returns:
        float64 CPU tensor of times (not monotone: each restart jumps up).
    """
    main = torch.as_tensor(main).detach().to("cpu", torch.float64).reshape(-1)
    t_lo, t_hi = sigma_to_time(sde, [sigma_min, sigma_max])
    if not (float(main[-1]) < t_lo < t_hi <= float(main[0])):
        sig = sde.sigma(main[[0, -1]]).tolist()
        raise ValueError(f"restart_sigma must satisfy sigma(eps) < sigma_min < sigma_max <= sigma(T) = "
                         f"({sig[1]:.4g}, {sig[0]:.4g}); got ({sigma_min}, {sigma_max})")
    head = main[main > t_lo]
    tail = main[main < t_lo]
    k = torch.arange(steps + 1, dtype=torch.float64) / steps
    sig = (sigma_max ** (1 / rho) + k * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    seg = torch.tensor(sigma_to_time(sde, sig[1:-1].tolist()) if steps > 1 else [], dtype=torch.float64)
    seg = torch.cat([torch.tensor([t_hi], dtype=torch.float64), seg, torch.tensor([t_lo], dtype=torch.float64)])
    parts = [head, torch.tensor([t_lo], dtype=torch.float64)] + [seg] * count + [tail]
    return torch.cat(parts)


@dataclass(frozen=True)
class Restart(TabulatedSolver):
    r"""Restart sampling: Heun ODE steps down, exact forward-kernel jumps up (see the module docstring).

    Downward step $t_0 \to t_1$ (EDM Heun, $d = (\hat x - D)/\sigma = -s\nabla\log p_t$):
    $\hat x' = \hat x_0 + (\sigma_1 - \sigma_0) d_0$, $\hat x_1 = \hat x_0 + (\sigma_1 - \sigma_0)(d_0 + d')/2$,
    $x = m\hat x$ (2 evaluations). Upward step $t_0 \to t_1 > t_0$: $x_1 = r x_0 + q z$ (no evaluation).
    Order 2 on the ODE segments; the restarts make it a stochastic sampler.

    The time list (from `restart_times`) is the grid the loop runs on; `prepare` reads every time's
    $(m, s)$ from its [`GridCoefficients`][sdegen.solvers.marginal_rows.GridCoefficients] and each
    distinct jump's $(r, q)$ from one `GridCoefficients` on $[t_\text{max}, t_\text{min}]$.

    Args:
        table: per-step rows, built by `prepare` (the loop prepares a solver constructed without it).
        draw: ``draw(k) -> Tensor``, the k-th unit Gaussian shaped like ``x`` (one per restart); required
            when the time list jumps up.
        table_times: the time list ``table`` was built for (set by `prepare`; a run on another is a ``ValueError``).
    """

    draw: Callable[[int], Tensor] | None = field(default=None, repr=False)

    order: ClassVar[float] = 2.0
    stochastic: ClassVar[bool] = False      # the loop's Brownian path is unused: restarts draw from `draw`
    evals_per_step: ClassVar[int] = 2

    def build_table(self, coefs: GridCoefficients) -> "Restart":
        """The solver with its table for the time list of ``coefs``; a solver that has one already is checked
        against that list (``ValueError`` if it was built for another)."""
        t, ms = coefs.t, list(zip(coefs.m, coefs.s))
        jumps: dict[tuple[float, float], tuple[float, float]] = {}
        rows = []
        for k in range(len(t) - 1):
            (m0, s0), (m1, s1) = ms[k], ms[k + 1]
            if t[k + 1] > t[k]:
                if (t[k], t[k + 1]) not in jumps:
                    # the kernel x_{t_max} | x_{t_min}: the one step of the decreasing grid [t_max, t_min]
                    up = GridCoefficients(coefs.sde, [t[k + 1], t[k]])
                    jumps[t[k], t[k + 1]] = up.r[0], up.q[0]
                rows.append(("up", *jumps[t[k], t[k + 1]]))
            else:
                dsig = s1 / m1 - s0 / m0
                # x_e = (m1/m0) x - m1 dsig s0 score0;  x_1 = (m1/m0) x - m1 dsig (s0 score0 + s1 score1)/2
                rows.append(("down", m1 / m0, -m1 * dsig * s0, -0.5 * m1 * dsig * s0, -0.5 * m1 * dsig * s1))
        return dataclasses.replace(self, table=tuple(rows), table_times=tuple(t))

    def nfe(self, steps: int) -> int:
        """Two evaluations per downward step of the time list, none per restart (upward jump); needs the
        table, which knows the list (`prepare`)."""
        if self.table is None:
            raise ValueError("Restart.nfe needs the table of its time list: prepare it first (Restart.tabulated)")
        return 2 * sum(row[0] == "down" for row in self.table[:steps])

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        if self.table is None:
            raise ValueError("Restart needs its per-step table: run it through integrate_fixed_grid (which "
                             "prepares it) or build it with Restart.tabulated(sde, times)")
        if self.draw is None and any(row[0] == "up" for row in self.table):
            raise ValueError("Restart with restarts needs draw= (unit Gaussian draws for the re-noising)")
        return 0, 0

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        i, k = state
        row = self.table[i]
        if row[0] == "up":
            return torch.add(x * row[1], self.draw(k), alpha=row[2]), None, (i + 1, k + 1)
        _, a, b_e, b0, b1 = row
        score0 = dyn.score(x, t0)
        xe = torch.add(x * a, score0, alpha=b_e)
        score1 = dyn.score(xe, t1)
        return torch.add(x * a, score0, alpha=b0).add_(score1, alpha=b1), None, (i + 1, k)


def default_interval(sde: AffineSDE, main: Tensor) -> tuple[float, float]:
    r"""$(0.06, 0.30)$ when it lies inside the grid's noise levels $(\sigma(\epsilon), \sigma(T))$, else the
    interval at the same place in $\log\sigma$ relative to the range: fractions 0.2 and 0.4 of it from the bottom."""
    lo, hi = sde.sigma(torch.as_tensor(main, dtype=torch.float64)[[-1, 0]]).tolist()
    if lo < 0.06 and 0.30 < hi:
        return 0.06, 0.30
    a, b = math.log(lo), math.log(hi)
    return math.exp(a + 0.2 * (b - a)), math.exp(a + 0.4 * (b - a))


def build_restart(ctx, opts: dict) -> Restart:
    r"""``sdegen.sample`` builder: main grid from ``grid=``/``rho=``, restarts inserted, table computed.

    The table is prepared here, not by the loop: the runner reads ``solver.nfe(n)``, which depends on where
    the time list jumps up, from the solver it built (the loop's prepare then only checks the list)."""
    from ..grids import get_grid

    sde = ctx.dyn.affine
    interval = opts["restart_sigma"]
    if interval is not None and not (isinstance(interval, (tuple, list)) and len(interval) == 2
                                     and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)):
        raise ValueError(f"restart_sigma must be None or a pair (sigma_min, sigma_max) of floats, got {interval!r}")
    count, seg = opts["restart_count"], opts["restart_steps"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"restart_count must be an int >= 0, got {count!r}")
    if not isinstance(seg, int) or isinstance(seg, bool) or seg < 1:
        raise ValueError(f"restart_steps must be an int >= 1, got {seg!r}")
    grid_opts = {"rho": opts["rho"]} if isinstance(opts["grid"], str) and opts["grid"] == "karras" else {}
    main = get_grid(opts["grid"], sde, ctx.steps, ctx.eps, **grid_opts)
    if interval is None:
        interval = default_interval(sde, main)
    ctx.times = restart_times(sde, main, float(interval[0]), float(interval[1]), count, seg, rho=float(opts["rho"]))
    return Restart.tabulated(sde, ctx.times, draw=ctx.unit_draw())


#: ``sdegen.sample(method="restart")`` options: one restart interval at low noise (``None``: $\sigma \in [0.06, 0.30]$
#: when the grid spans it, see `default_interval`), $K = 2$ restarts of 3 Heun steps (Xu et al. 2023 tune
#: interval and count per data set; these are defaults).
RESTART_OPTIONS = {"restart_sigma": None, "restart_count": 2, "restart_steps": 3, "grid": "karras",
                   "rho": 7.0}
