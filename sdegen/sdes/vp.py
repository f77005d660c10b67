r"""Variance-preserving (VP) and sub-VP SDEs with a linear $\beta(t)$ (Song et al. 2021, eq. 11 and 12).

$\beta(t) = \beta_\min + t(\beta_\max - \beta_\min)/T$, $B(t) = \int_0^t \beta(u)\,du$.

| | $f$ | $g^2$ | $m(t)$ | $s(t)^2$ |
|---|---|---|---|---|
| VP | $-\tfrac12\beta x$ | $\beta$ | $e^{-B/2}$ | $1 - e^{-B}$ |
| sub-VP | $-\tfrac12\beta x$ | $\beta(1-e^{-2B})$ | $e^{-B/2}$ | $(1-e^{-B})^2$ |

Both have the prior $\mathcal N(0, I)$. With $T=1$, $\beta_\min=0.1$, $\beta_\max=20$ the VP SDE is the
continuous limit of DDPM's linear schedule $\beta_i = 10^{-4} \dots 0.02$ over 1000 steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._utils import append_dims, check_positive
from .affine import AffineSDE

__all__ = ["VPSDE", "SubVPSDE"]


class _LinearBeta(AffineSDE):
    """Shared linear-β machinery of VP and sub-VP (abstract: no closed-form marginal here)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0):
        super().__init__(T=T)
        self.beta_min = check_positive(beta_min, "beta_min")
        self.beta_max = check_positive(beta_max, "beta_max")
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min, got beta_min={beta_min}, beta_max={beta_max}")

    def beta(self, t: Tensor) -> Tensor:
        r"""$\beta(t) = \beta_\min + (t/T)(\beta_\max - \beta_\min)$. ``(B,)``."""
        # Two tensor ops, not three: beta is evaluated with every score call of an ODE solver.
        return (t * ((self.beta_max - self.beta_min) / self.T)).add_(self.beta_min)

    def int_beta(self, t: Tensor) -> Tensor:
        r"""$B(t) = \int_0^t \beta = \beta_\min t + \tfrac{t^2}{2T}(\beta_\max - \beta_\min)$. ``(B,)``."""
        return self.beta_min * t + 0.5 * t * t / self.T * (self.beta_max - self.beta_min)

    def t_from_int_beta(self, B: Tensor) -> Tensor:
        r"""Inverse of `int_beta`, the positive root written as $2B/(\beta_\min + \sqrt{\beta_\min^2 + 2kB})$
        with $k = (\beta_\max-\beta_\min)/T$ (no cancellation when $k \to 0$)."""
        k = (self.beta_max - self.beta_min) / self.T
        return 2 * B / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * k * B))

    def drift_coef(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def prior_std(self) -> float:
        return 1.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T})"


class VPSDE(_LinearBeta):
    r"""VP SDE $dx = -\tfrac12\beta(t)x\,dt + \sqrt{\beta(t)}\,dw$, the continuous DDPM (final class).

    Args:
        beta_min (float): $\beta(0)$, positive.
        beta_max (float): $\beta(T)$, ``beta_max >= beta_min``.
        T: end time.
    """

    def diffusion(self, t: Tensor) -> Tensor:
        return self.beta(t).sqrt()

    def _half_beta(self, t: Tensor) -> Tensor:
        r"""$-\tfrac12\beta(t)$, which is both $a(t)$ and $-\tfrac12 g(t)^2$ for the VP SDE."""
        k = (self.beta_max - self.beta_min) / self.T
        return (t * (-0.5 * k)).add_(-0.5 * self.beta_min)

    def ode_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r"""$a = -\tfrac12 g^2 = -\tfrac12\beta(t)$ (two tensors, one schedule evaluation)."""
        c = self._half_beta(t)
        return c, c.clone()

    def drift_with_score(self, x: Tensor, t: Tensor, score: Tensor, k: float) -> Tensor:
        r"""$-\tfrac12\beta(t)\,(x + k\,s)$: $a = -\tfrac12 g^2$ lets the drift fuse into two operations."""
        return torch.add(x, score, alpha=k) * append_dims(self._half_beta(t), x.ndim)

    def marginal(self, t) -> tuple[Tensor, Tensor]:
        r"""$m = e^{-B/2}$, $s = \sqrt{1 - e^{-B}}$ (computed as ``sqrt(-expm1(-B))``)."""
        t = self._as_t(t)
        B = self.int_beta(t)
        return torch.exp(-0.5 * B), torch.sqrt(-torch.expm1(-B))

    def log_snr(self, t) -> Tensor:
        r"""$\log\mathrm{SNR} = -\log(e^{B} - 1)$."""
        t = self._as_t(t)
        return -torch.log(torch.expm1(self.int_beta(t)))

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        r"""Closed form: $B = \log(1 + e^{-\lambda})$, then invert $B(t)$."""
        lam = torch.as_tensor(log_snr)
        return self.t_from_int_beta(torch.nn.functional.softplus(-lam))

    def discretize(self, n_steps: int):
        r"""The DDPM chain this SDE becomes with ``n_steps`` steps (see [`sdegen.DDPM.from_vp`][sdegen.ddpm.DDPM.from_vp])."""
        from ..ddpm import DDPM  # the one allowed back edge (STYLE.md)

        return DDPM.from_vp(self, n_steps)


class SubVPSDE(_LinearBeta):
    r"""Sub-VP SDE $dx = -\tfrac12\beta x\,dt + \sqrt{\beta(t)(1 - e^{-2B(t)})}\,dw$ (final class).

    Its variance $(1-e^{-B})^2$ stays below VP's $1-e^{-B}$ (Song et al. 2021, eq. 12).
    """

    def diffusion(self, t: Tensor) -> Tensor:
        B = self.int_beta(t)
        return torch.sqrt(self.beta(t) * -torch.expm1(-2 * B))

    def marginal(self, t) -> tuple[Tensor, Tensor]:
        r"""$m = e^{-B/2}$, $s = 1 - e^{-B}$."""
        t = self._as_t(t)
        B = self.int_beta(t)
        return torch.exp(-0.5 * B), -torch.expm1(-B)

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        r"""Closed form. With $y = e^{-B}$ the SNR is $S = y/(1-y)^2$; the root in $(0, 1)$ of
        $S y^2 - (2S+1) y + S = 0$ gives, with $u = 1/S = e^{-\lambda}$,
        $B = \logig(1 + 	frac12(u + \sqrt{4u + u^2})ig)$ (written without cancellation), then
        $t = B^{-1}$."""
        lam = torch.as_tensor(log_snr)
        u = torch.exp(-lam.clamp(min=-700.0))
        B = torch.log1p(0.5 * (u + torch.sqrt(4 * u + u * u)))
        return self.t_from_int_beta(B).clamp(0, self.T)
