r"""Checks and start states of [`sdegen.sample`][sdegen.sampling.sample]: times, the start state, per-sample seeds.

Split from ``sampling.py`` (issue 15: no package file over 600 lines). Forward time runs from 0 (data)
to ``T``; samplers start at ``t_start`` (default ``T``) and integrate down to ``eps``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sdes import SDE, AffineSDE
from .solvers.base import check_finite_state


def _check_eps(eps, T: float) -> float:
    try:
        if isinstance(eps, (bool, str)):     # True is not a time, and float("0.01") would hide a typo
            raise TypeError
        e = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a float in (0, T={T}), got {eps!r}") from None
    if not 0.0 < e < T:
        raise ValueError(f"eps must lie in (0, T={T}), got {eps!r}")
    return e


def _check_start(sde: SDE, t_start, strength, x_init, x_T) -> float:
    r"""The start time: ``T``, or ``t_start``, or ``strength * T``; checks the start-state arguments agree."""
    T = float(sde.T)
    if t_start is not None and strength is not None:
        raise ValueError(f"give t_start= or strength= (t_start = strength * T), not both; got t_start={t_start!r}, "
                         f"strength={strength!r}")
    if strength is not None:
        s = _real_arg(strength, "strength")
        if not 0.0 < s <= 1.0:
            raise ValueError(f"strength must lie in (0, 1] (t_start = strength * T), got {strength!r}")
        t0 = s * T
    elif t_start is not None:
        t0 = _real_arg(t_start, "t_start")
        if not 0.0 < t0 <= T:
            raise ValueError(f"t_start must lie in (eps, T] = (eps, {T}], got {t_start!r}")
    else:
        t0 = T
    if x_init is not None:
        if x_T is not None:
            raise ValueError("give x_init= (data, noised to t_start here) or x_T= (the start state), not both")
        if t_start is None and strength is None:
            raise ValueError("x_init= (data to start from part-way) needs t_start= or strength=")
        if not isinstance(sde, AffineSDE):
            raise TypeError(f"x_init= is noised to t_start by the SDE's Gaussian transition; {type(sde).__name__} is "
                            "not an AffineSDE (pass x_T=, the state at t_start, instead)")
    elif t0 < T and x_T is None:
        raise ValueError(f"t_start={t0:.6g} < T={T} needs the data to start from (x_init=) or the state at t_start "
                         "(x_T=); a prior draw is a sample of p_T only")
    return t0


def _real_arg(value, name: str) -> float:
    if isinstance(value, (bool, str)):      # float("0.5") would accept a string
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype} (half precision would lose "
                        "the small time steps; cast the model instead and sample in float32)")
    return dtype


def _per_sample_noise(seeds, shape):
    """``seeds=`` as given: ``None``; an int offset (sample k gets seed offset + k); a list/tuple/1-D
    integer tensor of per-sample seeds; or a noise object with ``prior`` and ``__call__(i)``."""
    if seeds is None or callable(getattr(seeds, "prior", None)):
        return seeds
    from ._rng import PerSampleNoise

    B = int(tuple(shape)[0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        return PerSampleNoise.from_offset(seeds, B)
    if isinstance(seeds, (list, tuple, Tensor, range)):
        if len(seeds) != B:
            raise ValueError(f"seeds must have one seed per sample ({B}), got {len(seeds)}")
        return PerSampleNoise(seeds)
    raise TypeError("seeds must be an int offset, a sequence of ints, or an object with prior(shape, device, "
                    f"dtype) and __call__(i), got {type(seeds).__name__}")


class _BoundNoise:
    """A per-sample noise object bound to the state's shape, device and dtype (so a ``PerSampleNoise``
    made without them gives draws like ``x``)."""

    def __init__(self, noise, x: Tensor):
        self._noise, self._shape, self._device, self._dtype = noise, tuple(x.shape), x.device, x.dtype
        self._kw = _accepts_kwargs(noise)

    def prior(self, shape=None, device=None, dtype=None) -> Tensor:
        return self._noise.prior(shape or self._shape, device or self._device, dtype or self._dtype)

    def __call__(self, i: int) -> Tensor:
        if self._kw:
            return self._noise(i, shape=self._shape, device=self._device, dtype=self._dtype)
        return self._noise(i).to(device=self._device, dtype=self._dtype)


def _accepts_kwargs(fn) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(k in params for k in ("shape", "device", "dtype"))


def _start_state(sde: SDE, shape, x_T, device, dtype, generator, seeds) -> Tensor:
    if x_T is None:
        dtype = _check_dtype(torch.get_default_dtype() if dtype is None else dtype)
        if device is None and generator is not None:
            device = generator.device
        if seeds is not None:
            return seeds.prior(tuple(shape), torch.device(device or "cpu"), dtype) * sde.prior_std()
        return sde.prior_sample(shape, generator=generator, device=device, dtype=dtype)
    return _check_given_state(x_T, "x_T", shape, device, dtype)


def _check_given_state(x: Tensor, name: str, shape, device, dtype) -> Tensor:
    """Checks of a caller's ``x_T`` or ``x_init``: a finite float32/float64 ``(B, *D)`` tensor agreeing
    with ``shape``, ``device`` and ``dtype`` where given (one host read for the finiteness, once)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: dtype must be torch.float32 or torch.float64, got {x.dtype}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B, *D) with B >= 1, got {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (the shape argument), got {tuple(x.shape)}")
    if device is not None and x.device != torch.device(device) and not (
            torch.device(device).type == x.device.type and torch.device(device).index is None):
        raise ValueError(f"{name} is on {x.device} but device={device!r} was requested")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but dtype={dtype} was requested")
    check_finite_state(x, name)
    return x


def _noised_start(sde: AffineSDE, x_init, t_start: float, shape, device, dtype, generator, seeds) -> Tensor:
    r"""$x_{t_\text{start}} = m(t_\text{start})\,x_0 + s(t_\text{start})\,z$, $z \sim \mathcal N(0, I)$: the
    exact transition of the forward SDE from the data (SDEdit, Meng et al. 2022, §3)."""
    x0 = _check_given_state(x_init, "x_init", shape, device, dtype)
    # The marginal in float64 on the host, once: two scalars.
    m, s = (float(v) for v in sde.marginal(torch.tensor([t_start], dtype=torch.float64)))
    if seeds is not None:
        z = seeds.prior(tuple(x0.shape), x0.device, x0.dtype)
    else:
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return x0 * m + z * s
