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
| ``"polyexponential"`` | $\log\sigma$ as $(1 - i/n)^\rho$ | k-diffusion (Crowson 2022) |
| ``"beta"`` | $\sigma$ at Beta($\alpha, \beta$) quantiles | Lee et al. 2024 |

The last two are defined through the SDE's noise schedule (``sde.log_snr``, ``sde.sigma`` and their
inverses ``sde.t_from_log_snr``, ``sde.t_from_sigma``), so they work for any [`AffineSDE`][sdegen.grids.AffineSDE].
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .sdes import SDE, AffineSDE

__all__ = ["uniform", "quadratic", "log_snr", "karras", "polyexponential", "beta", "get_grid", "user_grid", "start_time", "sampling_start",
           "GRIDS"]

_F64 = torch.float64

# The start time of the sampling run in progress (``sample(..., t_start=)``), so that every grid a
# method's builder asks for starts there without each builder passing it along; ``None``: ``sde.T``.
_START: contextvars.ContextVar[float | None] = contextvars.ContextVar("sdegen_grid_start", default=None)


@contextlib.contextmanager
def sampling_start(t_start: float | None) -> Iterator[None]:
    r"""Within this block, grids start at ``t_start`` instead of ``sde.T`` (``None``: at ``sde.T``).

    ``sdegen.sample(..., t_start=)`` runs its method inside this block, so the named grids, user
    grids and the solvers' own grids (Karras for ``heun_karras``, ``dpm_solver``, ...) all integrate
    from $t_\text{start}$ down to $\epsilon$. An explicit ``t_start=`` argument of a grid function wins.

    Args:
        t_start: the start time in $(\epsilon, T]$, or ``None``.
    """
    token = _START.set(t_start)
    try:
        yield
    finally:
        _START.reset(token)


def _real(value: Any, name: str) -> float:
    if isinstance(value, (bool, str)):      # float("0.01") would accept a typo'd config value
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None


def start_time(sde: SDE, t_start: float | None = None) -> float:
    r"""The time grids start at: ``t_start`` if given, else that of an enclosing `sampling_start`, else ``sde.T``.

    Args:
        sde: the SDE (its ``T`` bounds the start).
        t_start: an explicit start time in $(0, T]$, or ``None``.

    Returns:
        The start time as a float.

    Raises:
        ValueError: a start time outside $(0, T]$ or not finite.
    """
    if t_start is None:
        t_start = _START.get()
        if t_start is None:
            return float(sde.T)
    t0 = _real(t_start, "t_start")
    if not (math.isfinite(t0) and 0.0 < t0 <= sde.T):
        raise ValueError(f"t_start must lie in (0, T] = (0, {sde.T}], got {t_start!r}")
    return t0


def _check(sde: SDE, steps: int, eps: float, t_start: float | None = None) -> tuple[float, float]:
    """Validate the arguments of a named grid; returns ``(eps, t0)`` with ``t0`` the start time."""
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    eps = _real(eps, "eps")
    t0 = start_time(sde, t_start)
    if not (0.0 < eps < t0):
        where = f"(0, T) = (0, {sde.T})" if t0 == sde.T else f"(0, t_start) = (0, {t0})"
        raise ValueError(f"eps must lie in {where}, got {eps!r}")
    return eps, t0


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


def uniform(sde: SDE, steps: int, eps: float = 1e-3, *, t_start: float | None = None) -> Tensor:
    r"""Uniform grid $t_i = T - i\,(T - \epsilon)/n$, $i = 0..n$.

    Args:
        sde: any [`SDE`][sdegen.SDE] (only ``sde.T`` is used).
        steps: number of steps $n \ge 1$.
        eps: the final time $\epsilon \in (0, T)$.

    Returns:
        ``(steps + 1,)`` float64 CPU tensor, decreasing from ``T`` to ``eps``.
    """
    eps, t0 = _check(sde, steps, eps, t_start)
    return _pin_ends(torch.linspace(t0, eps, steps + 1, dtype=_F64), t0, eps)


def quadratic(sde: SDE, steps: int, eps: float = 1e-3, *, t_start: float | None = None) -> Tensor:
    r"""Quadratic grid $t_i = \epsilon + (T - \epsilon)(1 - i/n)^2$: steps shrink linearly towards the data.

    Song, Meng & Ermon 2021 (DDIM), App. D.2 ("quadratic" skip schedule).

    Returns:
        ``(steps + 1,)`` float64 CPU tensor, decreasing from ``T`` to ``eps``.
    """
    eps, t0 = _check(sde, steps, eps, t_start)
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=_F64)
    return _pin_ends(eps + (t0 - eps) * u.square(), t0, eps)


def log_snr(sde: SDE, steps: int, eps: float = 1e-3, *, t_start: float | None = None) -> Tensor:
    r"""Grid uniform in $\lambda(t) = \log(m(t)/s(t))$ between $\lambda(T)$ and $\lambda(\epsilon)$.

    The natural grid of exponential integrators (Lu et al. 2022, DPM-Solver, §3.3, "uniform
    logSNR"): with it every step has the same $h = \lambda_{i+1} - \lambda_i$.

    Returns:
        ``(steps + 1,)`` float64 CPU tensor, decreasing from ``T`` to ``eps``.
    """
    eps, t0 = _check(sde, steps, eps, t_start)
    sde = _affine(sde, "log_snr")
    ends = sde.log_snr(torch.tensor([t0, eps], dtype=_F64))
    lam = torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=_F64)
    return _pin_ends(sde.t_from_log_snr(lam).to(_F64), t0, eps)


def karras(sde: SDE, steps: int, eps: float = 1e-3, *, rho: float = 7.0, t_start: float | None = None) -> Tensor:
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
    sde, eps, t0, ends = _sigma_ends(sde, "karras", steps, eps, t_start, rho=rho)
    sig_min, sig_max = ends.tolist()
    sigmas = karras_sigmas(sig_max, sig_min, steps, rho)
    return _pin_ends(sde.t_from_sigma(sigmas).to(_F64), t0, eps)


def karras_sigmas(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0) -> Tensor:
    r"""The noise levels $\sigma_0 = \sigma_\max > \dots > \sigma_n = \sigma_\min$ of EDM eq. 5 (float64)."""
    i = torch.linspace(0.0, 1.0, steps + 1, dtype=_F64)
    a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (a + i * (b - a)) ** rho


def polyexponential(sde: SDE, steps: int, eps: float = 1e-3, *, rho: float = 1.0,
                    t_start: float | None = None) -> Tensor:
    r"""k-diffusion's polyexponential grid: $\log\sigma$ moves from $\log\sigma_\max$ to $\log\sigma_\min$ as $(1 - i/n)^\rho$.

    $$\log\sigma_i = \log\sigma_\min + (1 - i/n)^{\rho}\,(\log\sigma_\max - \log\sigma_\min),\qquad t_i = \sigma^{-1}(\sigma_i),$$

    $\sigma = s/m$. $\rho = 1$ is uniform in $\log\sigma = -\lambda$ (the ``"log_snr"`` grid); $\rho > 1$
    spends more steps at small $\sigma$ (k-diffusion ``get_sigmas_polyexponential``, Crowson 2022).

    Args:
        sde: an [`AffineSDE`][sdegen.AffineSDE].
        steps: number of steps $n \ge 1$.
        eps: final time.
        rho: the exponent $\rho > 0$.
        t_start: start time instead of ``sde.T`` (``None``: ``T``, or the enclosing ``sampling_start``).

    Returns:
        ``(steps + 1,)`` float64 CPU tensor, decreasing from ``T`` to ``eps``.
    """
    sde, eps, t0, ends = _sigma_ends(sde, "polyexponential", steps, eps, t_start, rho=rho)
    lo, hi = ends.log().tolist()
    ramp = torch.linspace(1.0, 0.0, steps + 1, dtype=_F64) ** rho
    return _pin_ends(sde.t_from_sigma((lo + ramp * (hi - lo)).exp()).to(_F64), t0, eps)


def beta(sde: SDE, steps: int, eps: float = 1e-3, *, alpha: float = 0.6, beta: float = 0.6,
         t_start: float | None = None) -> Tensor:
    r"""Beta-distribution grid: $\sigma$ at the quantiles of a Beta($\alpha, \beta$) law (Lee et al. 2024).

    $$\sigma_i = \sigma_\min + F^{-1}_{\alpha,\beta}(1 - i/n)\,(\sigma_\max - \sigma_\min),\qquad t_i = \sigma^{-1}(\sigma_i),$$

    with $F^{-1}$ the Beta quantile function: $\alpha = \beta = 0.6 < 1$ crowds the steps at both
    ends (diffusers' ``use_beta_sigmas``; Lee et al. 2024, *Beta Sampling is All You Need*, §4).

    Args:
        sde: an [`AffineSDE`][sdegen.AffineSDE].
        steps: number of steps $n \ge 1$.
        eps: final time.
        alpha: the Beta law's first shape parameter, $> 0$.
        beta: its second shape parameter, $> 0$.
        t_start: start time instead of ``sde.T`` (``None``: ``T``, or the enclosing ``sampling_start``).

    Returns:
        ``(steps + 1,)`` float64 CPU tensor, decreasing from ``T`` to ``eps``.
    """
    from scipy.special import betaincinv

    sde, eps, t0, ends = _sigma_ends(sde, "beta", steps, eps, t_start, alpha=alpha, beta=beta)
    lo, hi = ends.tolist()
    q = torch.as_tensor(betaincinv(alpha, beta, (1.0 - torch.linspace(0.0, 1.0, steps + 1, dtype=_F64)).numpy()))
    return _pin_ends(sde.t_from_sigma(lo + q.to(_F64) * (hi - lo)).to(_F64), t0, eps)


def _sigma_ends(sde: SDE, grid: str, steps: int, eps: float, t_start: float | None,
                **shape: Any) -> tuple[AffineSDE, float, float, Tensor]:
    r"""The checks and end points every $\sigma$-spaced grid starts from: ``(sde, eps, t0, [sigma(eps), sigma(t0)])``.

    Checks ``steps``, ``eps`` and ``t_start`` (`_check`), that ``sde`` is affine, and that each shape
    option in ``shape`` (``rho``, ``alpha``, ``beta``) is a finite positive number."""
    eps, t0 = _check(sde, steps, eps, t_start)
    sde = _affine(sde, grid)
    for name, value in shape.items():
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return sde, eps, t0, sde.sigma(torch.tensor([eps, t0], dtype=_F64))


#: Grid names accepted by [`get_grid`][sdegen.grids.get_grid] (and the ``grid=`` option of the fast samplers).
GRIDS: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform,
    "quadratic": quadratic,
    "log_snr": log_snr,
    "karras": karras,
    "polyexponential": polyexponential,
    "beta": beta,
}
#: The keyword options each named grid takes.
_GRID_OPTIONS = {"karras": ("rho",), "polyexponential": ("rho",), "beta": ("alpha", "beta")}


def user_grid(grid: Any, sde: SDE, *, steps: int | None = None, eps: float | None = None,
              t_start: float | None = None) -> Tensor:
    r"""Check a user's time grid and return it as a float64 CPU tensor (a new one; the input is untouched).

    A grid is the list of times the sampler visits, from the start time down to its last entry,
    which is then the final time $\epsilon$. It must start where the sampler's start state lives:
    at ``T`` (the prior), or at the start time of an img2img/SDEdit run (``t_start``, see
    `sampling_start`). A grid starting elsewhere would integrate a prior draw as if it were a
    sample of $p_t$ at the grid's first time: a wrong distribution, silently. Ends within a relative
    $10^{-6}$ of the required values (float32 grids) are snapped to them exactly.

    Args:
        grid: a 1-D tensor, NumPy array, list or tuple of real times, strictly decreasing, finite,
            starting at the start time and ending above 0.
        sde: the SDE.
        steps: if given, must equal ``len(grid) - 1`` (a grid sets the number of steps itself).
        eps: if given, must equal the grid's last time (a grid sets the final time itself).
        t_start: the required first time (default: that of an enclosing `sampling_start`, else ``T``).

    Returns:
        ``(n + 1,)`` float64 CPU tensor.

    Raises:
        TypeError: not a sequence of real numbers (bool, complex, strings, ...).
        ValueError: not 1-D, fewer than 2 times, not finite, not strictly decreasing, a wrong first
            time, a last time <= 0, or ``steps``/``eps`` that contradict the grid.
    """
    if isinstance(grid, str):
        raise TypeError(f"grid {grid!r} is a name: use get_grid or one of {', '.join(GRIDS)}")
    if isinstance(grid, Tensor):
        times = grid.detach()
    elif isinstance(grid, (list, tuple)) or type(grid).__module__ == "numpy":
        try:
            times = torch.as_tensor(grid)
            if isinstance(grid, (list, tuple)) and not (times.dtype == torch.bool or times.is_complex()):
                # Python floats are float64: read them as such (as_tensor would round them to float32).
                times = torch.tensor(grid, dtype=_F64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"grid must be a 1-D sequence of real times, got {grid!r} ({err})") from None
    else:
        raise TypeError("grid must be a name, or a 1-D tensor, NumPy array, list or tuple of times, got "
                        f"{type(grid).__name__}")
    if times.dtype == torch.bool or times.is_complex():
        raise TypeError(f"grid must hold real times, got dtype {times.dtype}")
    if times.ndim != 1:
        raise ValueError(f"a user grid must be 1-D, got shape {tuple(times.shape)}")
    times = times.to("cpu", _F64).clone()
    if times.numel() < 2:
        raise ValueError(f"a user grid needs at least 2 times (start and end), got {times.numel()}")
    if not bool(torch.isfinite(times).all()):
        raise ValueError(f"a user grid must be finite, got {times.tolist()}")
    up = torch.nonzero(times[1:] >= times[:-1])
    if up.numel():
        k = int(up[0])
        raise ValueError(f"a user grid must be strictly decreasing (samplers run from T down to eps), got "
                         f"times[{k}] = {float(times[k])} <= times[{k + 1}] = {float(times[k + 1])}")
    t0 = start_time(sde, t_start)
    first, last = float(times[0]), float(times[-1])
    tol = 1e-6 * max(1.0, float(sde.T))
    if first > sde.T + tol or last <= 0.0:
        raise ValueError(f"a user grid must lie in (0, T] = (0, {sde.T}], got [{last}, {first}]")
    if abs(first - t0) > tol:
        if t0 == sde.T:
            raise ValueError(f"a user grid must start at T = {sde.T}, where the start state (a prior draw) lives; "
                             f"got {first}. To start part-way from data (img2img/SDEdit) pass x_init= and "
                             f"t_start={first}")
        raise ValueError(f"a user grid must start at t_start = {t0}, got {first}")
    times[0] = t0
    if steps is not None and steps != times.numel() - 1:
        raise ValueError(f"steps={steps!r} contradicts the grid, which has {times.numel() - 1} steps; a grid sets "
                         "the number of steps itself (omit steps=)")
    if eps is not None:
        e = _real(eps, "eps")
        if abs(e - last) > 1e-6 * max(abs(e), abs(last)):
            raise ValueError(f"eps={eps!r} contradicts the grid, which ends at {last}; a grid sets the final "
                             "time itself (omit eps=)")
        times[-1] = e
    return times


def get_grid(name: str | Any, sde: SDE, steps: int | None, eps: float | None = None, **options) -> Tensor:
    r"""The time grid called ``name`` (one of `GRIDS`), or a user grid checked and returned.

    Grids start at ``sde.T``, or at the start time set by an enclosing `sampling_start`
    (``sample(..., t_start=)``).

    Args:
        name: ``"uniform"``, ``"quadratic"``, ``"log_snr"`` or ``"karras"``; or a user grid (a 1-D
            tensor, array, list or tuple of times, checked by `user_grid`), returned as float64.
        sde: the SDE.
        steps: number of steps (for a user grid: ``None`` or ``len(name) - 1``).
        eps: final time (default ``1e-3``; for a user grid: ``None`` or its last time).
        **options (Any): grid options: ``rho=`` for ``"karras"``; ``t_start=`` (any named grid) to
            start below ``sde.T``.

    Returns:
        ``(steps + 1,)`` float64 CPU tensor, decreasing from the start time to ``eps``.

    Raises:
        ValueError: unknown name (the message lists the valid ones), bad options or a bad user grid.
        TypeError: ``name`` is neither a name nor a grid.
    """
    if not isinstance(name, str):
        if options:
            raise ValueError(f"a user grid takes no options, got {sorted(options)}")
        return user_grid(name, sde, steps=steps, eps=eps)
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose one of {', '.join(GRIDS)}")
    start = {"t_start": options.pop("t_start")} if "t_start" in options else {}
    valid = _GRID_OPTIONS.get(name, ())
    if options and not valid:
        raise ValueError(f"grid {name!r} takes no options, got {sorted(options)}")
    if set(options) - set(valid):
        raise ValueError(f"unknown option(s) {sorted(set(options) - set(valid))} for grid {name!r}; "
                         f"valid: {', '.join(valid)}")
    return GRIDS[name](sde, steps, 1e-3 if eps is None else eps, **options, **start)
