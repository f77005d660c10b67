r"""Denoising score matching losses: continuous DSM with three weightings, SMLD/NCSN, and DDPM's ε objective.

**DSM** (Vincent 2011; Song et al. 2021, eq. 7). With $t \sim \mathcal U[\epsilon_t, T]$,
$x_t = m x_0 + s\epsilon$ and $\nabla\log p_{0t}(x_t \mid x_0) = -\epsilon / s$,

$$\mathcal L = \mathbb E_{t, x_0, \epsilon}\Big[\lambda(t)\,\big\|s_\theta(x_t, t) + \epsilon/s\big\|^2\Big]
             = \mathbb E\Big[\frac{\lambda(t)}{s^2}\,\|\hat\epsilon_\theta - \epsilon\|^2\Big],
             \qquad \hat\epsilon_\theta = -s\,s_\theta .$$

| ``weighting`` | $\lambda(t)$ | per-sample loss |
|---|---|---|
| ``"standard"`` | $s(t)^2$ | $\|\hat\epsilon - \epsilon\|^2$ |
| ``"likelihood"`` | $g(t)^2$ (Song et al. 2021b, "Maximum likelihood training", Thm. 1) | $\tfrac{g^2}{s^2}\|\hat\epsilon - \epsilon\|^2$ |
| ``"importance"`` | $g(t)^2$, $t$ drawn with density $\propto g^2/s^2$ | $\tfrac{Z}{T-\epsilon_t}\|\hat\epsilon - \epsilon\|^2$ |

**Importance sampling, in closed form for every affine SDE.** With $\sigma^2 = s^2/m^2 = \int_0^t g^2/m^2$,
$\frac{d\sigma^2}{dt} = g^2/m^2$, hence $g^2/s^2 = \frac{d}{dt}\log\sigma^2(t)$. So the proposal
$p(t) \propto g^2/s^2$ on $[\epsilon_t, T]$ is *uniform in* $\log\sigma^2$, with normaliser
$Z = \log\sigma^2(T) - \log\sigma^2(\epsilon_t)$; we draw $u \sim \mathcal U[\log\sigma^2(\epsilon_t),
\log\sigma^2(T)]$ and set $t = $ ``sde.t_from_sigma``$(e^{u/2})$. The estimator
$\tfrac{g^2/s^2}{p(t)(T-\epsilon_t)}\|\cdot\|^2 = \tfrac{Z}{T-\epsilon_t}\|\cdot\|^2$ has the same
expectation as the ``"likelihood"`` one and a much smaller variance (Song et al. 2021b, §4.2).

``reduce="mean"`` (default) averages the squared norm over the data dimensions, ``"sum"`` sums it
(the form in which the likelihood weighting bounds the negative log-likelihood). The truncation
``eps`` = $\epsilon_t$ (default $10^{-5}$, Song et al. 2021, App. C) keeps $s(t) > 0$.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._utils import append_dims, check_floating, check_positive
from ..parameterization import ScoreModel
from ..sdes import VPSDE

__all__ = ["dsm_loss", "smld_loss", "ddpm_loss", "sample_time", "WEIGHTINGS"]

WEIGHTINGS = ("standard", "likelihood", "importance")


def _check(model, x0: Tensor) -> None:
    if not isinstance(model, ScoreModel):
        raise TypeError(f"model must be an sdegen.ScoreModel, got {type(model).__name__}")
    check_floating(x0, "x0")
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must have shape (B, *D) with B >= 1, got {tuple(x0.shape)}")


def _reduce(err: Tensor, reduce: str) -> Tensor:
    if reduce == "mean":
        return err.reshape(err.shape[0], -1).mean(1)
    if reduce == "sum":
        return err.reshape(err.shape[0], -1).sum(1)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def sample_time(sde, batch: int, *, weighting: str = "standard", eps: float = 1e-5,
                generator: torch.Generator | None = None, device=None, dtype=None) -> tuple[Tensor, Tensor]:
    r"""Draw training times and the matching per-sample loss factor $\lambda(t)/(s^2 p(t)(T-\epsilon_t))$.

    Returns ``(t, factor)``, each ``(batch,)``. For ``"standard"`` the factor is 1, for
    ``"likelihood"`` it is $g^2/s^2$, for ``"importance"`` the constant $Z/(T - \epsilon_t)$ (see the
    module docstring).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
    eps = check_positive(eps, "eps")
    T = sde.T
    if eps >= T:
        raise ValueError(f"eps must be below T={T}, got {eps}")
    u = torch.rand(batch, generator=generator, device=device, dtype=dtype)
    if weighting != "importance":
        t = eps + (T - eps) * u
        if weighting == "standard":
            return t, torch.ones_like(t)
        _, s = sde.marginal(t)
        return t, sde.diffusion(t).square() / s.square()
    ends = torch.tensor([eps, T], device=u.device, dtype=torch.float64)
    log_var = 2 * sde.sigma(ends).log()                           # log sigma^2 at eps and T
    lo, hi = log_var[0].to(u.dtype), log_var[1].to(u.dtype)
    t = sde.t_from_sigma(torch.exp(0.5 * (lo + (hi - lo) * u))).to(device=u.device, dtype=u.dtype)
    t = t.clamp(eps, T)                                           # bisection round-off stays in range
    return t, torch.full_like(t, 1.0) * (hi - lo) / (T - eps)


def dsm_loss(model: ScoreModel, x0: Tensor, *, weighting: str = "standard", eps: float = 1e-5,
             reduce: str = "mean", generator: torch.Generator | None = None,
             model_kwargs: dict | None = None, per_sample: bool = False) -> Tensor:
    r"""Continuous denoising score-matching loss (see the module docstring for the formula).

    Args:
        model: the [`ScoreModel`][sdegen.parameterization.ScoreModel] (any parameterization: the loss is computed from its
            $\hat\epsilon$ prediction, identical to the score form above).
        x0: clean data ``(B, *D)``.
        weighting: ``"standard"`` ($\lambda = s^2$), ``"likelihood"`` ($\lambda = g^2$) or
            ``"importance"`` ($\lambda = g^2$ with importance-sampled $t$).
        eps: the smallest training time $\epsilon_t$; $t \in [\epsilon_t, T]$.
        reduce: ``"mean"`` or ``"sum"`` over the data dimensions.
        generator: source of $t$ and $\epsilon$ (on ``x0``'s device).
        model_kwargs: passed to the network (e.g. ``{"y": labels}``).
        per_sample: return the ``(B,)`` losses instead of their mean.

    Returns:
        A scalar (or ``(B,)``) tensor.
    """
    _check(model, x0)
    sde = model.sde
    t, factor = sample_time(sde, x0.shape[0], weighting=weighting, eps=eps, generator=generator,
                            device=x0.device, dtype=x0.dtype)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    loss = factor * _denoising_error(model, x0, t, noise, reduce, model_kwargs)
    return loss if per_sample else loss.mean()


def _denoising_error(model: ScoreModel, x0: Tensor, t: Tensor, noise: Tensor, reduce: str,
                     model_kwargs: dict | None) -> Tensor:
    r"""$\|\hat\epsilon_\theta(m x_0 + s\epsilon, t) - \epsilon\|^2$ reduced over ``D``: ``(B,)``."""
    m, s = model.sde.marginal(t)
    xt = append_dims(m, x0.ndim) * x0 + append_dims(s, x0.ndim) * noise
    eps_hat = model.eps(xt, t, **(model_kwargs or {}))
    return _reduce((eps_hat - noise).square(), reduce)


def smld_loss(model: ScoreModel, x0: Tensor, *, n_levels: int = 10, eps: float = 1e-5, reduce: str = "mean",
              generator: torch.Generator | None = None, model_kwargs: dict | None = None) -> Tensor:
    r"""SMLD/NCSN loss (Song & Ermon 2019, eq. 5–6) at ``n_levels`` geometric noise levels.

    $$\mathcal L = \frac1L\sum_{i=1}^L \tfrac12\,\sigma_i^2\,
      \mathbb E\big\|s_\theta(x_0 + \sigma_i z, \sigma_i) + z/\sigma_i\big\|^2
      = \mathbb E_i\,\tfrac12\|\hat\epsilon - z\|^2,$$

    with $\sigma_1 < \dots < \sigma_L$ geometric between $\sigma(\epsilon_t)$ and $\sigma(T)$ and
    $t_i$ = ``sde.t_from_sigma``$(\sigma_i)$. Meant for [`VESDE`][sdegen.VESDE] (where $m=1$ and
    $\sigma(t)$ is the marginal std), but any affine SDE works, with $x_t = m(x_0 + \sigma_i z)$.
    One level is drawn uniformly per sample.
    """
    _check(model, x0)
    if not isinstance(n_levels, int) or n_levels < 2:
        raise ValueError(f"n_levels must be an int >= 2, got {n_levels!r}")
    sde = model.sde
    ends = torch.tensor([check_positive(eps, "eps"), sde.T], dtype=torch.float64, device=x0.device)
    log_sig = sde.sigma(ends).log()
    levels = torch.exp(torch.linspace(float(log_sig[0]), float(log_sig[1]), n_levels, dtype=torch.float64,
                                      device=x0.device))
    t_levels = sde.t_from_sigma(levels).clamp(eps, sde.T).to(x0.dtype)
    idx = torch.randint(n_levels, (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return 0.5 * _denoising_error(model, x0, t_levels[idx], noise, reduce, model_kwargs).mean()


def ddpm_loss(model: ScoreModel, x0: Tensor, *, n_steps: int = 1000, generator: torch.Generator | None = None,
              model_kwargs: dict | None = None) -> Tensor:
    r"""DDPM's simple objective $\mathbb E_{i,\epsilon}\|\epsilon - \hat\epsilon_\theta(x_i, t_i)\|^2$ (Ho et al. 2020, eq. 14).

    The chain is ``model.sde.discretize(n_steps)`` (a [`VPSDE`][sdegen.VPSDE]); step $i \in \{1..N\}$ is
    shown to the continuous model at $t_i = iT/N$ ([`sdegen.DDPM.step_to_time`][sdegen.ddpm.DDPM.step_to_time]), and the loss
    itself is [`sdegen.DDPM.loss`][sdegen.ddpm.DDPM.loss].
    """
    _check(model, x0)
    if not isinstance(model.sde, VPSDE):
        raise TypeError(f"the DDPM loss needs a model on a VPSDE (its discretization), got {model.sde!r}")
    ddpm = model.sde.discretize(n_steps)

    def eps_model(x: Tensor, i: Tensor, **kwargs) -> Tensor:
        return model.eps(x, ddpm.step_to_time(i).to(device=x.device, dtype=x.dtype), **kwargs)

    return ddpm.loss(eps_model, x0, generator=generator, model_kwargs=model_kwargs)
