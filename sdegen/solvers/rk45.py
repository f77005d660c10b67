r"""Adaptive Dormand–Prince 5(4) in torch: a Butcher tableau (data) plus a separate step-size controller.

One step of an explicit Runge–Kutta method with $s$ stages and step $h$ (signed; $h < 0$ when
integrating forward time downwards, from ``T`` to ``eps``) is

$$k_i = f\Big(y_n + h \sum_{j<i} a_{ij} k_j,\ t_n + c_i h\Big), \qquad
  y_{n+1} = y_n + h \sum_i b_i k_i, \qquad
  \mathrm{err} = h \sum_i (b_i - \hat b_i)\, k_i,$$

where $\hat b$ is the embedded 4th-order solution. Dormand–Prince (Dormand & Prince 1980; Hairer,
Nørsett & Wanner, "Solving ODEs I", Table II.5.2) has 7 stages, propagates the 5th-order solution
(local extrapolation) and is FSAL: $k_7 = f(y_{n+1}, t_{n+1})$ is the next step's $k_1$, so an
attempted step costs 6 evaluations. The error is measured in the RMS norm

$$\|e\| = \sqrt{\tfrac1N \sum_i \Big(\frac{e_i}{\mathrm{atol} + \mathrm{rtol}\max(|y_{n,i}|, |y_{n+1,i}|)}\Big)^2}$$

(Hairer–Nørsett–Wanner eq. II.4.11) and a step is accepted when $\|e\| \le 1$. The next step is
$h \cdot \mathrm{clip}(\text{safety}\cdot\|e_n\|^{-\alpha}\|e_{n-1}\|^{\beta}, \text{min\_factor}, \text{max\_factor})$
(an I controller for $\beta = 0$; the PI controller of Hairer–Wanner, "Solving ODEs II", eq. IV.2.43c
otherwise, with $\alpha = 1/q - 0.75\beta$, $q = 5$).

Device discipline: the state, stages and (in ``per_sample`` mode) times and step sizes live on
``y0``'s device. Each step makes exactly ONE device-to-host transfer: the accept/reject decision
(batched mode: the error norm; per-sample mode: "is any sample still running / did anything go
wrong"), which an adaptive loop cannot avoid because the number of further steps depends on it.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor

from .._utils import append_dims, check_floating, check_positive
from .base import NonFiniteError, StepSizeError, check_finite_state, progress_bar
from .controllers import PIController
from .tableaus import DOPRI5, ButcherTableau

__all__ = ["ButcherTableau", "DOPRI5", "PIController", "rk45_integrate", "initial_step_size"]

ODEFn = Callable[[Tensor, Tensor], Tensor]


def _rms(v: Tensor, per_sample: bool) -> Tensor:
    if per_sample:
        return v.reshape(v.shape[0], -1).square().mean(1).sqrt()
    return v.square().mean().sqrt()


def initial_step_size(fn: ODEFn, y0: Tensor, t0: Tensor, f0: Tensor, direction: float, order: int,
                      rtol: float, atol: float, per_sample: bool, span: float) -> Tensor:
    r"""Starting step $|h_0|$ by Hairer–Nørsett–Wanner's algorithm (Sec. II.4, "Starting step size").

    $d_0 = \|y_0\|$, $d_1 = \|f_0\|$, $h_0 = 0.01\, d_0/d_1$; an explicit Euler step of $h_0$ gives
    $d_2 = \|f(y_0 + h_0 f_0) - f_0\| / h_0$ and $h_1 = (0.01/\max(d_1, d_2))^{1/(p+1)}$; returns
    $\min(100 h_0, h_1, \text{span})$. Norms are the weighted RMS norms of the error test. The probe
    step is capped at ``span`` $= |t_1 - t_0|$ so that ``fn`` is never called outside the interval
    (a score function is only defined on $[0, T]$). Costs one evaluation.
    Returns a positive tensor: 0-d (batched) or ``(B,)`` (``per_sample``).
    """
    sc = atol + rtol * y0.abs()
    d0 = _rms(y0 / sc, per_sample)
    d1 = _rms(f0 / sc, per_sample)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300)).clamp_max(span)
    h0b = append_dims(h0, y0.ndim) if per_sample else h0
    f1 = fn(y0 + direction * h0b * f0, t0 + direction * h0)
    d2 = _rms((f1 - f0) / sc, per_sample) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                     (0.01 / dmax.clamp_min(1e-300)).pow(1.0 / (order + 1)))
    return torch.minimum(100 * h0, h1).clamp_max(span)


def _lincomb(ks: list[Tensor], coefs: tuple[float, ...]) -> Tensor | None:
    """``sum_j coefs[j] * ks[j]`` with in-place accumulation (``None`` if every coefficient is 0)."""
    acc = None
    for cj, kj in zip(coefs, ks):
        if cj == 0.0:
            continue
        if acc is None:
            acc = kj * cj
        else:
            acc.add_(kj, alpha=cj)
    return acc


def _stage_input(y: Tensor, h, ks: list[Tensor], coefs: tuple[float, ...]) -> Tensor:
    """``y + h * sum_j coefs[j] * ks[j]``; ``h`` a float or a tensor broadcastable against ``y``."""
    acc = _lincomb(ks, coefs)
    return y if acc is None else y + h * acc


def _check_args(y0, t0, t1, rtol, atol, max_steps, first_step):
    check_floating(y0, "y0")
    if y0.ndim < 1 or y0.shape[0] < 1:
        raise ValueError(f"y0 must have shape (B, *D) with B >= 1, got {tuple(y0.shape)}")
    check_finite_state(y0, "y0")
    for name, v in (("t0", t0), ("t1", t1)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise TypeError(f"{name} must be a finite Python float, got {v!r}")
    check_positive(rtol, "rtol", allow_zero=True)
    check_positive(atol, "atol", allow_zero=True)
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol cannot both be 0")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    if first_step is not None:
        check_positive(first_step, "first_step")
    res = 10 * torch.finfo(y0.dtype).eps
    if rtol < res and atol < res:
        # scipy raises such an rtol to 100 eps silently; here the user's value stays, with the reason
        # why it will cost many rejected steps (the error estimate is then rounding noise).
        warnings.warn(f"rk45: rtol={rtol:g} and atol={atol:g} are below the resolution of {y0.dtype} "
                      f"(10 eps = {res:.1e}); rounding errors dominate the error estimate and steps will be "
                      "rejected repeatedly: integrate in float64 for such tolerances", RuntimeWarning, stacklevel=3)


def rk45_integrate(
    fn: ODEFn,
    y0: Tensor,
    t0: float,
    t1: float,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float | None = None,
    max_steps: int = 100_000,
    safety: float = 0.9,
    per_sample: bool = False,
    progress: bool = False,
    record_every: int | None = None,
    controller: PIController | None = None,
    tableau: ButcherTableau = DOPRI5,
) -> tuple[Tensor, dict, list[tuple[float, Tensor]] | None]:
    r"""Integrate $dy/dt = f(y, t)$ from ``t0`` to ``t1`` with adaptive Dormand–Prince 5(4).

    Order 5 (local extrapolation), embedded order-4 error estimate, FSAL, automatic first step,
    PI step-size control (see the module docstring for the formulas). ``t1 < t0`` is the usual
    sampling direction (forward time from ``T`` down to ``eps``); ``t1 > t0`` serves likelihoods.

    Modes:
        - ``per_sample=False`` (default): one step size for the whole batch; the error norm is the
          RMS over every entry of the batch (as ``scipy.integrate.solve_ivp`` on the flattened state,
          and torchdiffeq, do), so results at equal tolerance compare like for like.
        - ``per_sample=True``: every batch element has its own time, step size, error norm and
          controller history, so one stiff sample does not force small steps on the others;
          finished (or rejected) samples do not change. ``fn`` is still called on the full batch,
          with a ``(B,)`` tensor of the samples' own times.

    Number of evaluations: ``1`` (initial derivative) ``+ 1`` (automatic first step, if
    ``first_step`` is None) ``+ 6 * (accepted + rejected)`` steps (batched calls in per-sample mode).

    Args:
        fn: ``fn(y, t) -> dy/dt``, ``y`` shaped like ``y0`` ``(B, *D)``, ``t`` a ``(B,)`` tensor. When
            no gradient flows through the solve, ``y`` and ``t`` are views of reused work buffers:
            ``fn`` must not keep references to them after returning (copy what it wants to keep).
            When ``y0`` or ``fn``'s output requires grad (and grad mode is on), every stage is a
            fresh tensor and the solve is differentiable.
        y0: initial state ``(B, *D)``; the result keeps its device and dtype.
        t0 (float): start time.
        t1 (float): end time.
        rtol (float): relative tolerance of the error test.
        atol (float): absolute tolerance of the error test.
        first_step: initial ``|h|``; default: Hairer–Wanner's automatic choice.
        max_steps: maximum number of attempted steps (accepted + rejected).
        safety: controller safety factor (ignored when ``controller`` is given).
        per_sample: per-sample times and step sizes (see Modes).
        progress: show a tqdm bar with the current ``t`` and step size.
        record_every: record ``(t, y)`` every this many accepted steps (batched mode; in per-sample
            mode every this many loop iterations, with ``t`` the smallest progress in the batch).
        controller: a [`PIController`][sdegen.solvers.rk45.PIController] (default ``PIController(safety=safety)``).
        tableau: an embedded explicit RK pair (default `DOPRI5`).

    Returns:
        ``(y1, stats, trajectory)``: ``y1`` ``(B, *D)`` at ``t1``; ``stats`` with ``accepted``,
        ``rejected``, ``nfe`` (calls of ``fn``), ``first_step`` and, per sample, ``accepted_per_sample``
        / ``rejected_per_sample`` (CPU int tensors) in per-sample mode; ``trajectory`` a list of
        ``(t, y)`` (detached copies, first entry ``t0``, last ``t1``) or ``None``. In batched mode
        ``stats["times"]`` is a float64 CPU tensor of ``t0`` and every accepted step's end time.

    Raises:
        StepSizeError: the step size underflowed (relative to ``t``) or ``max_steps`` was exceeded;
            carries ``t``, ``dt``, the last accepted state ``x`` and ``steps``.
        NonFiniteError: ``fn`` returned NaN/inf at an accepted state.
    """
    _check_args(y0, t0, t1, rtol, atol, max_steps, first_step)
    t0, t1 = float(t0), float(t1)
    if record_every is not None and (not isinstance(record_every, int) or record_every < 1):
        raise ValueError(f"record_every must be a positive int or None, got {record_every!r}")
    ctrl = controller if controller is not None else PIController(safety=safety)
    stats = {"accepted": 0, "rejected": 0, "nfe": 0, "first_step": None}
    traj = [(t0, y0.detach().clone())] if record_every else None
    if t0 == t1:
        return y0, stats, traj

    calls = [0]

    def f(y: Tensor, t: Tensor) -> Tensor:
        calls[0] += 1
        out = fn(y, t)
        if not isinstance(out, Tensor) or out.shape != y.shape:
            raise ValueError(f"fn(y, t) must return a tensor shaped like y {tuple(y.shape)}, "
                             f"got {tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        if out.dtype is not y.dtype:
            raise TypeError(f"fn(y, t) must return y's dtype {y.dtype}, got {out.dtype}")
        return out

    run = _integrate_per_sample if per_sample else _integrate_batched
    y1 = run(f, y0, t0, t1, rtol, atol, first_step, max_steps, ctrl, tableau, progress, record_every, stats, traj)
    stats["nfe"] = calls[0]
    return y1, stats, traj


def _progress_bar(progress: bool, t0: float, t1: float):
    return progress_bar(progress, abs(t1 - t0), "rk45", time_bar=True)


def _rk_step(f: ODEFn, tab: ButcherTableau, y: Tensor, k1: Tensor, t: Tensor, h, hb):
    """One attempted step with fresh tensors for every stage (differentiable end to end).

    ``t``: ``(B,)`` start times; ``h``: the step (float or ``(B,)``) added to ``t`` for the stage
    times; ``hb``: ``h`` broadcastable against ``y``. Returns ``(y_new, err_sum, k_last)``, the error
    estimate being ``hb * err_sum``.
    """
    ks = [k1]
    y_new = y
    for i in range(1, tab.stages):
        yi = _stage_input(y, hb, ks, tab.a[i])
        if tab.fsal and i == tab.stages - 1:
            y_new = yi  # the last row of a equals b: this stage input is the solution
        ks.append(f(yi, t + tab.c[i] * h))
    if not tab.fsal:
        y_new = _stage_input(y, hb, ks, tab.b)
    err_sum = _lincomb(ks, tab.b_err)
    return y_new, err_sum if err_sum is not None else torch.zeros_like(y), ks[-1]


def _scaled(err_sum: Tensor, y: Tensor, y_new: Tensor, rtol: float, atol: float) -> Tensor:
    r"""$\text{err\_sum} / (\text{atol} + \text{rtol}\max(|y|, |y_{new}|))$ (a new tensor)."""
    return err_sum / torch.maximum(y.abs(), y_new.abs()).mul_(rtol).add_(atol)


class _ListStepper:
    """Batched steps with fresh tensors per stage: used when gradients must flow through the solve."""

    def __init__(self, f: ODEFn, tab: ButcherTableau, y0: Tensor, k1: Tensor, rtol: float, atol: float):
        self.f, self.tab, self.rtol, self.atol = f, tab, rtol, atol
        self.y, self.k1 = y0, k1
        self.err: Tensor | None = None

    def attempt(self, t: float, dt: float) -> Tensor:
        """Try a step of ``dt`` from ``t``; returns the (unscaled by ``|dt|``) error norm, 0-d."""
        y = self.y
        tt = torch.full((y.shape[0],), t, device=y.device, dtype=y.dtype)
        self.y_new, err_sum, self.k_last = _rk_step(self.f, self.tab, y, self.k1, tt, dt, dt)
        self.err = _scaled(err_sum, y, self.y_new, self.rtol, self.atol).detach()
        return torch.linalg.vector_norm(self.err)

    def accept(self, t_new: float) -> None:
        self.y = self.y_new
        self.k1 = self.k_last if self.tab.fsal else self.f(
            self.y, torch.full((self.y.shape[0],), t_new, device=self.y.device, dtype=self.y.dtype))

    def k1_finite(self) -> bool:
        return bool(torch.isfinite(self.k1).all())

    def bad_sample(self) -> int | None:
        """First sample whose initial derivative or last error estimate is non-finite (error path only)."""
        return _first_bad_sample(self.k1, self.err)

    def state(self) -> Tensor:
        return self.y


_TABLEAU_CACHE: dict = {}


def _tableau_tensors(tab: ButcherTableau, device: torch.device, dtype: torch.dtype):
    """The tableau as device tensors ``(rows of a, b, b_err, c)``, built once per (tableau, device, dtype):
    rebuilding them costs a few host-to-device copies per solve, a visible share of a small solve."""
    key = (tab, device, dtype)
    hit = _TABLEAU_CACHE.get(key)
    if hit is None:
        s = tab.stages
        A = torch.zeros(s, s, dtype=torch.float64)
        for i, row in enumerate(tab.a):
            if row:
                A[i, :i] = torch.tensor(row, dtype=torch.float64)
        A = A.to(device=device, dtype=dtype)
        hit = ([A[i, :i] for i in range(s)], torch.tensor(tab.b, dtype=dtype).to(device),
               torch.tensor(tab.b_err, dtype=dtype).to(device), torch.tensor(tab.c, dtype=dtype).to(device))
        if len(_TABLEAU_CACHE) > 64:  # user tableaus on many devices: keep the cache bounded
            _TABLEAU_CACHE.clear()
        _TABLEAU_CACHE[key] = hit
    return hit


class _BufferStepper:
    r"""Batched steps in preallocated buffers: the fast path when no gradient flows through the solve.

    The stage derivatives are the rows of one ``(s, N)`` buffer ``K``, so each stage input
    $y + h \sum_j a_{ij} k_j$ is ONE ``addmv`` written into a stage buffer, the error sum one ``mv``,
    and the stage times one fused update: about 23 tensor operations per step besides ``f``, which
    is what the per-step overhead of a small-batch solve consists of. ``f`` receives views of these
    buffers; it must not keep references to its arguments after returning (they are overwritten by
    later stages).
    """

    def __init__(self, f: ODEFn, tab: ButcherTableau, y0: Tensor, k1: Tensor, rtol: float, atol: float):
        s, B, N = tab.stages, y0.shape[0], y0.numel()
        dev, dt_ = y0.device, y0.dtype
        self.f, self.tab, self.rtol, self.atol, self.shape = f, tab, rtol, atol, y0.shape
        self.K = y0.new_empty((s, N))
        self.K[0].copy_(k1.reshape(-1))
        self.KT = [self.K[:n].T for n in range(s + 1)]
        self.Ksh = [self.K[i].view(y0.shape) for i in range(s)]
        # Stage inputs; row 0 (the stage-0 input is y itself) holds y_new for non-FSAL tableaus.
        self.Y = y0.new_empty((s, N))
        self.Ysh = [self.Y[i].view(y0.shape) for i in range(s)]
        self.new = s - 1 if tab.fsal else 0
        self.y = y0.detach().reshape(-1).clone()
        self.ay, self.ay_new = self.y.abs(), torch.empty_like(self.y)
        self.err, self.scale = torch.empty_like(self.y), torch.empty_like(self.y)
        self.rows, self.b, self.b_err, c = _tableau_tensors(tab, dev, dt_)
        self.cB = c[:, None].expand(s, B).contiguous()
        self.tb = torch.empty_like(self.cB)
        self.trow = [self.tb[i] for i in range(s)]

    def attempt(self, t: float, dt: float) -> Tensor:
        torch.mul(self.cB, dt, out=self.tb)
        self.tb.add_(t)
        for i in range(1, self.tab.stages):
            torch.addmv(self.y, self.KT[i], self.rows[i], alpha=dt, out=self.Y[i])
            self.Ksh[i].copy_(self.f(self.Ysh[i], self.trow[i]))
        if not self.tab.fsal:
            torch.addmv(self.y, self.KT[-1], self.b, alpha=dt, out=self.Y[0])
        torch.mv(self.KT[-1], self.b_err, out=self.err)
        torch.abs(self.Y[self.new], out=self.ay_new)
        torch.maximum(self.ay, self.ay_new, out=self.scale)
        self.scale.mul_(self.rtol).add_(self.atol)
        return torch.linalg.vector_norm(self.err.div_(self.scale))

    def accept(self, t_new: float) -> None:
        self.y.copy_(self.Y[self.new])
        self.ay, self.ay_new = self.ay_new, self.ay
        if self.tab.fsal:
            self.K[0].copy_(self.K[-1])
        else:
            tt = torch.full((self.shape[0],), t_new, device=self.y.device, dtype=self.y.dtype)
            self.Ksh[0].copy_(self.f(self.y.view(self.shape), tt))

    def k1_finite(self) -> bool:
        return bool(torch.isfinite(self.K[0]).all())

    def bad_sample(self) -> int | None:
        """First sample whose initial derivative or last error estimate is non-finite (error path only)."""
        return _first_bad_sample(self.K[0].view(self.shape), self.err.view(self.shape))

    def state(self) -> Tensor:
        return self.y.view(self.shape)


def _first_bad_sample(*tensors: Tensor | None) -> int | None:
    """Index of the first sample with a NaN/inf entry in the first tensor that has one (error path only)."""
    for v in tensors:
        if v is None:
            continue
        bad = ~torch.isfinite(v.reshape(v.shape[0], -1)).all(1)
        if bool(bad.any()):
            return int(torch.nonzero(bad)[0])
    return None


def _nonfinite_start(fn_name: str, k1: Tensor, y0: Tensor, t0: float) -> NonFiniteError:
    """The error for a start where the derivative (or the first-step probe) is NaN/inf."""
    i = _first_bad_sample(k1)
    where = (f"fn(y0, t0) is NaN/inf for sample {i}" if i is not None
             else "the first-step probe f(y0 + h0 f0, t0 + h0) is NaN/inf")
    return NonFiniteError(f"{fn_name}: {where} at t={t0:.6g} (step 0); the score function likely returns "
                          "NaN/inf there", step=0, t=t0, x=y0, sample=i, x_t=t0)


def _integrate_batched(f, y0, t0, t1, rtol, atol, first_step, max_steps, ctrl, tab, progress, record_every,
                       stats, traj):
    B = y0.shape[0]
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    q = tab.error_order + 1
    t = t0
    t_vec = torch.full((B,), t0, device=y0.device, dtype=y0.dtype)
    k1 = f(y0, t_vec)
    if first_step is None:
        # One host read at start-up (not per step).
        with torch.no_grad():  # step-size heuristics are not differentiated
            h0 = initial_step_size(f, y0, t_vec, k1, direction, tab.order, rtol, atol, per_sample=False, span=span)
            # One host read at start-up (not per step): the first step and whether f(y0) is finite.
            h, k1_ok = torch.stack([h0.to(k1.dtype), torch.isfinite(k1).all().to(k1.dtype)]).tolist()
        if not (k1_ok and math.isfinite(h)):
            raise _nonfinite_start("rk45", k1, y0, t0)
    else:
        h = float(first_step)
    h = min(h, span)
    stats["first_step"] = h
    differentiable = torch.is_grad_enabled() and (y0.requires_grad or k1.requires_grad)
    stepper = (_ListStepper if differentiable else _BufferStepper)(f, tab, y0, k1, rtol, atol)
    root_n = math.sqrt(y0.numel())
    prev_err = 1.0
    bar = _progress_bar(progress, t0, t1)
    attempts = 0
    nonfinite_rejection = False
    times = [t0]
    try:
        while direction * (t1 - t) > 0:
            if attempts >= max_steps:
                raise StepSizeError(f"rk45: max_steps={max_steps} exceeded at t={t:.6g} with dt={direction * h:.3g}",
                                    t=t, dt=direction * h, x=stepper.state().clone(), steps=attempts)
            remaining = abs(t1 - t)
            last = h >= remaining * (1 - 1e-12)
            if last:
                h = remaining
            if h <= 16 * math.ulp(max(abs(t), abs(t1), 1e-300)):
                if nonfinite_rejection:
                    i = stepper.bad_sample()
                    raise NonFiniteError(f"rk45: fn returned non-finite values for sample {i} just after t={t:.6g} "
                                         f"(step {stats['accepted']}; the step size shrank to {direction * h:.3g} "
                                         "without avoiding them)", step=stats["accepted"], t=t,
                                         x=stepper.state().clone(), sample=i, x_t=t)
                raise StepSizeError(f"rk45: step size underflow at t={t:.6g} (dt={direction * h:.3g}); the ODE is too "
                                    f"stiff for the tolerances rtol={rtol}, atol={atol}", t=t, dt=direction * h,
                                    x=stepper.state().clone(), steps=attempts)
            attempts += 1
            dt = direction * h
            # The single device-to-host transfer of this step: the accept/reject decision needs the
            # error norm on the host (it decides whether and how far the loop continues).
            err_norm = float(stepper.attempt(t, dt)) * h / root_n
            if not math.isfinite(err_norm) and not stepper.k1_finite():
                i = stepper.bad_sample()
                raise NonFiniteError(f"rk45: fn returned non-finite values for sample {i} at t={t:.6g} (step "
                                     f"{stats['accepted']})", step=stats["accepted"], t=t, x=stepper.state().clone(),
                                     sample=i, x_t=t)
            accepted = err_norm <= 1.0
            nonfinite_rejection = not math.isfinite(err_norm)
            fac = ctrl.factor(err_norm, prev_err, q, accepted)
            if accepted:
                stats["accepted"] += 1
                t = t1 if last else t + dt
                stepper.accept(t)
                times.append(t)
                prev_err = err_norm
                if traj is not None and (stats["accepted"] % record_every == 0 or t == t1):
                    traj.append((t, stepper.state().detach().clone()))
                if bar is not None:
                    bar.update(h)
                    bar.set_postfix(t=f"{t:.4g}", dt=f"{dt:.2e}", refresh=False)
            else:
                stats["rejected"] += 1
            h = h * fac
    finally:
        if bar is not None:
            bar.close()
    stats["times"] = torch.tensor(times, dtype=torch.float64)
    return stepper.state()


def _integrate_per_sample(f, y0, t0, t1, rtol, atol, first_step, max_steps, ctrl, tab, progress, record_every,
                          stats, traj):
    B = y0.shape[0]
    dev, dt_ = y0.device, y0.dtype
    direction = 1.0 if t1 > t0 else -1.0
    q = tab.error_order + 1
    y = y0
    t = torch.full((B,), t0, device=dev, dtype=dt_)
    t_end = torch.full((B,), t1, device=dev, dtype=dt_)
    k1 = f(y, t)
    root_n = math.sqrt(y0[0].numel())
    if first_step is None:
        with torch.no_grad():  # step-size heuristics are not differentiated
            h = initial_step_size(f, y, t, k1, direction, tab.order, rtol, atol, per_sample=True, span=abs(t1 - t0))
    else:
        h = torch.full((B,), float(first_step), device=dev, dtype=dt_)
    h = h.clamp_max(abs(t1 - t0))
    # One host read at start-up: the first steps (a stat) and whether they and f(y0) are finite. A NaN
    # step would make NaN stage times, which the score would report as an out-of-range t.
    first = torch.stack([h.detach(), torch.isfinite(k1.detach().reshape(B, -1)).all(1).to(dt_)]).to("cpu")
    stats["first_step"] = first[0]
    if not bool((first[1] > 0).all() and torch.isfinite(first[0]).all()):
        raise _nonfinite_start("rk45", k1, y0, t0)
    prev_err = torch.ones(B, device=dev, dtype=dt_)
    n_acc = torch.zeros(B, device=dev, dtype=torch.long)
    n_rej = torch.zeros(B, device=dev, dtype=torch.long)
    active = torch.ones(B, device=dev, dtype=torch.bool)
    nonfinite_rej = torch.zeros(B, device=dev, dtype=torch.bool)
    tiny = 16 * torch.finfo(dt_).eps
    bar = _progress_bar(progress, t0, t1)
    done_span = 0.0
    it = 0
    try:
        while True:
            remaining = direction * (t_end - t)
            last = h >= remaining * (1 - 1e-12)
            h_step = torch.where(active, torch.where(last, remaining, h), torch.zeros_like(h))
            underflow = active & (h_step <= tiny * torch.maximum(t.abs(), t_end.abs()).clamp_min(1.0))
            dt = direction * h_step
            y_new, err_sum, k_last = _rk_step(f, tab, y, k1, t, dt, append_dims(dt, y.ndim))
            err_norm = torch.linalg.vector_norm(_scaled(err_sum, y, y_new, rtol, atol).reshape(B, -1), dim=1).detach()
            err_norm = err_norm * h_step / root_n
            finite_err = torch.isfinite(err_norm)
            # Non-finite values at an accepted state, or a step size that shrank to nothing while
            # the error estimate stayed non-finite: fn returns NaN/inf there, not a stiffness problem.
            bad = active & ((~finite_err & ~torch.isfinite(k1.reshape(B, -1)).all(1)) | (underflow & nonfinite_rej))
            nonfinite_rej = torch.where(active, ~finite_err, nonfinite_rej)
            accept = active & (err_norm <= 1.0) & ~underflow
            reject = active & ~accept
            fac = ctrl.factor(err_norm, prev_err, q, accept)
            ab = append_dims(accept, y.ndim)
            y = torch.where(ab, y_new, y)
            t = torch.where(accept, torch.where(last, t_end, t + dt), t)
            k1 = torch.where(ab, k_last, k1) if tab.fsal else torch.where(ab, f(y, t), k1)
            prev_err = torch.where(accept, err_norm, prev_err)
            h = torch.where(active, h_step * fac, h)
            n_acc += accept.long()
            n_rej += reject.long()
            active = active & ~(accept & last)
            it += 1
            # The single device-to-host transfer of this iteration: whether any sample is still
            # running and whether an error must be raised (both decide the control flow), plus the
            # progress figures, read in the same transfer.
            covered = (direction * (t - t0)).min()
            flags = torch.stack([active.any().to(dt_), underflow.any().to(dt_), bad.any().to(dt_), covered,
                                 h.min()]).tolist()
            if flags[2] or flags[1]:
                i = int(torch.nonzero(bad if flags[2] else underflow)[0])  # error path only
                ti, dti = float(t[i]), float(dt[i])
                if flags[2]:
                    raise NonFiniteError(f"rk45: fn returned non-finite values for sample {i} at t={ti:.6g} "
                                         f"(its step {int(n_acc[i])})", step=int(n_acc[i]), t=ti, x=y, sample=i)
                raise StepSizeError(f"rk45: step size underflow for sample {i} at t={ti:.6g} (dt={dti:.3g}); the "
                                    f"ODE is too stiff for rtol={rtol}, atol={atol}", t=t.detach().clone(),
                                    dt=dt.detach().clone(), x=y, steps=it)
            t_min = t1 if not flags[0] else t0 + direction * flags[3]
            if traj is not None and (it % record_every == 0 or not flags[0]):
                traj.append((t_min, y.detach().clone()))
            if bar is not None:
                bar.update(flags[3] - done_span)
                done_span = flags[3]
                bar.set_postfix(t=f"{t_min:.4g}", dt=f"{flags[4]:.2e}", refresh=False)
            if not flags[0]:
                break
            if it >= max_steps:
                raise StepSizeError(f"rk45: max_steps={max_steps} exceeded; {int(active.sum())} samples unfinished",
                                    t=t.detach().clone(), dt=(direction * h).detach().clone(), x=y, steps=it)
    finally:
        if bar is not None:
            bar.close()
    stats["accepted"] = int(n_acc.sum())
    stats["rejected"] = int(n_rej.sum())
    stats["steps"] = it
    stats["accepted_per_sample"] = n_acc.to("cpu")
    stats["rejected_per_sample"] = n_rej.to("cpu")
    return y
