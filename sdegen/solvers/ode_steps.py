r"""Fixed-grid step rules for the probability-flow ODE: Euler and Heun.

The probability-flow ODE $\frac{dx}{dt} = f(x,t) - \tfrac12 g(t)^2 s(x,t)$ (Song et al. 2021, eq. 13)
shares the marginals $p_t$ of the SDE. It is integrated from $T$ down to $\epsilon$ with the signed
step $\Delta t = t_1 - t_0 < 0$; these rules are deterministic and ignore ``dw``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._utils import append_dims
from ..sdes import AffineSDE
from .base import Dynamics
from .marginal_rows import GridCoefficients
from .sde_steps import Euler, TableRule


__all__ = ["ODEEuler", "ODEHeun"]


@dataclass(frozen=True)
class ODEEuler(Euler):
    r"""Explicit Euler on the probability-flow ODE: [`Euler`][sdegen.solvers.sde_steps.Euler] on the term
    $v = f - \tfrac12 g^2 s$ without noise, $x_1 = x_0 + v(x_0, t_0)\,\Delta t$ (``dw`` is ignored).
    Order 1 (global error $O(|\Delta t|)$); one score evaluation per step. `tabulated` (affine SDE, float64):
    $x_1 = (1 + a\Delta t)x_0 - \tfrac12 g^2\Delta t\, s$."""

    stochastic: ClassVar[bool] = False
    flow: ClassVar[bool] = True


@dataclass(frozen=True)
class ODEHeun(TableRule):
    r"""Heun's method (explicit trapezoidal rule, RK2) on the probability-flow ODE.

    $$\tilde x = x_0 + v(x_0, t_0)\,\Delta t, \qquad
      x_1 = x_0 + \tfrac12\,[v(x_0, t_0) + v(\tilde x, t_1)]\,\Delta t$$

    (Süli & Mayers 2003, eq. 12.21; the EDM sampler's ODE step, Karras et al. 2022, Alg. 1).
    Order 2; two score evaluations per step.
    """

    order: ClassVar[float] = 2.0
    stochastic: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 2

    @classmethod
    def tabulated(cls, sde: AffineSDE, times: Tensor) -> "ODEHeun":
        r"""Affine SDE, with $v(x, t) = a(t)x + h(t)s$, $h = -\tfrac12 g^2$, and $(\Delta t, a_0, h_0, a_1, h_1)$
        precomputed in float64 for every step."""
        return cls().prepare(GridCoefficients(sde, times))

    def prepare(self, coefs: GridCoefficients) -> "ODEHeun":
        if self.table is not None or not coefs.affine:
            return self  # a non-affine SDE: the velocity is evaluated on the fly
        a, h, dt = coefs.a, coefs.h, coefs.dt
        return type(self)(tuple((dt[i], a[i], h[i], a[i + 1], h[i + 1]) for i in range(coefs.n)))

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        if self.table is not None:
            dt, a0, h0, a1, h1 = self.table[state]
            v0 = torch.add(x * a0, dyn.score(x, t0), alpha=h0)
            x_pred = torch.add(x, v0, alpha=dt)
            v1 = torch.add(x_pred * a1, dyn.score(x_pred, t1), alpha=h1)
            return x.add(v0.add_(v1), alpha=0.5 * dt), None, state + 1
        dt = append_dims(t1 - t0, x.ndim)
        v0 = dyn.ode_drift(x, t0)
        v1 = dyn.ode_drift(x + v0 * dt, t1)
        return x + 0.5 * (v0 + v1) * dt, None, state
