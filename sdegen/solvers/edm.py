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

from .._utils import append_dims, check_bool, check_number
from ..sdes import AffineSDE
from .base import AbstractFixedGridSolver, Dynamics

__all__ = ["HeunKarras"]


def _scaled_derivative(dyn: Dynamics, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    r"""$d\hat x/d\sigma = (\hat x - D)/\sigma$ at the unscaled state ``x`` (one score evaluation).

    With Tweedie's $D = (x + s^2\nabla\log p_t)/m$ and $\sigma = s/m$ this is exactly
    $-s(t)\,\nabla\log p_t(x)$ (= $\hat\epsilon$): no division by a small $\sigma$, no second marginal call."""
    return -append_dims(s, x.ndim) * dyn.score(x, t)


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

    Order 2 (deterministic, ``s_churn = 0``); with churn it is a stochastic sampler of weak order 1.
    Score evaluations: 2 per step (1 on a final Euler step).

    Args:
        n_steps: number of grid steps $N$ (for $\gamma$ and to recognise the last step); ``None``
            disables ``final_euler`` and requires ``s_churn == 0``.
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
    #: Optional per-step ``(r, e, c0, c1)`` host floats for the grid this solver runs on (see
    #: [`tabulated`][sdegen.solvers.edm.HeunKarras.tabulated]; deterministic steps only): the same step with scalar coefficients.
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
        r"""This solver with each step's coefficients computed once in float64 on the host.

        Without churn a step is linear in $x$ and the two scores. With $r = m_1/m_0$ and
        $h = \sigma_1 - \sigma_0$, since $d = -s\,\nabla\log p$ (see ``_scaled_derivative``):

        $$x_\text{Euler} = r\,x - m_1 h s_0\,S_0,\qquad
          x_1 = r\,x - \tfrac12 m_1 h\,(s_0 S_0 + s_1 S_1),$$

        $S_0 = \nabla\log p_{t_0}(x)$, $S_1 = \nabla\log p_{t_1}(x_\text{Euler})$: three kernels per
        stage instead of two marginal evaluations and a dozen tensor ops. Returns ``self`` unchanged
        when churn is on (its noise level moves with the step)."""
        if self.s_churn > 0:
            return self
        t = times.detach().to("cpu", torch.float64)
        m, s = sde.marginal(t)
        m0, s0, m1, s1 = m[:-1], s[:-1], m[1:], s[1:]
        h = s1 / m1 - s0 / m0
        rows = tuple(zip((m1 / m0).tolist(), (-m1 * h * s0).tolist(), (-0.5 * m1 * h * s0).tolist(),
                         (-0.5 * m1 * h * s1).tolist()))
        return dataclasses.replace(self, table=rows)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Consumes noise only when churn is on."""
        return self.s_churn > 0

    def nfe(self, steps: int) -> int:
        """``2 * steps``, one fewer with ``final_euler`` (the last step skips the correction)."""
        return 2 * steps - (1 if self.final_euler and self.n_steps is not None and steps >= self.n_steps else 0)

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        return 0  # the step index, to apply final_euler on the last step

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        last = self.n_steps is not None and state + 1 >= self.n_steps
        if self.table is not None:
            r, e, c0, c1 = self.table[state]
            score0 = dyn.score(x, t0)
            x_euler = torch.add(x * r, score0, alpha=e)
            if self.final_euler and last:
                return x_euler, None, state + 1
            return torch.add(x * r, score0, alpha=c0).add_(dyn.score(x_euler, t1), alpha=c1), None, state + 1
        sde = dyn.affine
        m0, s0 = sde.marginal(t0)
        m1, s1 = sde.marginal(t1)
        sig0, sig1 = s0 / m0, s1 / m1
        xs = x / append_dims(m0, x.ndim)                                   # \hat x = x / m
        t_hat, m_hat, s_hat, sig_hat = t0, m0, s0, sig0
        if self.s_churn > 0:
            gamma = min(self.s_churn / self.n_steps, math.sqrt(2.0) - 1.0)
            in_range = (sig0 >= self.s_tmin) & (sig0 <= self.s_tmax)
            sig_max = sde.sigma(torch.full_like(t0, sde.T))
            # Raising the noise above sigma(T) has no time to map to: clamp at T.
            sig_hat = torch.where(in_range, torch.minimum(sig0 * (1 + gamma), sig_max), sig0)
            t_hat = torch.where(in_range, sde.t_from_sigma(sig_hat).to(t0.dtype), t0)
            m_hat, s_hat = sde.marginal(t_hat)
            # dw has variance |t1 - t0|: rescale it to the unit-variance draw z of Alg. 2.
            z = dw / (t0 - t1).abs().sqrt().reshape(-1, *([1] * (x.ndim - 1)))
            add = (sig_hat.square() - sig0.square()).clamp_min(0).sqrt() * self.s_noise
            xs = xs + append_dims(add, x.ndim) * z
        h = append_dims(sig1 - sig_hat, x.ndim)
        d = _scaled_derivative(dyn, xs * append_dims(m_hat, x.ndim), t_hat, s_hat)
        xs_euler = xs + h * d
        if self.final_euler and last:
            return xs_euler * append_dims(m1, x.ndim), None, state + 1
        d1 = _scaled_derivative(dyn, xs_euler * append_dims(m1, x.ndim), t1, s1)
        return (xs + 0.5 * h * (d + d1)) * append_dims(m1, x.ndim), None, state + 1


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
    # Not affine: the generic step raises the clear "needs an AffineSDE" error on its first call.
    return solver.tabulated(ctx.sde, ctx.times) if isinstance(ctx.sde, AffineSDE) else solver


#: ``sdegen.sample(method="heun_karras")`` options and defaults.
#: The solver options' defaults are the class fields' (one source); grid and rho are the builder's.
HEUN_KARRAS_OPTIONS = {"grid": "karras", "rho": 7.0,
                       **{f.name: f.default for f in fields(HeunKarras) if f.name not in ("n_steps", "table")}}
