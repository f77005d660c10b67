r"""Flow matching and rectified flow as affine SDEs: interpolants $x_t = \alpha_t x_0 + \sigma_t\epsilon$.

A flow-matching model is trained on the interpolant $x_t = \alpha(t)\,x_0 + \sigma(t)\,\epsilon$,
$\epsilon \sim \mathcal N(0, I)$, with the velocity target $u = \dot\alpha x_0 + \dot\sigma\epsilon$
(Lipman et al. 2023, "Flow Matching for Generative Modeling", eq. 20–23; Liu et al. 2023, "Flow
Straight and Fast", eq. 1; Albergo & Vanden-Eijnden 2023, stochastic interpolants). Its marginals
are those of the affine SDE $dx = a(t)\,x\,dt + g(t)\,dw$ with

$$a(t) = \frac{\dot\alpha}{\alpha}, \qquad g(t)^2 = 2\sigma\dot\sigma - 2a\sigma^2
  = 2\sigma^2\Big(\frac{\dot\sigma}{\sigma} - \frac{\dot\alpha}{\alpha}\Big) = -\sigma^2\frac{d\log\mathrm{SNR}}{dt},$$

from $d s^2/dt = 2 a s^2 + g^2$ (Särkkä & Solin 2019, eq. 6.2–6.3; Kingma et al. 2021, "Variational
Diffusion Models", eq. 17–18). So every sdegen sampler, the likelihood and the Gaussian-mixture
oracle apply to flow models unchanged, and the probability-flow drift $a x - \tfrac12 g^2\nabla\log p_t$
*is* the flow-matching velocity $\mathbb E[u \mid x_t]$ (the ``"flow_velocity"`` row of
`sdegen.parameterization`). Notation map: $\alpha$ = ``mean_coef``, $\sigma_t$ = ``std``;
``diffusers``' flow ``sigma`` is our time $t$ (not sdegen's ``sigma`` $= s/m$).

**The endpoint.** Rectified flow has $\alpha(1) = 0$: at $t = 1$ the state is pure noise, so
$\sigma = s/m$, $\log\mathrm{SNR}$ and $a(t) = -1/(1-t)$ are infinite there. The SDE therefore ends at
$T < 1$, by default ``T = 1 - 1e-3``; the prior $\mathcal N(0, T^2 I)$ drops the data part
$(1 - T)\,x_0$ of $x_T$, which changes its second moment by $(1-T)^2\,\mathbb E|x_0|^2$ ($10^{-6}$ per
unit-variance dimension at the default). The probability-flow drift stays finite up to $T$ (its two
terms cancel to $\epsilon - x_0$); the reverse SDE is stiff near $T$ ($a \approx -1/(1-t)$), so its
fixed-step methods need steps well below $1 - T$ there or a grid that is fine near $T$.

**Shift.** [`flow_shift`][sdegen.sdes.flow.flow_shift] is the resolution shift of SD3 /
``FlowMatchEulerDiscreteScheduler`` ($t' = \mathrm{shift}\cdot t / (1 + (\mathrm{shift}-1)t)$, Esser et
al. 2024, eq. 23): it moves a sampling grid towards the noise end, and
[`FlowMatchingSDE.grid`][sdegen.sdes.flow.FlowMatchingSDE.grid] builds that grid.
"""

from __future__ import annotations

import abc
from typing import Callable

import torch
from torch import Tensor

from .._utils import check_positive
from .affine import AffineSDE
from .base import eval_time_fn

__all__ = ["AbstractInterpolantSDE", "InterpolantSDE", "FlowMatchingSDE", "flow_shift", "flow_unshift"]

_F64 = torch.float64


def _check_shift(shift) -> float:
    if isinstance(shift, bool):
        raise TypeError(f"shift must be a positive real number, got {shift!r}")
    return check_positive(shift, "shift")


def flow_shift(t: Tensor | float, shift: float) -> Tensor:
    r"""The time shift $t' = \mathrm{shift}\cdot t / (1 + (\mathrm{shift} - 1)\,t)$ of ``FlowMatchEulerDiscreteScheduler``.

    Maps $[0, 1]$ onto itself, increasing, fixing 0 and 1; ``shift > 1`` spends more of a grid at
    high noise (Esser et al. 2024, "Scaling Rectified Flow Transformers", eq. 23).

    Args:
        t: times in $[0, 1]$ (tensor or float).
        shift: the shift, > 0 (1 is the identity).

    Returns:
        ``t'``, a tensor like ``t``.
    """
    shift = _check_shift(shift)
    t = torch.as_tensor(t)
    return shift * t / (1 + (shift - 1) * t)


def flow_unshift(t: Tensor | float, shift: float) -> Tensor:
    r"""Inverse of [`flow_shift`][sdegen.sdes.flow.flow_shift]: $t = t' / (\mathrm{shift} - (\mathrm{shift} - 1)\,t')$."""
    shift = _check_shift(shift)
    t = torch.as_tensor(t)
    return t / (shift - (shift - 1) * t)


class AbstractInterpolantSDE(AffineSDE):
    r"""Affine SDE defined by its marginal $x_t = \alpha(t)x_0 + \sigma(t)\epsilon$ (abstract).

    Subclasses give $\alpha, \sigma$ and their time derivatives (``_coefs``); the drift and diffusion
    follow (module docstring): $a = \dot\alpha/\alpha$, $g^2 = 2\sigma(\dot\sigma - a\sigma)$. The marginal
    is exact (no tables). Needs $\alpha(0) = 1$, $\sigma(0) = 0$, $\alpha > 0$ on $[0, T]$ and a
    decreasing SNR $\alpha^2/\sigma^2$ ($g^2 \ge 0$).
    """

    @abc.abstractmethod
    def _coefs(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r"""$(\alpha, \sigma, \dot\alpha, \dot\sigma)$ at ``t`` (``(B,)`` each)."""

    def marginal(self, t) -> tuple[Tensor, Tensor]:
        r"""$(\alpha(t), \sigma(t))$, each ``(B,)``. ``t``: ``(B,)`` or a float in ``[0, T]``."""
        t = self._as_t(t)
        alpha, sigma, _, _ = self._coefs(t)
        return alpha, sigma

    def drift_coef(self, t: Tensor) -> Tensor:
        r"""$a(t) = \dot\alpha/\alpha$."""
        alpha, _, d_alpha, _ = self._coefs(t)
        return d_alpha / alpha

    def _g2(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma, d_alpha, d_sigma = self._coefs(t)
        a = d_alpha / alpha
        return a, (2 * sigma * (d_sigma - a * sigma)).clamp_min(0)

    def diffusion(self, t: Tensor) -> Tensor:
        r"""$g(t) = \sqrt{2\sigma(\dot\sigma - a\sigma)}$."""
        return self._g2(t)[1].sqrt()

    def ode_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r"""$(a(t), -\tfrac12 g(t)^2)$ from one evaluation of the coefficients."""
        a, g2 = self._g2(t)
        return a, -0.5 * g2

    def _validate(self) -> None:
        """Check the interpolant's conditions once, on a float64 grid of $[0, T]$."""
        t = torch.linspace(0.0, self.T, 257, dtype=_F64)
        alpha, sigma, d_alpha, d_sigma = self._coefs(t)
        if not all(bool(torch.isfinite(v).all()) for v in (alpha, sigma, d_alpha, d_sigma)):
            raise ValueError(f"{type(self).__name__}: alpha, sigma or a derivative is not finite on [0, T={self.T}]")
        if abs(float(alpha[0]) - 1) > 1e-9 or abs(float(sigma[0])) > 1e-9:
            raise ValueError(f"an interpolant needs alpha(0) = 1 and sigma(0) = 0 (data at t = 0), got "
                             f"alpha(0) = {float(alpha[0])!r}, sigma(0) = {float(sigma[0])!r}")
        if not bool((alpha > 0).all()) or not bool((sigma[1:] > 0).all()):
            raise ValueError(f"an interpolant needs alpha(t) > 0 on [0, T] and sigma(t) > 0 on (0, T]; "
                             f"got min alpha {float(alpha.min())!r}, min sigma on (0, T] {float(sigma[1:].min())!r} "
                             f"(alpha(T) = 0 makes the SDE singular at T: use a T below that point)")
        g2 = 2 * sigma * (d_sigma - d_alpha / alpha * sigma)
        if float(g2.min()) < -1e-9 * max(1.0, float(g2.abs().max())):
            k = int(g2.argmin())
            raise ValueError(f"an interpolant needs a non-increasing SNR alpha^2/sigma^2 (g(t)^2 >= 0); "
                             f"g^2 = {float(g2[k]):.3g} at t = {float(t[k]):.4g}")

    def prior_std(self) -> float:
        r"""$\sigma(T)$: the prior $\mathcal N(0, \sigma(T)^2 I)$ drops $\alpha(T)x_0$."""
        if self._prior_std_arg is not None:
            return self._prior_std_arg
        return float(self._coefs(torch.tensor([self.T], dtype=_F64))[1])


def _autograd_derivative(fn: Callable, t: Tensor, name: str) -> Tensor:
    """$d\\,fn/dt$ of an elementwise function of time by autograd (float64 where ``t`` is)."""
    with torch.enable_grad():
        tt = t.detach().requires_grad_(True)
        y = eval_time_fn(fn, tt, name)
        if not y.requires_grad:
            # No graph: either a constant (derivative 0) or a function computed outside autograd
            # (numpy, no_grad), whose derivative would silently read as 0. Tell them apart by value.
            shifted = eval_time_fn(fn, t.detach() + 1e-3, name)
            if not torch.equal(shifted.detach(), y.detach()):
                raise TypeError(f"{name}(t) is not differentiable by autograd (computed through numpy, "
                                f"under torch.no_grad or from t.detach()?); pass d_{name}= explicitly")
            return torch.zeros_like(t)
        (d,) = torch.autograd.grad(y.sum(), tt, allow_unused=True)
    return torch.zeros_like(t) if d is None else d.detach()


class InterpolantSDE(AbstractInterpolantSDE):
    r"""The affine SDE of a user interpolant $x_t = \alpha(t)x_0 + \sigma(t)\epsilon$ (final class).

    $a = \dot\alpha/\alpha$, $g^2 = 2\sigma(\dot\sigma - a\sigma)$ (module docstring). Derivatives are
    taken by autograd unless given.

    Args:
        alpha: $\alpha(t)$, ``(B,) -> (B,)`` torch operations; $\alpha(0) = 1$, $\alpha > 0$ on $[0, T]$.
        sigma: $\sigma(t)$; $\sigma(0) = 0$, $\sigma > 0$ on $(0, T]$, $\alpha/\sigma$ non-increasing.
        T: end time.
        d_alpha: $\dot\alpha(t)$ (optional; autograd otherwise).
        d_sigma: $\dot\sigma(t)$ (optional; autograd otherwise).
        prior_std: std of the prior (default $\sigma(T)$).

    Raises:
        ValueError: the conditions above fail on a 257-point grid of $[0, T]$.
        TypeError: a callable is not differentiable by autograd and no derivative was given.

    Example::

        # the cosine path of Nichol & Dhariwal 2021 as a flow-matching interpolant
        sde = sdegen.InterpolantSDE(lambda t: torch.cos(0.5 * math.pi * t),
                                    lambda t: torch.sin(0.5 * math.pi * t), T=0.999)
    """

    def __init__(self, alpha: Callable[[Tensor], Tensor], sigma: Callable[[Tensor], Tensor], *, T: float = 1.0,
                 d_alpha: Callable[[Tensor], Tensor] | None = None, d_sigma: Callable[[Tensor], Tensor] | None = None,
                 prior_std: float | None = None):
        for name, fn in (("alpha", alpha), ("sigma", sigma), ("d_alpha", d_alpha), ("d_sigma", d_sigma)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable {name}(t), got {type(fn).__name__}")
        if alpha is None or sigma is None:
            raise TypeError("alpha and sigma are required callables alpha(t), sigma(t)")
        super().__init__(T=T, prior_std=prior_std)
        self._alpha, self._sigma, self._d_alpha, self._d_sigma = alpha, sigma, d_alpha, d_sigma
        self._validate()

    def _coefs(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        alpha = eval_time_fn(self._alpha, t, "alpha")
        sigma = eval_time_fn(self._sigma, t, "sigma")
        d_alpha = (eval_time_fn(self._d_alpha, t, "d_alpha") if self._d_alpha is not None
                   else _autograd_derivative(self._alpha, t, "alpha"))
        d_sigma = (eval_time_fn(self._d_sigma, t, "d_sigma") if self._d_sigma is not None
                   else _autograd_derivative(self._sigma, t, "sigma"))
        return alpha, sigma, d_alpha, d_sigma

    def __repr__(self) -> str:
        return f"InterpolantSDE(T={self.T})"


class FlowMatchingSDE(AbstractInterpolantSDE):
    r"""Rectified flow / flow matching with the straight path $x_t = (1-t)\,x_0 + t\,\epsilon$ (final class).

    The affine SDE with $m(t) = 1 - t$, $s(t) = t$ (Liu et al. 2023; Lipman et al. 2023 with
    $\sigma_\min = 0$; Esser et al. 2024, "rectified flow" of SD3):

    $$dx = -\frac{x}{1-t}\,dt + \sqrt{\frac{2t}{1-t}}\,dw, \qquad
      \sigma(t) = \frac{t}{1-t}, \qquad \log\mathrm{SNR}(t) = 2\log\frac{1-t}{t}.$$

    The velocity target is $u = \epsilon - x_0$; wrap a velocity model with
    `sdegen.adapters.from_flow`, or use ``ScoreModel(net, sde, "flow_velocity")``.

    Args:
        T: end time, in $(0, 1)$: $m(1) = 0$ makes the SDE singular at 1 (module docstring); default
            ``1 - 1e-3``.
        prior_std: std of the prior (default $s(T) = T$).

    Raises:
        ValueError: ``T`` not in $(0, 1)$.
    """

    DEFAULT_T = 1.0 - 1e-3

    def __init__(self, T: float = DEFAULT_T, *, prior_std: float | None = None):
        T = check_positive(T, "T")
        if not T < 1.0:
            raise ValueError(f"FlowMatchingSDE needs T < 1: at t = 1 the mean coefficient 1 - t is 0, so "
                             f"sigma = t/(1-t), the log-SNR and the drift -x/(1-t) are infinite; got T={T!r} "
                             f"(default {self.DEFAULT_T})")
        super().__init__(T=T, prior_std=prior_std)

    def _coefs(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return 1 - t, t, torch.full_like(t, -1.0), torch.ones_like(t)

    def marginal(self, t) -> tuple[Tensor, Tensor]:
        r"""$(1 - t,\ t)$."""
        t = self._as_t(t)
        return 1 - t, t.clone()

    def drift_coef(self, t: Tensor) -> Tensor:
        r"""$a(t) = -1/(1-t)$."""
        return -1 / (1 - t)

    def diffusion(self, t: Tensor) -> Tensor:
        r"""$g(t) = \sqrt{2t/(1-t)}$."""
        return (2 * t / (1 - t)).sqrt()

    def ode_coefs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r"""$(a, -\tfrac12 g^2) = (-1/(1-t),\ -t/(1-t))$."""
        r = 1 / (1 - t)
        return -r, -t * r

    def log_snr(self, t) -> Tensor:
        r"""$2\log((1-t)/t)$."""
        t = self._as_t(t)
        return 2 * (torch.log1p(-t) - t.log())

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        r"""Closed form $t = \mathrm{sigmoid}(-\lambda/2)$, clamped to $[0, T]$."""
        lam = torch.as_tensor(log_snr)
        dtype = lam.dtype if lam.is_floating_point() else torch.get_default_dtype()
        return torch.sigmoid(-0.5 * lam.to(dtype)).clamp(0.0, self.T)

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        r"""Closed form $t = \sigma/(1 + \sigma)$ for $\sigma = s/m$, clamped to $[0, T]$."""
        sigma = torch.as_tensor(sigma)
        return (sigma / (1 + sigma)).clamp(0.0, self.T)

    def prior_std(self) -> float:
        return self._prior_std_arg if self._prior_std_arg is not None else self.T

    def grid(self, steps: int, *, shift: float = 1.0, eps: float = 1e-3) -> Tensor:
        r"""A sampling grid from $T$ down to ``eps``: uniform before the [`flow_shift`][sdegen.sdes.flow.flow_shift].

        $t_k = \mathrm{shift}(u_k)$ with $u_k$ uniform from $\mathrm{shift}^{-1}(T)$ to
        $\mathrm{shift}^{-1}(\epsilon)$, $k = 0..N$, so $t_0 = T$ and $t_N = \epsilon$ exactly. Passing the
        $u_k$ as ``sigmas=`` to ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (with ``shift``)
        gives the same times (it appends a final 0). Use it as ``grid=`` of ``ode_euler``,
        ``ode_heun``, ``euler_maruyama``, ``reverse_diffusion`` or ``pc``.

        Args:
            steps: $N \ge 1$.
            shift: the shift (1: a uniform grid).
            eps: final time, in $(0, T)$.

        Returns:
            ``(steps + 1,)`` float64 CPU tensor, decreasing.
        """
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) < self.T:
            raise ValueError(f"eps must be a float in (0, T={self.T}), got {eps!r}")
        ends = flow_unshift(torch.tensor([self.T, float(eps)], dtype=_F64), shift)
        u = torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=_F64)
        t = flow_shift(u, shift)
        t[0], t[-1] = self.T, float(eps)           # exact ends, free of the round trip's rounding
        return t

    def __repr__(self) -> str:
        return f"FlowMatchingSDE(T={self.T})"

