r"""Variance-exploding (VE) SDE, the continuous SMLD/NCSN (Song et al. 2021, eq. 9).

$\sigma(t) = \sigma_\min (\sigma_\max/\sigma_\min)^{t/T}$, $f = 0$,
$g(t) = \sigma(t)\sqrt{2\log(\sigma_\max/\sigma_\min)/T}$, so $d[\sigma(t)^2]/dt = g(t)^2$.

**Marginal variance.** The SDE started from clean data at $t=0$ has
$s(t)^2 = \int_0^t g^2 = \sigma(t)^2 - \sigma_\min^2$, and that is what [`VESDE.marginal`][sdegen.sdes.ve.VESDE.marginal] returns:
the exact transition kernel of the SDE as written. The reference implementation uses $\sigma(t)^2$,
i.e. it treats $x_0$ as data already blurred by $\mathcal N(0, \sigma_\min^2)$. The difference
($10^{-4}$ for $\sigma_\min = 0.01$) is negligible for sampling, but sdegen's oracle, forward
simulation tests and likelihoods must agree with the SDE's own dynamics to float precision, so we
subtract. The prior is $\mathcal N(0, \sigma_\max^2 I)$.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._utils import check_positive
from .affine import AffineSDE

__all__ = ["VESDE"]


class VESDE(AffineSDE):
    r"""VE SDE $dx = \sigma(t)\sqrt{2\log(\sigma_\max/\sigma_\min)/T}\,dw$ (final class).

    Args:
        sigma_min (float): noise level at $t=0$, ``0 < sigma_min < sigma_max``.
        sigma_max (float): noise level at $t=T$.
        T: end time.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0):
        super().__init__(T=T)
        self.sigma_min = check_positive(sigma_min, "sigma_min")
        self.sigma_max = check_positive(sigma_max, "sigma_max")
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma_schedule(self, t: Tensor) -> Tensor:
        r"""The geometric schedule $\sigma_\min (\sigma_\max/\sigma_\min)^{t/T}$ (not the marginal std)."""
        return self.sigma_min * torch.exp(t / self.T * self._log_ratio)

    def drift_coef(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def diffusion(self, t: Tensor) -> Tensor:
        return self.sigma_schedule(t) * math.sqrt(2 * self._log_ratio / self.T)

    def ode_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r"""$a = 0$, $-\tfrac12 g^2 = -\sigma(t)^2 \log(\sigma_\max/\sigma_\min)/T$ (see [`AffineSDE.ode_coefs`][sdegen.sdes.affine.AffineSDE.ode_coefs])."""
        h = torch.exp(t * (2 * self._log_ratio / self.T)) * (-self.sigma_min ** 2 * self._log_ratio / self.T)
        return torch.zeros_like(t), h

    def marginal(self, t) -> tuple[Tensor, Tensor]:
        r"""$m = 1$, $s = \sqrt{\sigma(t)^2 - \sigma_\min^2} = \sigma_\min\sqrt{\exp(2 t \log(\sigma_\max/\sigma_\min)/T) - 1}$."""
        t = self._as_t(t)
        s = self.sigma_min * torch.sqrt(torch.expm1(2 * t / self.T * self._log_ratio))
        return torch.ones_like(t), s

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        r"""Closed form $t = T \log(1 + \sigma^2/\sigma_\min^2) / (2\log(\sigma_\max/\sigma_\min))$."""
        sigma = torch.as_tensor(sigma)
        return self.T * torch.log1p((sigma / self.sigma_min).square()) / (2 * self._log_ratio)

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return self.t_from_sigma(torch.exp(-0.5 * torch.as_tensor(log_snr)))

    def prior_std(self) -> float:
        return self.sigma_max

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, T={self.T})"
