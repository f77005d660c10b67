r"""Adapters to external integrators: torchdiffeq, scipy's ``solve_ivp`` and torchsde.

Each adapter takes the same right-hand side the native solvers use, ``fn(y, t)`` with ``y`` of shape
``(B, *D)`` and ``t`` a ``(B,)`` tensor in forward time, and returns ``(y1, stats)`` with the state
at ``t1`` on ``y0``'s device and dtype. ``stats["nfe_solver"]`` is the number of right-hand-side
calls the backend made, counted by [`CountingScore`][sdegen.solvers.base.CountingScore], whose checks
(output shaped like ``y``, with its dtype and device; ``y`` and ``t`` not edited in place) then hold
here too. The optional packages are imported inside the functions, so `sdegen` imports without them.

- [`torchdiffeq_integrate`][sdegen.solvers.backends.torchdiffeq_integrate]: ``torchdiffeq.odeint`` (Chen et al. 2018) on the tensor as is.
- [`scipy_integrate`][sdegen.solvers.backends.scipy_integrate]: ``scipy.integrate.solve_ivp`` on a flattened float64 NumPy copy, as the
  reference implementation of Song et al. (2021) does; every evaluation copies the state between
  host and device, which is what the native [`rk45_integrate`][sdegen.solvers.rk45.rk45_integrate] avoids.
- [`torchsde_integrate`][sdegen.solvers.backends.torchsde_integrate]: ``torchsde.sdeint`` (Li et al. 2020) for the reverse-time SDE.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .._utils import check_floating, check_positive
from .base import CountingScore, NonFiniteError, StepSizeError, check_finite_state
from .rk45 import initial_step_size

__all__ = ["torchdiffeq_integrate", "scipy_integrate", "torchsde_integrate", "backend_options",
           "check_backend_options", "SCIPY_SOLVERS", "TORCHSDE_SOLVERS"]

#: Methods of ``scipy.integrate.solve_ivp``.
SCIPY_SOLVERS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
#: ``torchsde.sdeint`` methods for Itô SDEs with diagonal noise (ours: additive, $g$ depends on $t$ only).
TORCHSDE_SOLVERS = ("euler", "milstein", "srk")


def _check_common(y0: Tensor, t0, t1) -> tuple[float, float]:
    check_floating(y0, "y0")
    if y0.ndim < 1 or y0.shape[0] < 1:
        raise ValueError(f"y0 must have shape (B, *D) with B >= 1, got {tuple(y0.shape)}")
    out = []
    for name, v in (("t0", t0), ("t1", t1)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise TypeError(f"{name} must be a finite Python float, got {v!r}")
        out.append(float(v))
    check_finite_state(y0, "y0")
    return out[0], out[1]


# Parameters of the backends' solver constructors that the adapters set themselves (or that are not
# options: the function, the state, the time span, the tolerances, which are explicit arguments;
# scipy_solver's inner `solver` would collide with the adapter's own `solver=`).
_TORCHDIFFEQ_OWNED = frozenset({"self", "func", "y0", "rtol", "atol", "dtype", "solver"})
# explicit_adams passes implicit=False to its parent itself: implicit= would be a duplicate argument.
_TORCHDIFFEQ_FIXED = {"explicit_adams": frozenset({"implicit"})}
_SCIPY_OWNED = frozenset({"self", "fun", "t0", "y0", "t_bound", "rtol", "atol", "vectorized"})
# torchsde.sdeint's own keywords a user may set: ``options`` goes to the solver; the Brownian
# interval's ``levy_area_approximation`` is taken by the adapter. The rest are set by the adapter
# (bm, method, dt, adaptive), only act with adaptive=True, which the fixed-step adapter never uses
# (rtol, atol, dt_min), or change what sdeint returns (names, logqp, extra, extra_solver_state).
_TORCHSDE_OPTIONS = ("levy_area_approximation", "options")


def backend_options(backend: str, solver: str) -> tuple[str, ...]:
    r"""The keyword options ``backend``'s ``solver`` really accepts, read from the backend itself.

    - ``"torchdiffeq"``: the named parameters of the solver class's ``__init__`` and its parents'
      (what ``odeint(..., options=)`` reaches), plus ``norm``, which ``odeint`` itself takes.
    - ``"scipy"``: the named parameters of the ``scipy.integrate`` method class (``first_step``,
      ``max_step``, and ``jac``, ``min_step``, ... where the method has them). ``solve_ivp``'s own
      ``t_eval``, ``dense_output``, ``events`` and ``args`` are not offered: they change which state
      the adapter returns or the right-hand side's signature.
    - ``"torchsde"``: ``options`` (the solver's options dict) and ``levy_area_approximation``.

    Args:
        backend: ``"torchdiffeq"``, ``"scipy"`` or ``"torchsde"``.
        solver: the backend's method name.

    Returns:
        The sorted option names (``rtol``/``atol``, set explicitly, not included).
    """
    import inspect

    if backend == "torchdiffeq":
        from torchdiffeq._impl.odeint import SOLVERS

        names = {"norm"}
        for klass in SOLVERS[solver].__mro__:
            if klass is object or "__init__" not in vars(klass):
                continue
            names.update(p.name for p in inspect.signature(klass.__init__).parameters.values()
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        return tuple(sorted(names - _TORCHDIFFEQ_OWNED - _TORCHDIFFEQ_FIXED.get(solver, frozenset())))
    if backend == "scipy":
        import scipy.integrate

        params = inspect.signature(getattr(scipy.integrate, solver).__init__).parameters.values()
        return tuple(sorted(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                            and p.name not in _SCIPY_OWNED))
    if backend == "torchsde":
        return _TORCHSDE_OPTIONS
    raise ValueError(f"unknown backend {backend!r}; valid: 'torchdiffeq', 'scipy', 'torchsde'")


def check_backend_options(backend: str, solver: str, options) -> None:
    """Raise ``TypeError`` listing the valid options if ``options`` has a name ``solver`` does not take.

    The backends themselves only warn about unknown options (torchdiffeq, scipy, torchsde), so a typo
    such as ``max_stepz=`` would run with the default silently; this makes it an error, as for the
    native methods. Every adapter calls it, so ``sample`` and ``log_likelihood`` check alike.

    Args:
        backend: ``"torchdiffeq"``, ``"scipy"`` or ``"torchsde"``.
        solver: the backend's method name.
        options (Mapping[str, Any] | Iterable[str]): the option names given (a mapping or an iterable of names).
    """
    valid = backend_options(backend, solver)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"{backend} solver {solver!r} got unknown option(s) {', '.join(unknown)}; valid options: "
                        f"{', '.join(valid) or '(none)'} (besides solver, rtol, atol)")


def _check_call(backend: str, solver: str, solvers, y0: Tensor, t0, t1, opts, **tolerances) -> tuple[float, float]:
    """The checks every adapter makes first: ``y0``, ``t0``, ``t1`` (`_check_common`), the solver name
    among ``solvers``, each tolerance positive, and the option names (`check_backend_options`).
    Returns ``(t0, t1)`` as floats."""
    t0, t1 = _check_common(y0, t0, t1)
    if solver not in solvers:
        raise ValueError(f"unknown {backend} solver {solver!r}; choose one of {', '.join(solvers)}")
    for name, value in tolerances.items():
        check_positive(value, name)
    check_backend_options(backend, solver, opts)
    return t0, t1


def _finite(out: Tensor, t, backend: str, calls: int) -> Tensor:
    """Raise [`NonFiniteError`][sdegen.solvers.backends.NonFiniteError] naming the time if the right-hand side is NaN/inf.

    The external integrators would otherwise fail later with their own step-size errors (or, for
    torchsde, carry NaN to the end). This check reads one flag per evaluation: a host sync that these
    reference backends already pay (torchdiffeq's and scipy's step control read values every step).
    """
    if not bool(torch.isfinite(out).all()):
        tv = float(t) if not isinstance(t, Tensor) else float(t.reshape(-1)[0])
        # Error path only. The backends do not expose their last accepted state: x is None (the
        # docstring's "none available"); step counts right-hand-side evaluations here.
        i = int(torch.nonzero(~torch.isfinite(out.reshape(out.shape[0], -1)).all(1))[0]) if out.ndim else None
        raise NonFiniteError(f"{backend}: the right-hand side became non-finite for sample {i} at evaluation "
                             f"{calls} (t={tv:.6g}); the score function likely returned NaN/inf there", step=calls,
                             t=tv, sample=i)
    return out


def _time_vec(t: Tensor | float, y: Tensor) -> Tensor:
    t = torch.as_tensor(t, device=y.device, dtype=y.dtype)
    return t.reshape(1).expand(y.shape[0])


def torchdiffeq_integrate(fn: Callable[[Tensor, Tensor], Tensor], y0: Tensor, t0: float, t1: float, *,
                          solver: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                          **opts) -> tuple[Tensor, dict]:
    r"""Integrate $dy/dt = f(y, t)$ from ``t0`` to ``t1`` with ``torchdiffeq.odeint``.

    torchdiffeq integrates decreasing times itself (it negates time internally), so ``t1 < t0``
    (sampling, from ``T`` down to ``eps``) needs no change of variables.

    Args:
        fn: ``fn(y, t) -> dy/dt``; ``y`` ``(B, *D)``, ``t`` ``(B,)``.
        y0: ``(B, *D)``.
        t0 (float): start time.
        t1 (float): end time.
        solver: a torchdiffeq method name (``"dopri5"``, ``"dopri8"``, ``"bosh3"``, ``"rk4"``,
            ``"euler"``, ...).
        rtol (float): relative tolerance of the adaptive methods.
        atol (float): absolute tolerance of the adaptive methods.
        **opts (Any): passed as torchdiffeq's ``options`` dict (e.g. ``step_size=`` for fixed-grid methods,
            ``first_step=``, ``max_num_steps=``); a name the solver does not take is a ``TypeError``
            (see `backend_options`).

    Returns:
        ``(y1, stats)`` with ``stats = {"nfe_solver": calls of fn, "solver": solver}``.
    """
    import torchdiffeq
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

    t0, t1 = _check_call("torchdiffeq", solver, sorted(SOLVERS), y0, t0, t1, opts, rtol=rtol, atol=atol)
    counted = CountingScore(fn)     # the one counter, with its shape, dtype/device and in-place checks

    def func(t: Tensor, y: Tensor) -> Tensor:
        return _finite(counted(y, _time_vec(t, y)), t, "torchdiffeq", counted.nfe)

    if t0 == t1:
        return y0, {"nfe_solver": 0, "solver": solver}
    ts = torch.tensor([t0, t1], device=y0.device, dtype=y0.dtype)
    options = dict(opts)
    if issubclass(SOLVERS[solver], RKAdaptiveStepsizeODESolver):
        # torchdiffeq's adaptive solvers probe f outside [t0, t1] when choosing the first step and
        # step past t1 to interpolate back; a score function is undefined outside [0, T]. A first
        # step capped at the span (our Hairer-Wanner choice) and `step_t` = [t1] (steps land on
        # t1) keep every evaluation inside the interval.
        if "first_step" not in options:
            k0 = func(ts[0], y0)
            h0 = initial_step_size(lambda y, t: func(t[0], y), y0, _time_vec(t0, y0), k0,
                                   1.0 if t1 > t0 else -1.0, SOLVERS[solver].order, rtol, atol,
                                   per_sample=False, span=abs(t1 - t0))
            options["first_step"] = float(h0)
        options.setdefault("step_t", torch.tensor([t1], device=y0.device, dtype=y0.dtype))
    ys = torchdiffeq.odeint(func, y0, ts, rtol=rtol, atol=atol, method=solver, options=options or None)
    return ys[-1], {"nfe_solver": counted.nfe, "solver": solver}


def scipy_integrate(fn: Callable[[Tensor, Tensor], Tensor], y0: Tensor, t0: float, t1: float, *,
                    solver: str = "RK45", rtol: float = 1e-5, atol: float = 1e-5, **opts) -> tuple[Tensor, dict]:
    r"""Integrate $dy/dt = f(y, t)$ with ``scipy.integrate.solve_ivp`` on a flattened float64 copy.

    The whole batch is one vector of length $B \prod D$ with one step size (and scipy's RMS error
    norm over all of it), exactly as the reference implementation runs its probability-flow sampler.
    Each evaluation copies the state host -> device and the derivative back.

    Args:
        fn: ``fn(y, t) -> dy/dt``; ``y`` ``(B, *D)``, ``t`` ``(B,)``.
        y0: ``(B, *D)``.
        t0 (float): start time.
        t1 (float): end time (``t1 < t0`` allowed).
        solver: one of `SCIPY_SOLVERS`.
        rtol (float): relative tolerance.
        atol (float): absolute tolerance.
        **opts (Any): passed to ``solve_ivp`` (e.g. ``first_step=``, ``max_step=``); a name the method
            does not take is a ``TypeError`` (see `backend_options`).

    Returns:
        ``(y1, stats)``, ``stats`` with ``nfe_solver`` (calls of ``fn``), scipy's ``nfev``, ``njev``,
        ``nlu``, ``accepted`` (steps taken), ``status`` and ``message``.

    Raises:
        StepSizeError: when ``solve_ivp`` fails (e.g. its step size became too small).
    """
    import numpy as np
    from scipy.integrate import solve_ivp

    t0, t1 = _check_call("scipy", solver, SCIPY_SOLVERS, y0, t0, t1, opts, rtol=rtol, atol=atol)
    shape, device, dtype = y0.shape, y0.device, y0.dtype
    counted = CountingScore(fn)     # the one counter, with its shape, dtype/device and in-place checks

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        yt = torch.from_numpy(y).to(device=device, dtype=dtype).reshape(shape)
        out = _finite(counted(yt, _time_vec(float(t), yt)), t, "scipy", counted.nfe)
        return out.detach().to("cpu", torch.float64).reshape(-1).numpy()

    if t0 == t1:
        return y0, {"nfe_solver": 0, "solver": solver}
    y_np = y0.detach().to("cpu", torch.float64).reshape(-1).numpy()
    sol = solve_ivp(fun, (t0, t1), y_np, method=solver, rtol=rtol, atol=atol, **opts)
    stats = {"nfe_solver": counted.nfe, "solver": solver, "nfev": int(sol.nfev), "njev": int(sol.njev),
             "nlu": int(sol.nlu), "accepted": len(sol.t) - 1, "status": int(sol.status), "message": sol.message}
    if not sol.success:
        x_last = torch.from_numpy(sol.y[:, -1].copy()).to(device=device, dtype=dtype).reshape(shape)
        raise StepSizeError(f"scipy solve_ivp ({solver}) failed at t={sol.t[-1]:.6g}: {sol.message}",
                            t=float(sol.t[-1]), x=x_last, steps=len(sol.t) - 1)
    y1 = torch.from_numpy(sol.y[:, -1].copy()).to(device=device, dtype=dtype).reshape(shape)
    return y1, stats


class _NegatedTimeSDE(torch.nn.Module):
    r"""The SDE in torchsde's form with time $s = \sigma t$ ($\sigma = -1$ for reverse time).

    For $dx = b(x, t)\,dt + g(t)\,d\bar w$ run with decreasing $t$, the substitution $s = -t$ gives
    $dx = -b(x, -s)\,ds + g(-s)\,dW_s$ with increasing $s$ (the noise term's sign is immaterial in
    law: $-dW$ is again a Brownian increment). State is flattened to ``(B, N)``: torchsde's
    diagonal noise, each coordinate with diffusion $g$.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, drift, diffusion, sign: float, shape):
        super().__init__()
        # The drift (the score inside it) is counted by the one counter, with its checks.
        self._drift = CountingScore(drift)
        self._diffusion, self._sign, self._shape = diffusion, sign, shape

    def f(self, s: Tensor, y: Tensor) -> Tensor:
        yt = y.reshape(self._shape)
        out = _finite(self._drift(yt, _time_vec(self._sign * s, yt)), self._sign * s, "torchsde", self._drift.nfe)
        return (self._sign * out).reshape(y.shape)

    def g(self, s: Tensor, y: Tensor) -> Tensor:
        g = self._diffusion(_time_vec(self._sign * s, y))
        return g.reshape(-1, 1).to(dtype=y.dtype).expand(y.shape)


def torchsde_integrate(drift: Callable[[Tensor, Tensor], Tensor], diffusion: Callable[[Tensor], Tensor],
                       y0: Tensor, t0: float, t1: float, *, solver: str = "euler", steps: int = 1000,
                       generator: torch.Generator | None = None, **opts) -> tuple[Tensor, dict]:
    r"""Integrate $dx = b(x, t)\,dt + g(t)\,dw$ from ``t0`` to ``t1`` with ``torchsde.sdeint``.

    For sampling pass the reverse SDE's drift $b = f - g^2 s_\theta$ and $g$ in forward time with
    ``t1 < t0``; since ``sdeint`` needs increasing time, the adapter substitutes $s = -t$ and negates
    the drift (see ``torchsde/examples/cont_ddpm.py`` for the same device). The Brownian path is a
    ``torchsde.BrownianInterval`` whose entropy is one integer drawn from ``generator``, so the same
    generator state gives the same path and the same samples.

    Args:
        drift: ``b(x, t)``, ``x`` ``(B, *D)``, ``t`` ``(B,)`` in forward time.
        diffusion: ``g(t) -> (B,)``.
        y0: ``(B, *D)`` start state (at ``t0``).
        t0 (float): start time.
        t1 (float): end time.
        solver: one of `TORCHSDE_SOLVERS` (``"srk"`` uses a space-time Lévy-area Brownian
            interval).
        steps: number of fixed steps, $\Delta s = |t_1 - t_0| / \text{steps}$.
        generator: source of the Brownian path's seed.
        **opts (Any): ``options=`` (passed to ``sdeint``) and ``levy_area_approximation`` (to the
            Brownian interval); any other name is a ``TypeError``.

    Returns:
        ``(y1, stats)`` with ``stats = {"nfe_solver": drift calls, "solver": solver, "steps": steps,
        "entropy": seed}``.
    """
    import torchsde

    t0, t1 = _check_call("torchsde", solver, TORCHSDE_SOLVERS, y0, t0, t1, opts)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not callable(drift) or not callable(diffusion):
        raise TypeError("drift and diffusion must be callables drift(x, t) and diffusion(t)")
    if t0 == t1:
        return y0, {"nfe_solver": 0, "solver": solver, "steps": 0, "entropy": None}
    sign = -1.0 if t1 < t0 else 1.0
    s0, s1 = sign * t0, sign * t1
    B = y0.shape[0]
    y_flat = y0.reshape(B, -1)
    # One host read at start-up: the path's seed. Same generator state -> same seed -> same path.
    gen_device = generator.device if generator is not None else "cpu"
    entropy = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
    levy = opts.pop("levy_area_approximation", "space-time" if solver == "srk" else "none")
    ds = (s1 - s0) / steps
    bm = torchsde.BrownianInterval(t0=s0, t1=s1, size=y_flat.shape, dtype=y0.dtype, device=y0.device,
                                   entropy=entropy, dt=ds, levy_area_approximation=levy)
    sde = _NegatedTimeSDE(drift, diffusion, sign, y0.shape)
    ts = torch.tensor([s0, s1], device=y0.device, dtype=y0.dtype)
    # sdeint steps by curr + dt and clips only at the final time; with dt = ds exactly, rounding in
    # the accumulated time can leave a spurious extra sliver step. A relative 1e-9 margin makes the
    # last of the `steps` steps land on (and be clipped to) s1.
    ys = torchsde.sdeint(sde, y_flat, ts, bm=bm, method=solver, dt=ds * (1 + 1e-9), adaptive=False, **opts)
    y1 = ys[-1].reshape(y0.shape)
    return y1, {"nfe_solver": sde._drift.nfe, "solver": solver, "steps": steps, "entropy": entropy}
