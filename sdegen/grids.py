r"""Time grids for fixed-step samplers: decreasing float64 tensors from ``T`` down to ``eps``.

Every grid has ``steps + 1`` points, ``times[0] == T`` and ``times[-1] == eps`` exactly, and is
strictly decreasing (forward time: data at 0, noise at ``T``; samplers walk the grid in order).
The grids differ in where they spend their steps:

| name | spacing | reference |
|---|---|---|
| ``"uniform"`` | uniform in $t$ | Song et al. 2021 |
| ``"quadratic"`` | uniform in $\sqrt{t - \epsilon}$, dense near the data | Song et al. 2021 (DDIM), §D.2 |
| ``"log_snr"`` | uniform in $\lambda = \log(m/s)$ | Lu et al. 2022 (DPM-Solver), §3.3 |
| ``"karras"`` | uniform in $\sigma^{1/\rho}$, $\sigma = s/m$ | Karras et al. 2022 (EDM), eq. 5 |

The last two are defined through the SDE's noise schedule (``sde.log_snr``, ``sde.sigma`` and their
inverses ``sde.t_from_log_snr``, ``sde.t_from_sigma``), so they work for any [`AffineSDE`][sdegen.grids.AffineSDE].
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .sdes import SDE, AffineSDE

__all__ = ["uniform", "quadratic", "log_snr", "karras", "get_grid", "GRIDS"]

_F64 = torch.float64


def _check(sde: SDE, steps: int, eps: float) -> float:
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a real number, got {eps!r}") from None
    if not (0.0 < eps < sde.T):
        raise ValueError(f"eps must lie in (0, T) = (0, {sde.T}), got {eps!r}")
    return eps


def _affine(sde: SDE, grid: str) -> AffineSDE:
    if not isinstance(sde, AffineSDE):
        raise TypeError(f"the {grid!r} grid needs an AffineSDE (a noise schedule), got {type(sde).__name__}")
    return sde


def _pin_ends(times: Tensor, T: float, eps: float) -> Tensor:
    # Inverse schedules (bisection, float rounding) may miss the ends by an ulp; the ends are exact
    # by contract so that every grid integrates over exactly [eps, T].
    times[0] = T
    times[-1] = eps
    return times


def uniform(sde: SDE, steps: int, eps: float = 1e-3) -> Tensor:
    r"""Uniform grid $t_i = T - i\,(T - \epsilon)/n$, $i = 0..n$.

    Args:
        sde: any [`SDE`][sdegen.SDE] (only ``sde.T`` is used).
        steps: number of steps $n \ge 1$.
        eps: the final time $\epsilon \in (0, T)$.

    Returns:
        ``(steps + 1,)`` float64 CPU tensor, decreasing from ``T`` to ``eps``.
    """
    eps = _check(sde, steps, eps)
    return _pin_ends(torch.linspace(sde.T, eps, steps + 1, dtype=_F64), sde.T, eps)


def quadratic(sde: SDE, steps: int, eps: float = 1e-3) -> Tensor:
    r"""Quadratic grid $t_i = \epsilon + (T - \epsilon)(1 - i/n)^2$: steps shrink linearly towards the data.

    Song, Meng & Ermon 2021 (DDIM), App. D.2 ("quadratic" skip schedule).

    Returns:
        ``(steps + 1,)`` float64 CPU tensor, decreasing from ``T`` to ``eps``.
    """
    eps = _check(sde, steps, eps)
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=_F64)
    return _pin_ends(eps + (sde.T - eps) * u.square(), sde.T, eps)


def log_snr(sde: SDE, steps: int, eps: float = 1e-3) -> Tensor:
    r"""Grid uniform in $\lambda(t) = \log(m(t)/s(t))$ between $\lambda(T)$ and $\lambda(\epsilon)$.

    The natural grid of exponential integrators (Lu et al. 2022, DPM-Solver, §3.3, "uniform
    logSNR"): with it every step has the same $h = \lambda_{i+1} - \lambda_i$.

    Returns:
        ``(steps + 1,)`` float64 CPU tensor, decreasing from ``T`` to ``eps``.
    """
    eps = _check(sde, steps, eps)
    sde = _affine(sde, "log_snr")
    ends = sde.log_snr(torch.tensor([sde.T, eps], dtype=_F64))
    lam = torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=_F64)
    return _pin_ends(sde.t_from_log_snr(lam).to(_F64), sde.T, eps)


def karras(sde: SDE, steps: int, eps: float = 1e-3, *, rho: float = 7.0) -> Tensor:
    r"""Karras et al. (2022) $\rho$-schedule in $\sigma = s/m$, mapped back to $t$.

    $$\sigma_i = \Big(\sigma_\max^{1/\rho} + \tfrac{i}{n}\big(\sigma_\min^{1/\rho} - \sigma_\max^{1/\rho}\big)\Big)^{\rho},
      \qquad t_i = \sigma^{-1}(\sigma_i),$$

    with $\sigma_\max = \sigma(T)$, $\sigma_\min = \sigma(\epsilon)$ (EDM, eq. 5; $\rho = 7$ there).
    Larger $\rho$ concentrates steps at small $\sigma$; $\rho \to \infty$ tends to the log-$\sigma$
    (= log-SNR) grid.

    Args:
        sde: an [`AffineSDE`][sdegen.AffineSDE].
        steps: number of steps $n \ge 1$.
        eps: final time.
        rho: the exponent $\rho > 0$.

    Returns:
        ``(steps + 1,)`` float64 CPU tensor, decreasing from ``T`` to ``eps``.
    """
    eps = _check(sde, steps, eps)
    sde = _affine(sde, "karras")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a finite positive number, got {rho!r}")
    sig = sde.sigma(torch.tensor([sde.T, eps], dtype=_F64))
    sigmas = karras_sigmas(float(sig[0]), float(sig[1]), steps, rho)
    return _pin_ends(sde.t_from_sigma(sigmas).to(_F64), sde.T, eps)


def karras_sigmas(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0) -> Tensor:
    r"""The noise levels $\sigma_0 = \sigma_\max > \dots > \sigma_n = \sigma_\min$ of EDM eq. 5 (float64)."""
    i = torch.linspace(0.0, 1.0, steps + 1, dtype=_F64)
    a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (a + i * (b - a)) ** rho


#: Grid names accepted by [`get_grid`][sdegen.grids.get_grid] (and the ``grid=`` option of the fast samplers).
GRIDS: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform,
    "quadratic": quadratic,
    "log_snr": log_snr,
    "karras": karras,
}


def get_grid(name: str | Tensor, sde: SDE, steps: int, eps: float = 1e-3, **options) -> Tensor:
    r"""The time grid called ``name`` (one of `GRIDS`), or a user grid checked and returned.

    Args:
        name: ``"uniform"``, ``"quadratic"``, ``"log_snr"`` or ``"karras"``; or a 1-D tensor of
            times (decreasing, within ``[0, T]``), returned as float64.
        sde: the SDE.
        steps: number of steps.
        eps: final time.
        **options (Any): grid options (``rho=`` for ``"karras"``).

    Returns:
        ``(steps + 1,)`` float64 CPU tensor, decreasing from ``T`` to ``eps``.

    Raises:
        ValueError: unknown name (the message lists the valid ones), bad options or a bad user grid.
    """
    if isinstance(name, Tensor):
        times = name.detach().to("cpu", _F64).reshape(-1)
        if times.numel() < 2 or not bool((times[1:] < times[:-1]).all()):
            raise ValueError(f"a user grid must be a strictly decreasing 1-D tensor of >= 2 times, got {name!r}")
        if float(times[0]) > sde.T or float(times[-1]) <= 0.0:
            raise ValueError(f"a user grid must lie in (0, T] = (0, {sde.T}], got [{float(times[-1])}, {float(times[0])}]")
        return times
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose one of {', '.join(GRIDS)}")
    if options and name != "karras":
        raise ValueError(f"grid {name!r} takes no options, got {sorted(options)}")
    if set(options) - {"rho"}:
        raise ValueError(f"unknown option(s) {sorted(set(options) - {'rho'})} for grid 'karras'; valid: rho")
    return GRIDS[name](sde, steps, eps, **options)
