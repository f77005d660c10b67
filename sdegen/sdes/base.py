r"""The SDE interface, the reverse-time SDE and SDEs given by plain functions.

Time convention: forward time $t \in [0, T]$, data at $t=0$, noise at $t=T$. The forward SDE is

$$dx = f(x, t)\,dt + g(t)\,dw,$$

with additive noise ($g$ depends on $t$ only), so the reverse-time SDE has no divergence term:

$$dx = [f(x, t) - g(t)^2 \nabla_x \log p_t(x)]\,dt + g(t)\,d\bar w$$

(Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 6), and the probability-flow
ODE is $dx/dt = f(x,t) - \tfrac12 g(t)^2 \nabla_x \log p_t(x)$ (eq. 13). Both are integrated
backwards, from $T$ down to a small $\epsilon$, with a negative ``dt``.
"""

from __future__ import annotations

import abc
import math
from typing import Callable

import torch
from torch import Tensor

from .._utils import append_dims, as_time, check_floating, check_positive, check_time_range, sum_except_batch
from ..typing import ScoreFn

__all__ = ["SDE", "ReverseSDE", "CustomSDE"]


class SDE(abc.ABC):
    r"""Abstract forward SDE $dx = f(x,t)\,dt + g(t)\,dw$ on $t \in [0, T]$.

    Subclasses implement [`drift`][sdegen.sdes.base.SDE.drift] and [`diffusion`][sdegen.sdes.base.SDE.diffusion]. The prior at ``T`` defaults to
    $\mathcal N(0, \sigma_T^2 I)$ with $\sigma_T$ = [`prior_std`][sdegen.sdes.base.SDE.prior_std]; override
    [`prior_sample`][sdegen.sdes.base.SDE.prior_sample] and [`prior_log_prob`][sdegen.sdes.base.SDE.prior_log_prob] together for another prior.

    Args:
        T: end time, > 0.
    """

    def __init__(self, T: float = 1.0):
        self._T = check_positive(T, "T")

    @property
    def T(self) -> float:
        """End time of the forward process (noise end)."""
        return self._T

    # ------------------------------------------------------------------ dynamics
    @abc.abstractmethod
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        r"""Forward drift $f(x, t)$. ``x``: ``(B, *D)``; ``t``: ``(B,)``. Returns ``(B, *D)``."""

    @abc.abstractmethod
    def diffusion(self, t: Tensor) -> Tensor:
        r"""Diffusion coefficient $g(t)$. ``t``: ``(B,)``. Returns ``(B,)``."""

    def discretize_step(self, x: Tensor, t: Tensor, dt: float | Tensor) -> tuple[Tensor, Tensor]:
        r"""Coefficients of the forward step over $[t - \Delta t, t]$: $x_t \approx x + f_i + G_i z$.

        The default is Euler–Maruyama, $f_i = f(x, t)\,\Delta t$, $G_i = g(t)\sqrt{\Delta t}$;
        affine SDEs override it with their exact Gaussian transition. The reverse-diffusion
        predictor evaluates it at $x = x_t$ (Song et al. 2021, App. E, eq. 45–46).

        Args:
            x: ``(B, *D)``.
            t: ``(B,)``, the upper end of the interval.
            dt: positive step.

        Returns:
            ``(f, G)`` with shapes ``(B, *D)`` and ``(B,)``.
        """
        dt = as_time(dt, x.shape[0], device=x.device, dtype=x.dtype, name="dt")
        return self.drift(x, t) * append_dims(dt, x.ndim), self.diffusion(t) * dt.sqrt()

    # ------------------------------------------------------------------ prior
    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior at ``T`` (default 1)."""
        return 1.0

    def prior_sample(self, shape, *, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        r"""Draw $x_T \sim \mathcal N(0, \sigma_T^2 I)$ of ``shape`` ``(B, *D)``."""
        shape = _check_shape(shape)
        if device is None and generator is not None:
            device = generator.device
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return noise * self.prior_std()

    def prior_log_prob(self, x: Tensor) -> Tensor:
        r"""Log-density of the prior, $\log \mathcal N(x; 0, \sigma_T^2 I)$, summed over ``D``: ``(B,)``."""
        check_floating(x, "x")
        s = self.prior_std()
        d = x[0].numel() if x.shape[0] > 0 else 0
        return -0.5 * sum_except_batch(x.square()) / s**2 - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def drift_with_score(self, x: Tensor, t: Tensor, score: Tensor, k: float) -> Tensor:
        r"""$f(x, t) - \tfrac k2\, g(t)^2\, s$ for a given score ``s``: the probability-flow velocity
        ($k = 1$) or the reverse-SDE drift ($k = 2$). ``x``, ``score``: ``(B, *D)``, ``t``: ``(B,)``.

        Affine SDEs override it with the 2-3 fused tensor operations their coefficients allow (the
        per-evaluation overhead of a solver at small batch)."""
        g2 = append_dims(self.diffusion(t).square(), x.ndim)
        return self.drift(x, t) - (0.5 * k) * g2 * score

    # ------------------------------------------------------------------ helpers
    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        r"""The reverse-time SDE (or, with ``probability_flow=True``, the probability-flow ODE)."""
        return ReverseSDE(self, score_fn, probability_flow=probability_flow)

    def time(self, t, x: Tensor, *, name: str = "t") -> Tensor:
        """Broadcast ``t`` to ``(B,)`` on ``x``'s device and dtype, checking ``0 <= t <= T``."""
        tt = as_time(t, x.shape[0], device=x.device, dtype=x.dtype, name=name)
        check_time_range(tt, self.T, name=name)
        return tt

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T})"


class ReverseSDE:
    r"""The reverse-time SDE of ``sde`` for a score function: the one term every solver consumes (final class).

    $$dx = [f(x,t) - c\, g(t)^2 s_\theta(x,t)]\,dt + \mathbb 1[\text{SDE}]\, g(t)\, d\bar w,$$

    with $c = 1$ for the reverse SDE (Song et al. 2021, eq. 6) and $c = \tfrac12$ for the
    probability-flow ODE (eq. 13), which has no noise. Integrate it with ``dt < 0``: samplers step
    forward time from ``T`` down to ``eps`` with the signed $\Delta t = t_1 - t_0$ and Brownian
    increments of variance $|\Delta t|$, so reverse time needs no direction arithmetic in any solver.

    Solvers read [`drift`][sdegen.sdes.base.ReverseSDE.drift] and [`diffusion`][sdegen.sdes.base.ReverseSDE.diffusion]
    (the term), or, where one step uses both, [`reverse_drift`][sdegen.sdes.base.ReverseSDE.reverse_drift] and
    [`ode_drift`][sdegen.sdes.base.ReverseSDE.ode_drift]; [`ode`][sdegen.sdes.base.ReverseSDE.ode] and
    [`sde_term`][sdegen.sdes.base.ReverseSDE.sde_term] give the same dynamics as the other term.

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t)`` approximating $\nabla_x \log p_t(x)$.
        probability_flow: return the ODE instead of the SDE.
    """

    __slots__ = ("sde", "score_fn", "probability_flow")

    def __init__(self, sde: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        if not isinstance(probability_flow, bool):
            raise TypeError(f"probability_flow must be a bool, got {probability_flow!r}")
        self.sde = sde
        self.score_fn = score_fn
        self.probability_flow = probability_flow

    @property
    def T(self) -> float:
        return self.sde.T

    @property
    def _c(self) -> float:
        return 0.5 if self.probability_flow else 1.0

    @property
    def ode(self) -> "ReverseSDE":
        """The probability-flow ODE of the same SDE and score (a term with zero noise)."""
        return self if self.probability_flow else ReverseSDE(self.sde, self.score_fn, probability_flow=True)

    @property
    def sde_term(self) -> "ReverseSDE":
        """The reverse-time SDE of the same SDE and score."""
        return ReverseSDE(self.sde, self.score_fn) if self.probability_flow else self

    @property
    def affine(self):
        """The SDE as an [`AffineSDE`][sdegen.AffineSDE] (``TypeError`` naming the requirement otherwise)."""
        from .affine import AffineSDE

        if not isinstance(self.sde, AffineSDE):
            raise TypeError(f"this solver needs an AffineSDE (a Gaussian kernel), got {type(self.sde).__name__}")
        return self.sde

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        r"""$s_\theta(x, t)$. ``x``: ``(B, *D)``, ``t``: ``(B,)``."""
        return self.score_fn(x, t)

    def drift(self, x: Tensor, t: Tensor, score: Tensor | None = None) -> Tensor:
        r"""$f(x,t) - c\,g(t)^2 s_\theta(x,t)$. ``x``: ``(B, *D)``, ``t``: ``(B,)``; ``score``: a precomputed $s_\theta(x, t)$."""
        return self.sde.drift_with_score(x, t, self.score_fn(x, t) if score is None else score, 2.0 * self._c)

    def reverse_drift(self, x: Tensor, t: Tensor, score: Tensor | None = None) -> Tensor:
        r"""$f - g^2 s_\theta$ (the reverse SDE's drift), whichever term this is."""
        return self.sde.drift_with_score(x, t, self.score_fn(x, t) if score is None else score, 2.0)

    def ode_drift(self, x: Tensor, t: Tensor, score: Tensor | None = None) -> Tensor:
        r"""$f - \tfrac12 g^2 s_\theta$ (the probability-flow velocity), whichever term this is."""
        return self.sde.drift_with_score(x, t, self.score_fn(x, t) if score is None else score, 1.0)

    def diffusion(self, t: Tensor) -> Tensor:
        """$g(t)$ for the SDE, zeros for the probability-flow ODE. ``(B,)``."""
        g = self.sde.diffusion(t)
        return torch.zeros_like(g) if self.probability_flow else g

    def discretize_step(self, x: Tensor, t: Tensor, dt: float | Tensor) -> tuple[Tensor, Tensor]:
        r"""Reverse of [`SDE.discretize_step`][sdegen.sdes.base.SDE.discretize_step]: $x_{t-\Delta t} = x - f_i + c\,G_i^2 s_\theta + G_i z$.

        Returns ``(f_rev, G_rev)`` with $f_\text{rev} = f_i - c\,G_i^2 s_\theta(x, t)$, so that the
        reverse-diffusion predictor is ``x - f_rev + G_rev * z`` (Song et al. 2021, eq. 47).
        """
        f, G = self.sde.discretize_step(x, t, dt)
        f_rev = f - self._c * append_dims(G.square(), x.ndim) * self.score_fn(x, t)
        G_rev = torch.zeros_like(G) if self.probability_flow else G
        return f_rev, G_rev

    def __repr__(self) -> str:
        return f"ReverseSDE({self.sde!r}, probability_flow={self.probability_flow})"


class CustomSDE(SDE):
    r"""An SDE from two plain functions: $dx = f(x,t)\,dt + g(t)\,dw$ (final class).

    Example::

        sde = sdegen.CustomSDE(drift=lambda x, t: -x, diffusion=lambda t: torch.full_like(t, 2**0.5))

    Args:
        drift: ``f(x, t) -> (B, *D)`` with ``x`` ``(B, *D)`` and ``t`` ``(B,)``.
        diffusion: ``g(t) -> (B,)`` (a Python float is broadcast).
        T: end time.
        prior_std: standard deviation of the isotropic Gaussian prior at ``T``.
    """

    def __init__(self, drift: Callable[[Tensor, Tensor], Tensor], diffusion: Callable[[Tensor], Tensor],
                 *, T: float = 1.0, prior_std: float = 1.0):
        super().__init__(T)
        if not callable(drift):
            raise TypeError(f"drift must be callable f(x, t), got {type(drift).__name__}")
        if not callable(diffusion):
            raise TypeError(f"diffusion must be callable g(t), got {type(diffusion).__name__}")
        self._drift_fn = drift
        self._diffusion_fn = diffusion
        self._prior_std = check_positive(prior_std, "prior_std")

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        out = self._drift_fn(x, t)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise ValueError(f"drift(x, t) must return a tensor of shape {tuple(x.shape)}, "
                             f"got {getattr(out, 'shape', type(out).__name__)}")
        return out

    def diffusion(self, t: Tensor) -> Tensor:
        return eval_time_fn(self._diffusion_fn, t, "diffusion")

    def prior_std(self) -> float:
        return self._prior_std


def eval_time_fn(fn: Callable, t: Tensor, name: str) -> Tensor:
    """Evaluate a user function of time and return a ``(B,)`` tensor like ``t``."""
    out = fn(t)
    out = torch.as_tensor(out, dtype=t.dtype, device=t.device)
    if out.ndim == 0:
        out = out.expand(t.shape)
    if out.shape != t.shape:
        raise ValueError(f"{name}(t) must return shape {tuple(t.shape)} (or a scalar), got {tuple(out.shape)}")
    return out


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if isinstance(shape, int):
        shape = (shape,)
    if (not isinstance(shape, (tuple, list)) or len(shape) < 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise ValueError(f"shape must be a tuple (B, *D) of positive ints with at least 2 entries, got {shape!r}")
    return tuple(shape)
