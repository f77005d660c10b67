r"""Fixed-grid step rules for the probability-flow ODE: Euler and Heun.

The probability-flow ODE $\frac{dx}{dt} = f(x,t) - \tfrac12 g(t)^2 s(x,t)$ (Song et al. 2021, eq. 13)
shares the marginals $p_t$ of the SDE. It is integrated from $T$ down to $\epsilon$ with the signed
step $\Delta t = t_1 - t_0 < 0$; these rules are deterministic and ignore ``dw``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from .._utils import append_dims
from .base import AbstractFixedGridSolver, Dynamics

__all__ = ["ODEEuler", "ODEHeun"]


@dataclass(frozen=True)
class ODEEuler(AbstractFixedGridSolver):
    r"""Explicit Euler on the probability-flow ODE: $x_1 = x_0 + v(x_0, t_0)\,\Delta t$, with
    $v = f - \tfrac12 g^2 s$. Order 1 (global error $O(|\Delta t|)$); one score evaluation per step."""

    order: ClassVar[float] = 1.0
    stochastic: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 1

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        return x + dyn.ode_drift(x, t0) * append_dims(t1 - t0, x.ndim), state


@dataclass(frozen=True)
class ODEHeun(AbstractFixedGridSolver):
    r"""Heun's method (explicit trapezoidal rule, RK2) on the probability-flow ODE.

    $$\tilde x = x_0 + v(x_0, t_0)\,\Delta t, \qquad
      x_1 = x_0 + \tfrac12\,[v(x_0, t_0) + v(\tilde x, t_1)]\,\Delta t$$

    (Süli & Mayers 2003, eq. 12.21; the EDM sampler's ODE step, Karras et al. 2022, Alg. 1).
    Order 2; two score evaluations per step.
    """

    order: ClassVar[float] = 2.0
    stochastic: ClassVar[bool] = False
    evals_per_step: ClassVar[int] = 2

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        dt = append_dims(t1 - t0, x.ndim)
        v0 = dyn.ode_drift(x, t0)
        v1 = dyn.ode_drift(x + v0 * dt, t1)
        return x + 0.5 * (v0 + v1) * dt, state
