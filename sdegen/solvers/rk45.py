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

Implementation: the tableau is data (`sdegen.solvers.tableaus.DOPRI5`, or any ``tableau=``) over the
explicit-RK core (`sdegen.solvers.explicit_rk`; its declared norm is the one above), driven by the one
adaptive loop (`sdegen.solvers.loop.integrate_adaptive`, shared with ``adaptive_sde``); ``fn`` is
called through [`CountingScore`][sdegen.solvers.base.CountingScore], the one evaluation counter.

Device discipline: the state, stages and (in ``per_sample`` mode) times and step sizes live on
``y0``'s device. Each step makes exactly ONE device-to-host transfer: the accept/reject decision
(batched mode: the error norm; per-sample mode: "is any sample still running / did anything go
wrong"), which an adaptive loop cannot avoid because the number of further steps depends on it.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import torch
from torch import Tensor

from .._utils import append_dims, check_floating, check_positive
from .loop import AdaptiveRun, integrate_adaptive
from .base import CountingScore, NonFiniteError, check_finite_state
from .controllers import PIController
from .explicit_rk import Dopri5, ODETerm, TableauRK, first_bad_sample
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
        record_every: record ``(t, y)`` every this many accepted steps (per-sample mode: every this many
            attempts that accepted some sample, with ``t`` the least advanced sample's time).
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
        ValueError: ``fn`` returned a tensor not shaped like ``y`` (also: invalid arguments).
        TypeError: ``fn`` returned another dtype or device than ``y``'s.
        RuntimeError: ``fn`` modified ``y`` or ``t`` in place.
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

    # The one counter of the adaptive path; it also checks every output (shape, dtype, device) and that
    # fn left y and t alone, without a host read. Its wording speaks of a score; fn here is any ODE
    # right-hand side, so a failed check is reworded (error path only).
    f = CountingScore(fn)
    try:
        y1 = _integrate(f, y0, t0, t1, rtol, atol, first_step, max_steps, ctrl, tableau, progress, record_every,
                        per_sample, stats, traj)
    except (ValueError, TypeError, RuntimeError) as e:
        if str(e).startswith("score_fn must return a tensor shaped like x"):
            raise ValueError(f"rk45: fn(y, t) must return a tensor shaped like y ({e})") from None
        if str(e).startswith("score_fn must return a tensor with x's dtype"):
            raise TypeError(f"rk45: fn(y, t) must return y's dtype and device ({e})") from None
        if str(e).startswith("score_fn modified its input"):
            raise RuntimeError(f"rk45: fn(y, t) modified its input in place ({e})") from None
        raise
    finally:
        stats["nfe"] = f.nfe
    return y1, stats, traj


def _nonfinite_start(fn_name: str, k1: Tensor, y0: Tensor, t0: float) -> NonFiniteError:
    """The error for a start where the derivative (or the first-step probe) is NaN/inf."""
    i = first_bad_sample(k1)
    where = (f"fn(y0, t0) is NaN/inf for sample {i}" if i is not None
             else "the first-step probe f(y0 + h0 f0, t0 + h0) is NaN/inf")
    return NonFiniteError(f"{fn_name}: {where} at t={t0:.6g} (step 0); the score function likely returns "
                          "NaN/inf there", step=0, t=t0, x=y0, sample=i, x_t=t0)


def _integrate(f, y0, t0, t1, rtol, atol, first_step, max_steps, ctrl, tab, progress, record_every, per_sample,
               stats, traj):
    B = y0.shape[0]
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    t_vec = torch.full((B,), t0, device=y0.device, dtype=y0.dtype)
    k1 = f(y0, t_vec)
    if first_step is None:
        with torch.no_grad():  # step-size heuristics are not differentiated
            h = initial_step_size(f, y0, t_vec, k1, direction, tab.order, rtol, atol, per_sample=per_sample, span=span)
    if per_sample:
        if first_step is not None:
            h = torch.full((B,), float(first_step), device=y0.device, dtype=y0.dtype)
        h = h.detach().clamp_max(span)
        # One host read at start-up (not per step): the first steps (a stat) and whether they and f(y0)
        # are finite. A NaN step would make NaN stage times, which the score would report as an
        # out-of-range t.
        first = torch.stack([h, torch.isfinite(k1.detach().reshape(B, -1)).all(1).to(h.dtype)]).to("cpu")
        stats["first_step"] = first[0]
        if not bool((first[1] > 0).all() and torch.isfinite(first[0]).all()):
            raise _nonfinite_start("rk45", k1, y0, t0)
    else:
        if first_step is None:
            # One host read at start-up (not per step): the first step and whether f(y0) is finite.
            h, k1_ok = torch.stack([h.detach().to(k1.dtype), torch.isfinite(k1.detach()).all().to(k1.dtype)]).tolist()
            if not (k1_ok and math.isfinite(h)):
                raise _nonfinite_start("rk45", k1, y0, t0)
        else:
            h = float(first_step)
        h = min(h, span)
        stats["first_step"] = h
    step = (Dopri5 if tab is DOPRI5 else functools.partial(TableauRK, tab))(rtol=rtol, atol=atol, per_sample=per_sample)
    # Per sample, finished samples stay in every call with a zero step: fn sees the full batch (a
    # likelihood's divergence estimator holds one probe per row).
    run = AdaptiveRun(controller=ctrl, q=tab.error_order + 1, max_steps=max_steps, compact=False, name="rk45")
    y, out, traj_run = integrate_adaptive(step, ODETerm(f), y0, t0, t1, h, run, state=k1,
                                          progress=progress, record_every=record_every)
    if traj is not None:
        traj[1:] = traj_run[1:]
    stats.update(accepted=out["accepted"], rejected=out["rejected"])
    if per_sample:
        stats.update(steps=out["attempts"], accepted_per_sample=out["accepted_per_sample"],
                     rejected_per_sample=out["rejected_per_sample"])
    else:
        stats["times"] = out["times"]
    return y
