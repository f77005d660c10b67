r"""DPM-Solver and DPM-Solver++ multistep: exponential integrators in $\lambda = \log(m/s)$, any affine SDE.

With $m = m(t)$, $s = s(t)$, $\lambda = \log(m/s)$ (half of ``sde.log_snr``), the probability-flow
ODE of an affine SDE has the exact variation-of-constants solutions (Lu et al. 2022a, eq. 3.4;
Lu et al. 2022b, eq. 8)

$$x_{t} = \frac{s_t}{s_r} x_r + s_t \int_{\lambda_r}^{\lambda_t} e^{\lambda} \hat x_0(\lambda)\,d\lambda
  \quad\text{(data prediction, DPM-Solver++)},$$
$$x_{t} = \frac{m_t}{m_r} x_r - m_t \int_{\lambda_r}^{\lambda_t} e^{-\lambda} \hat\epsilon(\lambda)\,d\lambda
  \quad\text{(noise prediction, DPM-Solver)},$$

with $\hat x_0 = (x + s^2\nabla\log p_t)/m$ (Tweedie) and $\hat\epsilon = -s\nabla\log p_t$. Expanding
the prediction in a Taylor series around $\lambda_r$ and integrating the exponential exactly, with
$h = \lambda_t - \lambda_r > 0$:

$$x_t = \frac{s_t}{s_r}x_r + m_t\big[\varphi_1 D + \varphi_2 D' + \varphi_3 D''\big],\quad
  \varphi_1 = 1 - e^{-h},\ \varphi_2 = h - 1 + e^{-h},\ \varphi_3 = \tfrac{h^2}{2} - h + 1 - e^{-h},$$
$$x_t = \frac{m_t}{m_r}x_r - s_t\big[\psi_1 E + \psi_2 E' + \psi_3 E''\big],\quad
  \psi_1 = e^{h} - 1,\ \psi_2 = e^{h} - 1 - h,\ \psi_3 = e^{h} - 1 - h - \tfrac{h^2}{2},$$

where $D^{(k)} = d^k\hat x_0/d\lambda^k$ at $\lambda_r$ (likewise $E$). The multistep method estimates
the derivatives from the last one or two predictions by divided differences on their $\lambda$'s
(the quadratic through three points for order 3), so each step costs one score evaluation. Order
$k$ drops the terms above $\varphi_k$; order 1 is DDIM (Lu et al. 2022a, §4.1).

Notation map (DPM-Solver → sdegen): $\alpha_t$ → ``mean_coef`` $m$; $\sigma_t$ → ``std`` $s$;
$\lambda_t$ → ``0.5 * sde.log_snr(t)``; $x_\theta$ → ``x0``; $\epsilon_\theta$ → ``eps_hat``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from .._utils import check_bool, check_int
from .marginal_rows import GridCoefficients
from .multistep import ScoreHistoryMultistep, affine_grid, check_n_steps

__all__ = ["DPMSolver", "PREDICTIONS", "SOLVER_TYPES"]

#: The two forms: ``"data"`` (DPM-Solver++) and ``"noise"`` (DPM-Solver).
PREDICTIONS = ("data", "noise")
#: The second-order coefficient: ``"exact"`` ($\varphi_2$; diffusers' ``solver_type="heun"``) or
#: ``"midpoint"`` ($\tfrac h2\varphi_1$; diffusers' default ``solver_type="midpoint"``, k-diffusion's
#: ``sample_dpmpp_2m``).
SOLVER_TYPES = ("exact", "midpoint")


@dataclass(frozen=True)
class DPMSolver(ScoreHistoryMultistep):
    r"""Multistep DPM-Solver++ (``prediction="data"``) or DPM-Solver (``"noise"``) of order 1, 2 or 3.

    Step $t_i \to t_{i+1}$ with $h = \lambda_{i+1} - \lambda_i$ and data predictions
    $D_j = \hat x_0(x_j, t_j)$ kept from earlier steps (the ``state``):

    - order 1 (DDIM): $x_{i+1} = \frac{s_{i+1}}{s_i}x_i + m_{i+1}\varphi_1 D_i$;
    - order 2 (DPM-Solver++(2M), Lu et al. 2022b, Alg. 2, with exact $\varphi_2$):
      $+\ m_{i+1}\varphi_2\,(D_i - D_{i-1})/h_{i-1}$;
    - order 3 (3M, Lu et al. 2022b, App. B): $+\ m_{i+1}(\varphi_2 D' + \varphi_3 D'')$ with $D', D''$
      from the quadratic through $D_{i-2}, D_{i-1}, D_i$ in $\lambda$.

    (Noise form: replace $s/s$ by $m/m$, $m_{i+1}\varphi_k$ by $-s_{i+1}\psi_k$, $D$ by $\hat\epsilon$.)
    ``solver_type="midpoint"`` replaces $\varphi_2$ on the order-2 steps by $\tfrac h2\varphi_1$ (the
    two agree to $O(h^3)$, so the order stays 2): the form of diffusers' ``DPMSolverMultistepScheduler``
    (default ``solver_type="midpoint"``) and k-diffusion's ``sample_dpmpp_2m``, Lu et al. 2022b, Alg. 2
    as printed. sdegen's default ``"exact"`` is diffusers' ``solver_type="heun"``. Order-3 steps use
    the exact $\varphi_2, \varphi_3$ either way.

    The first steps use the orders their history allows (1, then 2, ...). With ``lower_order_final``
    the last steps also lower the order ($\min(\text{order}, N - i)$ on step $i$ of $N$): the steps
    near the data are the largest in $\lambda$ and a multistep extrapolation over them is least stable
    (Lu et al. 2022b, §3.3). One score evaluation per step; global order ``order``.

    Every coefficient depends only on the grid and the step index, so ``prepare`` (called once per run
    by the fixed-grid loop) computes them in float64 on the host: the divided differences of the
    predictions on their $\lambda$'s fold into one weight per stored prediction, and a step is
    $\ell\,x_i + \sum_j w_{ij} y_{i-j}$ with $y$ the prediction (``_weights``). It needs an
    [`AffineSDE`][sdegen.AffineSDE] with $s(t) > 0$ on the grid.

    Args:
        order: 1, 2 or 3 (default 3, as ``sample(method="dpm_solver")``).
        prediction: ``"noise"`` (DPM-Solver, default) or ``"data"`` (DPM-Solver++).
        n_steps: number of grid steps $N$ for ``lower_order_final`` (``None``: the grid's; when given it must
            be the grid's).
        lower_order_final: lower the order on the last steps (default off).
        solver_type: ``"exact"`` (default) or ``"midpoint"``, the order-2 coefficient (see above).
    """

    order: int = 3  # type: ignore[misc]  # an instance field here: the order is an option
    prediction: str = "noise"
    n_steps: int | None = None
    lower_order_final: bool = False
    solver_type: str = "exact"
    #: Per-step ``(lin, weights)`` for the grid this solver runs on (built by ``prepare``; leave ``None``).
    #: Per grid point the factors of the prediction: ``(s^2, 1/m)`` (data, $y = (x + s^2 S)/m$) or
    #: ``(None, -s)`` (noise, $y = -s S$), built by ``prepare``.
    table_y: tuple | None = field(default=None, repr=False)

    def __post_init__(self):
        check_int(self.order, "order")      # True and 2.0 are not orders: a TypeError
        if self.order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {self.order!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if self.n_steps is not None and (not isinstance(self.n_steps, int) or self.n_steps < 1):
            raise ValueError(f"n_steps must be a positive int or None, got {self.n_steps!r}")
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {', '.join(SOLVER_TYPES)}, got {self.solver_type!r}")

    @property
    def history(self) -> int:
        return self.order

    def prepare(self, coefs: GridCoefficients) -> "DPMSolver":
        r"""This solver with every step's weights for the grid of ``coefs`` (float64, on the host, once per run).

        Row $i$: $\ell = s_{i+1}/s_i$ (data) or $m_{i+1}/m_i$ (noise) and the weights $o\,w_j$ of the stored
        predictions $y_{i-j}$, newest first, $o = m_{i+1}$ (data) or $-s_{i+1}$ (noise); see ``_weights``."""
        affine_grid(self, coefs, log_snr=True)
        n = check_n_steps(self, coefs)
        m, s, lam = coefs.m, coefs.s, coefs.lam
        data = self.prediction == "data"
        rows = []
        for i in range(n):
            k = min(self.order, i + 1)      # the history holds the last min(order, i + 1) predictions
            if self.lower_order_final:
                k = max(1, min(k, n - i))
            lin, out = (s[i + 1] / s[i], m[i + 1]) if data else (m[i + 1] / m[i], -s[i + 1])
            w = self._weights(lam, i, k)
            rows.append((lin, [out * wj for wj in w]))
        ys = tuple((si * si, 1.0 / mi) if data else (None, -si) for mi, si in zip(m, s))
        return dataclasses.replace(self, n_steps=n, table=tuple(rows), table_y=ys)

    def _weights(self, lam: list[float], i: int, k: int) -> list[float]:
        r"""The weights of $y_i, y_{i-1}, \dots$ in the bracket of the order-$k$ step $i$ (before the factor $o$).

        With $h = \lambda_{i+1} - \lambda_i$, $(c_0, c_1, c_2) = (\varphi_1, \varphi_2, \varphi_3)(h)$ (data) or
        $(\psi_1, \psi_2, \psi_3)(h)$ (noise) and the Newton divided differences on the predictions'
        $\lambda$'s, $D_{10} = (y_i - y_{i-1})/h_0$, $D_{21} = (y_{i-1} - y_{i-2})/r_1$, $d_2 = (D_{10} - D_{21})/(h_0 + r_1)$
        ($h_0 = \lambda_i - \lambda_{i-1}$, $r_1 = \lambda_{i-1} - \lambda_{i-2}$), the bracket is
        $c_0 y_i$ ($k = 1$), $c_0 y_i + c_1 D_{10}$ ($k = 2$), $c_0 y_i + c_1(D_{10} + h_0 d_2) + 2 c_2 d_2$ ($k = 3$:
        the quadratic's $p'(\lambda_i)$ and $p''$), linear in the $y$'s."""
        h = lam[i + 1] - lam[i]
        if self.prediction == "data":
            em1 = math.expm1(-h)
            c = (-em1, h + em1, 0.5 * h * h - h - em1)
        else:
            ep1 = math.expm1(h)
            c = (ep1, ep1 - h, ep1 - h - 0.5 * h * h)
        if k == 2 and self.solver_type == "midpoint":
            c = (c[0], 0.5 * h * c[0], c[2])
        if k == 1:
            return [c[0]]
        h0 = lam[i] - lam[i - 1]
        if k == 2:
            return [c[0] + c[1] / h0, -c[1] / h0]
        r1 = lam[i - 1] - lam[i - 2]
        e = (c[1] * h0 + 2 * c[2]) / (h0 + r1)
        g = c[1] + e
        return [c[0] + g / h0, -g / h0 - e / r1, e / r1]

    def stored(self, x: Tensor, score: Tensor, i: int) -> Tensor:
        r"""The prediction $y_i$: Tweedie's $\hat x_0 = (x + s_i^2 S)/m_i$ (data) or $\hat\epsilon = -s_i S$ (noise)."""
        a, b = self.table_y[i]
        return torch.add(x, score, alpha=a).mul_(b) if a is not None else score * b


def build_dpm_solver(ctx, opts: dict) -> DPMSolver:
    r"""``sdegen.sample`` builder: sets ``ctx.times`` to the ``grid`` option and returns the solver.

    Defaults (order 3, noise prediction, Karras $\rho = 7$ grid, no lower-order final steps) are the
    best measured on the oracle problems (``sdegen bench solvers``): on $\mathcal N(0.5, 0.5^2)$ data
    under VP they give a variance error of about 0.5 % at 10 NFE and 0.6 % at 20."""
    from ..grids import get_grid

    grid = opts["grid"]
    if isinstance(grid, str):
        ctx.times = get_grid(grid, ctx.sde, ctx.steps, ctx.eps, **({"rho": opts["rho"]} if grid == "karras" else {}))
    else:  # a user grid sets the number of steps and the final time itself
        ctx.times = get_grid(grid, ctx.sde, None, None)
    # A user grid (a tensor) sets the number of steps itself. The loop prepares the weights for the grid.
    return DPMSolver(order=opts["order"], prediction=opts["prediction"], n_steps=ctx.times.numel() - 1,
                     lower_order_final=check_bool(opts["lower_order_final"], "lower_order_final"),
                     solver_type=opts["solver_type"])


#: ``sdegen.sample(method="dpm_solver")`` options and defaults.
#: The solver options' defaults are the class fields' (one source); grid and rho are the builder's.
DPM_SOLVER_OPTIONS = {**{f.name: f.default for f in fields(DPMSolver) if f.name not in ("n_steps", "table", "table_y")},
                      "grid": "karras", "rho": 7.0}
