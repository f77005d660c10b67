r"""EDM's second-order Heun sampler (Karras et al. 2022, Alg. 1 and 2) for any affine SDE.

Any [`AffineSDE`][sdegen.AffineSDE] is an EDM process in disguise: with $m = m(t)$, $s = s(t)$ and
$\sigma = s/m$, the scaled state $\hat x = x/m$ obeys the probability-flow ODE

$$\frac{d\hat x}{d\sigma} = \frac{\hat x - D(\hat x; \sigma)}{\sigma},\qquad
  D = \hat x_0 = \frac{x + s^2 \nabla_x\log p_t(x)}{m}\ \text{(Tweedie)}$$

(EDM eq. 4 with $s(t) \to m$, $\sigma(t) \to \sigma$; §2 and App. B.2 there). Its solution curves
are nearly straight lines in $(\sigma, \hat x)$, which is why a Heun step in $\sigma$ with the
$\rho$-schedule of [`sdegen.grids.karras`][sdegen.grids.karras] is accurate with few evaluations.

Notation map (EDM → sdegen): $s(t)$ → ``mean_coef`` $m$; $\sigma(t)$ → ``sigma`` $= s/m$;
$D_\theta$ → Tweedie's ``x0``; $\gamma_i$, $S_\text{churn}$, $S_\text{tmin}$, $S_\text{tmax}$,
$S_\text{noise}$ → ``s_churn`` etc.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._utils import check_bool, check_number
from .base import AbstractFixedGridSolver, Dynamics
from .marginal_rows import GridCoefficients, sigma_to_time
from .multistep import affine_grid, check_n_steps

__all__ = ["HeunKarras"]


@dataclass(frozen=True)
class HeunKarras(AbstractFixedGridSolver):
    r"""Heun's method on the probability-flow ODE in $(\hat x = x/m,\ \sigma)$, with optional churn.

    Step $t_i \to t_{i+1}$, $\sigma_i = \sigma(t_i)$ (Karras et al. 2022, Alg. 2):

    1. churn (only if ``s_churn > 0`` and $S_\text{tmin} \le \sigma_i \le S_\text{tmax}$):
       $\gamma = \min(S_\text{churn}/N, \sqrt2 - 1)$, $\hat\sigma = \sigma_i(1+\gamma)$,
       $\hat x \leftarrow \hat x + \sqrt{\hat\sigma^2 - \sigma_i^2}\,S_\text{noise}\,z$, $z \sim \mathcal N(0, I)$;
    2. Euler: $d = (\hat x - D(\hat x;\hat\sigma))/\hat\sigma$, $\hat x' = \hat x + (\sigma_{i+1} - \hat\sigma)\,d$;
    3. Heun correction: $d' = (\hat x' - D(\hat x';\sigma_{i+1}))/\sigma_{i+1}$,
       $\hat x_{i+1} = \hat x + (\sigma_{i+1} - \hat\sigma)(d + d')/2$; then $x_{i+1} = m(t_{i+1})\,\hat x_{i+1}$.

    On the last of ``n_steps`` steps the correction is skipped when ``final_euler`` (EDM's last step
    into $\sigma = 0$ is Euler, and Euler into $\sigma = 0$ is exactly the Tweedie denoiser).

    By Tweedie, $d = (\hat x - D)/\sigma = -s\,\nabla\log p_t$ (no division by a small $\sigma$), so in the
    unscaled state with $S = \nabla\log p$, $h = \sigma_{i+1} - \hat\sigma$ and $\hat t, \hat m, \hat s$ the
    time and marginal of $\hat\sigma$ ($= t_i, m_i, s_i$ without churn) a step is

    $$\hat x_u = \frac{\hat m}{m_i}x_i + \hat m\sqrt{\hat\sigma^2 - \sigma_i^2}\,S_\text{noise}\,z,\quad
      x_\text{Euler} = \frac{m_{i+1}}{\hat m}\hat x_u - m_{i+1} h \hat s\,S_0,\quad
      x_{i+1} = \frac{m_{i+1}}{\hat m}\hat x_u - \tfrac12 m_{i+1} h\,(\hat s S_0 + s_{i+1} S_1),$$

    $S_0 = S(\hat x_u, \hat t)$, $S_1 = S(x_\text{Euler}, t_{i+1})$: every coefficient depends on the grid
    only, and ``prepare`` (called once per run by the fixed-grid loop) computes them in float64 on the
    host for an [`AffineSDE`][sdegen.AffineSDE] (``TypeError`` for any other SDE).

    Order 2 (deterministic, ``s_churn = 0``); with churn it is a stochastic sampler of weak order 1.
    Score evaluations: 2 per step (1 on a final Euler step).

    Args:
        n_steps: number of grid steps $N$ (for $\gamma$ and to recognise the last step; when given it must be
            the grid's); ``None`` disables ``final_euler`` and requires ``s_churn == 0``.
        s_churn (float): EDM's churn amount $S_\text{churn}$ (0: deterministic).
        s_tmin (float): churn only where $\sigma \ge S_\text{tmin}$ ($\sigma$ units).
        s_tmax (float): churn only where $\sigma \le S_\text{tmax}$ ($\sigma$ units).
        s_noise (float): scale $S_\text{noise}$ of the added churn noise.
        final_euler: take an Euler step on the last step (saves one evaluation; default on, as
            ``sample(method="heun_karras")`` and EDM's Alg. 1; needs ``n_steps``).
    """

    n_steps: int | None = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    final_euler: bool = True
    #: Per-step ``(r, e, c0, c1, euler_only, churn)`` host floats for the grid this solver runs on (built by
    #: ``prepare``; leave ``None``): ``churn`` is ``None`` or ``(a, b, t_hat)`` of a churned step (see above).
    table: tuple | None = field(default=None, repr=False)

    order: ClassVar[float] = 2.0
    evals_per_step: ClassVar[int] = 2

    def __post_init__(self):
        if self.n_steps is not None and (not isinstance(self.n_steps, int) or self.n_steps < 1):
            raise ValueError(f"n_steps must be a positive int or None, got {self.n_steps!r}")
        for name in ("s_churn", "s_tmin", "s_noise"):
            v = getattr(self, name)
            check_number(v, name, low=0.0)
        if isinstance(self.s_tmax, bool) or not (isinstance(self.s_tmax, (int, float)) and self.s_tmax >= self.s_tmin):
            raise ValueError(f"s_tmax must be a number >= s_tmin={self.s_tmin}, got {self.s_tmax!r}")
        if self.s_churn > 0 and self.n_steps is None:
            raise ValueError("s_churn > 0 needs n_steps (the number of grid steps)")

    def tabulated(self, sde, times: Tensor) -> "HeunKarras":
        """This solver with each step's coefficients for the grid ``times`` (float64, on the host, once): what
        the fixed-grid loop does itself, ``self.prepare(GridCoefficients(sde, times))``."""
        return self.prepare(GridCoefficients(sde, times))

    def prepare(self, coefs: GridCoefficients) -> "HeunKarras":
        r"""This solver with row $i$ = $(r, e, c_0, c_1)$ = $(m_{i+1}/\hat m,\ -m_{i+1}h\hat s,\ -\tfrac12 m_{i+1}h\hat s,
        \ -\tfrac12 m_{i+1}h s_{i+1})$, whether the step is a final Euler step, and for a churned step
        $(\hat m/m_i,\ \hat m\sqrt{\hat\sigma^2 - \sigma_i^2}\,S_\text{noise}/\sqrt{|\Delta t|},\ \hat t)$ (the
        multipliers of $x_i$ and of the loop's Brownian increment $\Delta w = \sqrt{|\Delta t|}\,z$)."""
        affine_grid(self, coefs)
        if self.n_steps is not None:
            check_n_steps(self, coefs)
        m, s, n = coefs.m, coefs.s, coefs.n
        sig = [si / mi for mi, si in zip(m, s)]
        t_hat, m_hat, s_hat, sig_hat = list(coefs.t), list(m), list(s), list(sig)
        churned = [False] * (n + 1)
        if self.s_churn > 0:
            gamma = min(self.s_churn / self.n_steps, math.sqrt(2.0) - 1.0)
            sde = coefs.sde
            sig_max = float(sde.sigma(torch.tensor([sde.T], dtype=torch.float64)))
            steps = [i for i in range(n) if self.s_tmin <= sig[i] <= self.s_tmax]
            if steps:
                # Raising the noise above sigma(T) has no time to map to: clamp at T.
                up = [min(sig[i] * (1 + gamma), sig_max) for i in steps]
                moved = GridCoefficients(sde, sigma_to_time(sde, up))
                for j, i in enumerate(steps):
                    t_hat[i], m_hat[i], s_hat[i], sig_hat[i], churned[i] = moved.t[j], moved.m[j], moved.s[j], up[j], True
        rows = []
        for i in range(n):
            m1, s1 = m[i + 1], s[i + 1]
            h = sig[i + 1] - sig_hat[i]
            churn = None
            if churned[i]:
                add = math.sqrt(max(sig_hat[i] ** 2 - sig[i] ** 2, 0.0)) * self.s_noise
                churn = (m_hat[i] / m[i], m_hat[i] * add / math.sqrt(abs(coefs.dt[i])), t_hat[i])
            last = self.final_euler and self.n_steps is not None and i + 1 >= self.n_steps
            rows.append((m1 / m_hat[i], -m1 * h * s_hat[i], -0.5 * m1 * h * s_hat[i], -0.5 * m1 * h * s1, last, churn))
        return dataclasses.replace(self, table=tuple(rows))

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Consumes noise only when churn is on."""
        return self.s_churn > 0

    def nfe(self, steps: int) -> int:
        """``2 * steps``, one fewer with ``final_euler`` (the last step skips the correction)."""
        return 2 * steps - (1 if self.final_euler and self.n_steps is not None and steps >= self.n_steps else 0)

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        return 0  # the step index: the row of the table

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        r, e, c0, c1, euler_only, churn = self.table[state]
        if churn is not None:
            a, b, t_hat = churn
            x = torch.add(x * a, dw, alpha=b)
            t0 = torch.full_like(t0, t_hat)
        score0 = dyn.score(x, t0)
        x_euler = torch.add(x * r, score0, alpha=e)
        if euler_only:
            return x_euler, None, state + 1
        return torch.add(x * r, score0, alpha=c0).add_(dyn.score(x_euler, t1), alpha=c1), None, state + 1


def build_heun_karras(ctx, opts: dict) -> HeunKarras:
    r"""``sdegen.sample`` builder: sets ``ctx.times`` to the ``grid`` option (default Karras $\rho$) and
    returns the solver. ``ctx``: a `sdegen.sampling.RunContext` (``sde``, ``steps``, ``eps``)."""
    from ..grids import get_grid

    grid_opts = {"rho": opts["rho"]} if isinstance(opts["grid"], str) and opts["grid"] == "karras" else {}
    ctx.times = get_grid(opts["grid"], ctx.sde, ctx.steps, ctx.eps, **grid_opts)
    # A user grid (a tensor) sets the number of steps itself (final_euler and churn need it).
    solver = HeunKarras(n_steps=ctx.times.numel() - 1, s_churn=check_number(opts["s_churn"], "s_churn", low=0.0),
                        s_tmin=check_number(opts["s_tmin"], "s_tmin", low=0.0), s_tmax=opts["s_tmax"],
                        s_noise=check_number(opts["s_noise"], "s_noise", low=0.0),
                        final_euler=check_bool(opts["final_euler"], "final_euler"))
    return solver  # the loop prepares its coefficients for the grid (TypeError there for a non-affine SDE)


#: ``sdegen.sample(method="heun_karras")`` options and defaults.
#: The solver options' defaults are the class fields' (one source); grid and rho are the builder's.
HEUN_KARRAS_OPTIONS = {"grid": "karras", "rho": 7.0,
                       **{f.name: f.default for f in fields(HeunKarras) if f.name not in ("n_steps", "table")}}
