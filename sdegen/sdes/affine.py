r"""Affine SDEs $dx = a(t)\,x\,dt + g(t)\,dw$: Gaussian transition kernels and derived schedules.

For an affine SDE started at $x_0$, $x_t \mid x_0 \sim \mathcal N(m(t) x_0, s(t)^2 I)$ with

$$m(t) = \exp\!\Big(\int_0^t a(u)\,du\Big), \qquad
  \frac{d s^2}{dt} = 2 a(t) s^2 + g(t)^2,\ s(0) = 0
  \;\Longleftrightarrow\; s(t)^2 = m(t)^2 \int_0^t \frac{g(u)^2}{m(u)^2}\,du$$

(Särkkä & Solin 2019, "Applied SDEs", eq. 6.2–6.3). Notation map: ``mean_coef`` $= m(t)$
(DDPM's $\sqrt{\bar\alpha}$), ``std`` $= s(t)$ ($\sqrt{1-\bar\alpha}$), ``sigma`` $= s/m$ (EDM's
$\sigma$), ``log_snr`` $= \log(m^2/s^2)$ (twice DPM-Solver's $\lambda$).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .._utils import append_dims, as_time, check_positive
from .base import SDE, eval_time_fn

__all__ = ["AffineSDE"]

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)


class AffineSDE(SDE):
    r"""Affine SDE $dx = a(t)\,x\,dt + g(t)\,dw$ with its Gaussian transition kernel.

    Give ``a`` and ``g`` as callables of a ``(B,)`` time tensor (or subclass and override
    [`drift_coef`][sdegen.sdes.affine.AffineSDE.drift_coef], [`diffusion`][sdegen.sdes.affine.AffineSDE.diffusion] and, where known in closed form, [`marginal`][sdegen.sdes.affine.AffineSDE.marginal]).
    Without a closed form, ``marginal`` is computed numerically: $\log m$ and
    $V = \int_0^t g^2/m^2$ are tabulated once in float64 on ``grid_size`` intervals with nested
    8-point Gauss–Legendre quadrature and evaluated by cubic Hermite interpolation using the exact
    derivatives $a(t)$ and $g(t)^2/m(t)^2$ (error $O(h^4)$; below 1e-9 for the VP schedule).

    Derived once here for every affine SDE: ``sigma`` $= s/m$, ``log_snr`` $= \log(m^2/s^2)$, their
    inverses (``t_from_log_snr``, ``t_from_sigma``; bisection unless overridden) and
    $d\sigma/dt = g^2/(2 m^2 \sigma)$.

    Args:
        a: drift coefficient $a(t)$, ``(B,) -> (B,)``.
        g: diffusion coefficient $g(t)$, ``(B,) -> (B,)``.
        T: end time.
        prior_std: std of the $\mathcal N(0, \sigma_T^2 I)$ prior; default $s(T)$ (which ignores the
            $m(T) x_0$ part of $x_T$, as VP's $\mathcal N(0, I)$ does).
        grid_size: number of table intervals for the numerical marginal.
    """

    def __init__(self, a: Callable[[Tensor], Tensor] | None = None, g: Callable[[Tensor], Tensor] | None = None,
                 *, T: float = 1.0, prior_std: float | None = None, grid_size: int = 1024):
        super().__init__(T)
        if (a is None) != (g is None):
            raise ValueError("give both a(t) and g(t), or neither (and override drift_coef/diffusion)")
        if a is not None and not callable(a):
            raise TypeError(f"a must be callable a(t), got {type(a).__name__}")
        if g is not None and not callable(g):
            raise TypeError(f"g must be callable g(t), got {type(g).__name__}")
        self._a_fn = a
        self._g_fn = g
        if not isinstance(grid_size, int) or grid_size < 8:
            raise ValueError(f"grid_size must be an int >= 8, got {grid_size!r}")
        self._grid_size = grid_size
        self._tables: dict | None = None
        self._table_cache: dict = {}
        self._prior_std_arg = None if prior_std is None else check_positive(prior_std, "prior_std")

    # ------------------------------------------------------------------ coefficients
    def drift_coef(self, t: Tensor) -> Tensor:
        r"""$a(t)$ with $f(x, t) = a(t)\,x$. ``(B,) -> (B,)``."""
        if self._a_fn is None:
            raise NotImplementedError(f"{type(self).__name__} must override drift_coef or pass a=")
        return eval_time_fn(self._a_fn, t, "a")

    def diffusion(self, t: Tensor) -> Tensor:
        r"""$g(t)$. ``(B,) -> (B,)``."""
        if self._g_fn is None:
            raise NotImplementedError(f"{type(self).__name__} must override diffusion or pass g=")
        return eval_time_fn(self._g_fn, t, "g")

    def ode_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r"""$(a(t), -\tfrac12 g(t)^2)$: the probability-flow velocity of an affine SDE is
        $v(x, t) = a(t)\,x - \tfrac12 g(t)^2\,\nabla_x\log p_t(x)$. ``(B,) -> ((B,), (B,))``, two tensors.

        Subclasses override it when both coefficients share work (one evaluation of the schedule)."""
        return self.drift_coef(t), -0.5 * self.diffusion(t).square()

    def drift_with_score(self, x: Tensor, t: Tensor, score: Tensor, k: float) -> Tensor:
        r"""$a(t)\,x + k\,h(t)\,s$ with $(a, h)$ = [`ode_coefs`][sdegen.sdes.affine.AffineSDE.ode_coefs]: $f - \tfrac k2 g^2 s$
        in 2-3 fused tensor operations (see [`SDE.drift_with_score`][sdegen.sdes.base.SDE.drift_with_score])."""
        a, h = self.ode_coefs(t)
        return torch.addcmul(x * append_dims(a, x.ndim), append_dims(h * k if k != 1.0 else h, x.ndim), score)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        r"""$f(x, t) = a(t)\,x$. ``x``: ``(B, *D)``, ``t``: ``(B,)``."""
        return append_dims(self.drift_coef(t), x.ndim) * x

    # ------------------------------------------------------------------ marginal
    def marginal(self, t) -> tuple[Tensor, Tensor]:
        r"""Transition kernel from 0: $x_t \mid x_0 \sim \mathcal N(m(t)\,x_0,\ s(t)^2 I)$.

        Args:
            t (Tensor | float): ``(B,)`` (or a float), in ``[0, T]``.

        Returns:
            ``(mean_coef, std)``, each ``(B,)``, on ``t``'s device and dtype.
        """
        t = self._as_t(t)
        log_m, V = self._numerical(t)
        m = log_m.exp()
        return m, m * V.clamp_min(0).sqrt()

    def _as_t(self, t) -> Tensor:
        if not isinstance(t, Tensor):
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise TypeError(f"t must be a float or a tensor, got {type(t).__name__}")
            t = torch.tensor([float(t)], dtype=torch.get_default_dtype())
        elif t.ndim == 0:
            t = t.reshape(1)
        return self.time(t, t.new_empty((t.shape[0], 1)))

    def _numerical(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Hermite-interpolated $(\\log m(t), V(t))$ from the float64 tables."""
        key = (t.device, t.dtype)
        tab = self._table_cache.get(key)
        if tab is None:
            base = self._build_tables()
            tab = {k: v.to(device=t.device, dtype=t.dtype) for k, v in base.items()}
            self._table_cache[key] = tab
        K = self._grid_size
        h = self.T / K
        pos = t / h
        k = pos.floor().clamp(0, K - 1)
        u = pos - k
        k = k.long()
        u2, u3 = u * u, u * u * u
        h00, h10, h01, h11 = 2 * u3 - 3 * u2 + 1, u3 - 2 * u2 + u, -2 * u3 + 3 * u2, u3 - u2

        def interp(y, dy):
            return h00 * y[k] + h10 * h * dy[k] + h01 * y[k + 1] + h11 * h * dy[k + 1]

        return interp(tab["logm"], tab["a"]), interp(tab["V"], tab["dV"])

    def _build_tables(self) -> dict:
        if self._tables is not None:
            return self._tables
        K, T = self._grid_size, self.T
        f64 = torch.float64
        nodes = torch.tensor(_GL_NODES, dtype=f64)
        w = torch.tensor(_GL_WEIGHTS, dtype=f64)
        grid = torch.linspace(0.0, T, K + 1, dtype=f64)
        h = T / K
        left = grid[:-1]
        s = left[:, None] + 0.5 * h * (1 + nodes)[None, :]                       # (K, 8) outer nodes
        a_s = self.drift_coef(s.reshape(-1)).reshape(K, 8)
        logm_grid = torch.cat([torch.zeros(1, dtype=f64), torch.cumsum((0.5 * h * w * a_s).sum(1), 0)])
        # log m at the outer nodes: log m(left) + \int_left^s a, by an inner rule on [left, s].
        span = s - left[:, None]                                                  # (K, 8)
        r = left[:, None, None] + 0.5 * span[:, :, None] * (1 + nodes)[None, None, :]
        a_r = self.drift_coef(r.reshape(-1)).reshape(K, 8, 8)
        logm_s = logm_grid[:-1, None] + (0.5 * span[:, :, None] * w * a_r).sum(-1)
        g_s = self.diffusion(s.reshape(-1)).reshape(K, 8)
        integrand = g_s.square() * torch.exp(-2 * logm_s)
        V_grid = torch.cat([torch.zeros(1, dtype=f64), torch.cumsum((0.5 * h * w * integrand).sum(1), 0)])
        a_grid = self.drift_coef(grid)
        g_grid = self.diffusion(grid)
        dV_grid = g_grid.square() * torch.exp(-2 * logm_grid)
        if not all(torch.isfinite(v).all() for v in (logm_grid, V_grid, dV_grid)):
            raise ValueError(f"{type(self).__name__}: a(t) or g(t) is not finite on [0, T]")
        self._tables = {"logm": logm_grid, "a": a_grid, "V": V_grid, "dV": dV_grid}
        return self._tables

    # ------------------------------------------------------------------ derived schedules
    def sigma(self, t) -> Tensor:
        r"""$\sigma(t) = s(t)/m(t)$, the noise level of $x_t / m(t)$ (EDM's $\sigma$). ``(B,)``."""
        m, s = self.marginal(t)
        return s / m

    def log_snr(self, t) -> Tensor:
        r"""$\log \mathrm{SNR}(t) = \log(m^2 / s^2) = -2\log\sigma(t)$. ``(B,)``; $+\infty$ at $s=0$."""
        m, s = self.marginal(t)
        return 2 * (m.log() - s.log())

    def dsigma_dt(self, t) -> Tensor:
        r"""$d\sigma/dt = g(t)^2 / (2\,m(t)^2\,\sigma(t))$, from $d(\sigma^2)/dt = g^2/m^2$. ``(B,)``."""
        t = self._as_t(t)
        m, s = self.marginal(t)
        return self.diffusion(t).square() / (2 * m * s)

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        r"""Inverse of [`log_snr`][sdegen.sdes.affine.AffineSDE.log_snr] (which decreases in $t$); 64 bisection steps in float64.

        Values outside the range of ``log_snr`` on ``[0, T]`` clamp to the ends.
        """
        lam = torch.as_tensor(log_snr)
        target = lam.to(torch.float64)
        lo = torch.zeros_like(target)
        hi = torch.full_like(target, self.T)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            # nan_to_num: log_snr(0) = +inf is fine for the comparison.
            above = self.log_snr(mid.reshape(-1)).reshape(mid.shape) > target
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(lam.dtype if lam.is_floating_point() else torch.get_default_dtype())

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        r"""Inverse of [`sigma`][sdegen.sdes.affine.AffineSDE.sigma]: the $t$ with $s(t)/m(t) = \sigma$."""
        sigma = torch.as_tensor(sigma)
        return self.t_from_log_snr(-2 * sigma.log())

    def transition(self, t_from: Tensor, t_to: Tensor) -> tuple[Tensor, Tensor]:
        r"""Kernel between two times $t_\text{from} \le t_\text{to}$:
        $x_{t_\text{to}} \mid x_{t_\text{from}} \sim \mathcal N(r\,x,\ q^2 I)$ with
        $r = m(t_\text{to})/m(t_\text{from})$, $q^2 = s(t_\text{to})^2 - r^2 s(t_\text{from})^2$. ``(B,)`` each."""
        m0, s0 = self.marginal(t_from)
        m1, s1 = self.marginal(t_to)
        r = m1 / m0
        q2 = (s1.square() - (r * s0).square()).clamp_min(0)
        return r, q2.sqrt()

    def discretize_step(self, x: Tensor, t: Tensor, dt) -> tuple[Tensor, Tensor]:
        r"""Exact Gaussian step over $[t-\Delta t, t]$: $f_i = (r - 1)x$, $G_i = q$ (see [`transition`][sdegen.sdes.affine.AffineSDE.transition]).

        For VP this is the DDPM step with $\beta_i = 1 - m(t)^2/m(t-\Delta t)^2$; for VE it is the SMLD
        step with $G_i^2 = \sigma(t)^2 - \sigma(t-\Delta t)^2$ (Song et al. 2021, App. E).
        """
        dt = as_time(dt, x.shape[0], device=x.device, dtype=x.dtype, name="dt")
        r, q = self.transition((t - dt).clamp_min(0), t)
        return (append_dims(r, x.ndim) - 1) * x, q

    # ------------------------------------------------------------------ Tweedie conversions
    def x0_from_score(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        r"""Tweedie's formula $\hat x_0 = (x + s(t)^2\,\nabla\log p_t(x)) / m(t)$ (Efron 2011). The one place
        in sdegen that turns a score into a data prediction. ``x``, ``score``: ``(B, *D)``; ``t``: ``(B,)``."""
        m, s = self.marginal(t)
        return (x + append_dims(s.square(), x.ndim) * score) / append_dims(m, x.ndim)

    def score_from_x0(self, x: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        r"""Inverse of [`x0_from_score`][sdegen.sdes.affine.AffineSDE.x0_from_score]: $\nabla\log p_t = (m\hat x_0 - x)/s^2$."""
        m, s = self.marginal(t)
        return (append_dims(m, x.ndim) * x0 - x) / append_dims(s.square(), x.ndim)

    def eps_from_score(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        r"""$\hat\epsilon = -s(t)\,\nabla\log p_t(x)$ (since $x = m x_0 + s\epsilon$)."""
        _, s = self.marginal(t)
        return -append_dims(s, x.ndim) * score

    def score_from_eps(self, x: Tensor, t: Tensor, eps_hat: Tensor) -> Tensor:
        r"""$\nabla\log p_t = -\hat\epsilon / s(t)$."""
        _, s = self.marginal(t)
        return -eps_hat / append_dims(s, x.ndim)

    def prior_std(self) -> float:
        if self._prior_std_arg is not None:
            return self._prior_std_arg
        _, s = self.marginal(torch.tensor([self.T], dtype=torch.float64))
        return float(s)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T})"
