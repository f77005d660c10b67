r"""The one integration loop, [`drive`][sdegen.solvers.loop.drive], and its adaptive entry: accept/reject by a controller.

Given an adaptive step with an error slot ([`AbstractExplicitRK`][sdegen.solvers.explicit_rk.AbstractExplicitRK]:
``step(term, x, t0, t1, state, dw) -> (x_new, error_norm, state)``) the loop attempts steps from
``t_start`` to ``t_end`` (either direction; samplers run forward time from ``T`` down to ``eps``). A
step is accepted where its error norm is at most 1; either way the next step size is
$h \leftarrow h \cdot \mathrm{clip}(\text{safety}\,\|e_n\|^{-\alpha}\|e_{n-1}\|^{\beta})$
([`PIController`][sdegen.solvers.controllers.PIController]; Hairer–Wanner, "Solving ODEs II", eq. IV.2.43c),
and a step that would end within a rounding gap of ``t_end`` lands on it.

Every integration in sdegen runs through [`drive`][sdegen.solvers.loop.drive]: it owns the iterations,
``max_steps``, the counts, the trajectory and the progress bar, and asks a mode object for each
attempt. The fixed grid is one mode ([`GridSteps`][sdegen.solvers.base.GridSteps], through
[`integrate_fixed_grid`][sdegen.solvers.base.integrate_fixed_grid]: the grid is the controller, every
step is accepted, and no attempt reads from the device). For adaptive steps
([`integrate_adaptive`][sdegen.solvers.loop.integrate_adaptive]) what one attempt costs depends on the
mode, so the attempt and the step-size state live in one of two objects with the same interface:

- `HostSteps` (batched ODE steps): one time and step size for the batch as Python floats, the stages
  in preallocated buffers (`sdegen.solvers.explicit_rk.BufferStepper`; the list implementation when
  gradients flow). Its host read is the error norm itself. This is rk45's default path, where the
  per-step overhead of a small batch is the budget.
- `DeviceSteps` (per-sample steps, and stochastic steps): times, step sizes and controller histories
  as ``(B,)`` tensors on the state's device; the decision is made on the device and one stacked
  read of counts and flags follows. Finished samples are either left out of the calls (``compact``:
  the score sees only the running rows) or kept in with a zero step (the right-hand side then sees
  the full batch, e.g. a likelihood's fixed Hutchinson probes).

Stochastic steps get their increments from a Brownian bridge stack: a rejected attempt's increment is
kept and the next, shorter attempt takes its part by the bridge
$\Delta W_{h'} \mid \Delta W_h \sim \mathcal N(\tfrac{h'}{h}\Delta W_h, \tfrac{h'(h - h')}{h} I)$
(Rackauckas & Nie 2017, "RSwM1"), so the path is one Brownian motion whatever the step sequence
([`BrownianBridgeStack`][sdegen.solvers.brownian.BrownianBridgeStack]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .._utils import append_dims
from .base import NonFiniteError, StepSizeError, progress_bar
from .brownian import BrownianBridgeStack
from .controllers import PIController
from .explicit_rk import AbstractExplicitRK, BufferStepper, ListStepper, first_bad_sample

__all__ = ["AdaptiveRun", "integrate_adaptive", "drive", "HostSteps", "DeviceSteps"]


@dataclass(frozen=True)
class AdaptiveRun:
    r"""How [`integrate_adaptive`][sdegen.solvers.loop.integrate_adaptive] runs a step (final class).

    Attributes:
        controller: the step-size controller.
        q: error order + 1 (the controller's exponent $\alpha = 1/q - 0.75\beta$).
        alpha: the exponent itself (overrides ``q``; a solver with a tuned exponent).
        max_steps: most attempts (loop iterations) before `StepSizeError`.
        h_min: smallest step size before `StepSizeError`; ``None``: 16 machine epsilons relative to $|t|$.
        compact: call the term on the running samples only (``False``: the full batch, with zero
            steps for the finished samples).
        nonfinite_streak: raise `NonFiniteError` after this many consecutive attempts with a non-finite
            error (``None``: when the error and the derivative at the state are non-finite, or when
            the step size underflows while the error stays non-finite).
        count_per_sample: keep each sample's accepted and rejected counts (statistics, messages).
        name: the solver's name in messages and on the progress bar.
    """

    controller: PIController
    q: int = 5
    alpha: float | None = None
    max_steps: int = 100_000
    h_min: float | None = None
    compact: bool = False
    nonfinite_streak: int | None = None
    count_per_sample: bool = True
    name: str = "adaptive"


def direction_is_up(t_start: float, t_end: float) -> bool:
    """Whether the integration runs forward in time (likelihoods) rather than down (sampling)."""
    return t_end > t_start


def integrate_adaptive(step: AbstractExplicitRK, term: Any, x: Tensor, t_start: float, t_end: float,
                       h: float | Tensor, run: AdaptiveRun, *, state: Tensor | None = None,
                       draw: Callable[[int], Tensor] | None = None, progress: bool = False,
                       record_every: int | None = None) -> tuple[Tensor, dict, list[tuple[float, Tensor]] | None]:
    r"""Integrate ``term`` from ``t_start`` to ``t_end`` with adaptive attempts of ``step``.

    Args:
        step: the adaptive step; ``step.per_sample`` chooses per-sample or batched control.
        term: ``term.drift(x, t)`` and ``term.diffusion(t)`` (see the step).
        x: ``(B, *D)`` state at ``t_start`` (finite; checked by the caller).
        t_start (float): start time.
        t_end (float): end time (``t_end < t_start`` when sampling).
        h: the first step size ``|h|``: a float, or ``(B,)`` per sample.
        run: loop options ([`AdaptiveRun`][sdegen.solvers.loop.AdaptiveRun]).
        state: $v(x, t_\text{start})$ if already evaluated, or ``None``.
        draw: ``draw(k)``: the ``x``-shaped unit Gaussian draw of attempt ``k`` (stochastic steps).
        progress: a tqdm bar over time.
        record_every: keep the state every this many attempts that accepted some sample, and the final
            state; the time is the least advanced sample's.

    Returns:
        ``(x, stats, trajectory)``; ``stats``: ``accepted``/``rejected`` (attempts summed over the
        samples that made them; batched ODE steps count once), ``attempts`` (iterations), ``times``
        (float64 CPU: ``t_start`` and the time after every attempt that accepted; ``[t_start, t_end]``
        per sample) and, per sample, ``accepted_per_sample``/``rejected_per_sample`` (CPU).

    Raises:
        StepSizeError: the step size fell below the minimum, or ``max_steps`` attempts did not finish.
        NonFiniteError: the term returned NaN/inf (naming the sample, its step count and the time).
    """
    host = not (step.per_sample or draw is not None)
    steps = (HostSteps if host else DeviceSteps)(step, term, x, float(t_start), float(t_end), h, run, state, draw)
    return drive(steps, float(t_start), float(t_end), x, name=run.name, max_steps=run.max_steps, progress=progress,
                 record_every=record_every, per_sample=step.per_sample)


def drive(steps: Any, t_start: float, t_end: float, x: Tensor, *, name: str, max_steps: int, progress: bool = False,
          record_every: int | None = None, per_sample: bool = False,
          time_bar: bool = True, keep_times: bool = True) -> tuple[Tensor, dict, list[tuple[float, Tensor]] | None]:
    r"""The one integration loop: attempts of ``steps`` from ``t_start`` until no sample runs.

    ``steps`` is the mode's attempt-and-state object: [`HostSteps`][sdegen.solvers.loop.HostSteps],
    [`DeviceSteps`][sdegen.solvers.loop.DeviceSteps] (adaptive) or
    [`GridSteps`][sdegen.solvers.base.GridSteps] (a fixed grid: every attempt is accepted, its controller
    is the grid). ``steps.attempt(k)`` returns ``(accepted, rejected, running, t_least, h_show, t_first)``
    as host values (one host read per attempt in the adaptive modes, none in the grid mode); the loop
    owns the counts, ``max_steps``, the trajectory (every ``record_every`` advancing attempts, and the
    last), the progress bar and the accepted times. Returns ``(state, stats, trajectory)``.

    Args:
        steps: the attempt-and-state object.
        t_start (float): start time.
        t_end (float): end time.
        x: ``(B, *D)`` start state (recorded first in the trajectory).
        name: label of the progress bar.
        max_steps: most attempts before ``steps.max_steps_error``.
        progress: show a tqdm bar.
        record_every: trajectory stride in advancing attempts (``None``: no trajectory).
        per_sample: per-sample times (``stats["times"]`` is then ``[t_start, t_end]``).
        time_bar: the bar advances by time (adaptive) or by one per attempt (a grid).
        keep_times: collect the accepted times (a grid knows them: ``stats["times"]`` is then the ends).
    """
    times = [t_start]
    traj = [(t_start, x.detach().clone())] if record_every else None
    bar = progress_bar(progress, abs(t_end - t_start) if time_bar else max_steps, name, time_bar=time_bar)
    steps.show = bar is not None
    accepted = rejected = advanced = 0
    done_span = 0.0
    attempt, keep_times = steps.attempt, keep_times and not per_sample
    try:
        for k in range(max_steps):
            # One attempt and its one host read: (accepted, rejected) counts, whether any sample still
            # runs, the least advanced time, the smallest running step size, the time of sample 0.
            n_ok, n_rej, running, t_least, h_show, t_first = attempt(k)
            accepted += n_ok
            rejected += n_rej
            if n_ok:
                advanced += 1
                if keep_times:
                    times.append(t_first)
                if traj is not None and (advanced % record_every == 0 or not running):
                    traj.append((t_least, steps.state().detach().clone()))
            if bar is not None:
                span = abs(t_least - t_start) if time_bar else k + 1
                bar.update(span - done_span)
                done_span = span
                bar.set_postfix(t=f"{t_least:.4g}", h=f"{h_show:.2e}", refresh=False)
            if not running:
                break
        else:
            raise steps.max_steps_error(max_steps)
    finally:
        if bar is not None:
            bar.close()
    stats = {"accepted": accepted, "rejected": rejected, "attempts": k + 1}
    stats.update(steps.per_sample_stats())
    stats["times"] = torch.tensor(times if keep_times else [t_start, t_end], dtype=torch.float64)
    return steps.state(), stats, traj


class HostSteps:
    """Batched ODE attempts with the time and step size as host floats (see the module docstring)."""

    def __init__(self, step: AbstractExplicitRK, term: Any, x: Tensor, t_start: float, t_end: float,
                 h: float | Tensor, run: AdaptiveRun, state: Tensor | None, draw: None):
        f = term.drift
        k1 = f(x, torch.full((x.shape[0],), t_start, device=x.device, dtype=x.dtype)) if state is None else state
        differentiable = torch.is_grad_enabled() and (x.requires_grad or k1.requires_grad)
        self.stepper = (ListStepper if differentiable else BufferStepper)(f, step.tableau, x, k1, step.rtol,
                                                                          step.atol, step.norm)
        self.t, self.t_end, self.h = t_start, t_end, float(h)
        self.direction = 1.0 if t_end > t_start else -1.0
        self.run, self.step = run, step
        self.root_n = math.sqrt(x.numel())
        self.prev_err = 1.0
        self.rejected_last = False
        self.nonfinite_rejection = False
        self.n_acc = 0

    def attempt(self, k: int) -> tuple[int, int, bool, float, float, float]:
        run, t, t_end, h, direction = self.run, self.t, self.t_end, self.h, self.direction
        remaining = abs(t_end - t)
        last = h >= remaining * (1 - 1e-12)
        if last:
            h = remaining
        floor = run.h_min if run.h_min is not None else 16 * math.ulp(max(abs(t), abs(t_end), 1e-300))
        if h <= floor:
            self._underflow(h, k)
        dt = direction * h
        # The single device-to-host transfer of this attempt: the accept/reject decision needs the
        # error norm on the host (it decides whether and how far the loop continues).
        err = float(self.stepper.attempt(t, dt)) * h / self.root_n
        if not math.isfinite(err) and not self.stepper.k1_finite():
            i = self.stepper.bad_sample()
            raise NonFiniteError(f"{run.name}: fn returned non-finite values for sample {i} at t={t:.6g} (step "
                                 f"{self.n_acc})", step=self.n_acc, t=t, x=self.stepper.state().clone(), sample=i,
                                 x_t=t)
        ok = err <= 1.0
        self.nonfinite_rejection = not math.isfinite(err)
        fac = run.controller.factor(err, self.prev_err, run.q, ok, alpha=run.alpha, after_reject=self.rejected_last)
        self.rejected_last = not ok
        if ok:
            self.n_acc += 1
            self.t = t = t_end if last else t + dt
            self.stepper.accept(t)
            self.prev_err = err
        self.h = h * fac
        return int(ok), int(not ok), t != t_end, t, self.h, t

    def _underflow(self, h: float, attempts: int):
        run, t, dt = self.run, self.t, self.direction * h
        x = self.stepper.state().clone()
        if self.nonfinite_rejection:
            i = self.stepper.bad_sample()
            raise NonFiniteError(f"{run.name}: fn returned non-finite values for sample {i} just after t={t:.6g} "
                                 f"(step {self.n_acc}; the step size shrank to {dt:.3g} without avoiding them)",
                                 step=self.n_acc, t=t, x=x, sample=i, x_t=t)
        raise StepSizeError(f"{run.name}: step size underflow at t={t:.6g} (dt={dt:.3g}); the ODE is too stiff "
                            f"for the tolerances rtol={self.step.rtol}, atol={self.step.atol}", t=t, dt=dt, x=x,
                            steps=attempts)

    def max_steps_error(self, max_steps: int) -> StepSizeError:
        dt = self.direction * self.h
        return StepSizeError(f"{self.run.name}: max_steps={max_steps} exceeded at t={self.t:.6g} with dt={dt:.3g}",
                             t=self.t, dt=dt, x=self.stepper.state().clone(), steps=max_steps)

    def per_sample_stats(self) -> dict:
        return {}

    def state(self) -> Tensor:
        return self.stepper.state()


class DeviceSteps:
    """Per-sample (or stochastic) attempts with ``(B,)`` device times and step sizes (see the module docstring)."""

    def __init__(self, step: AbstractExplicitRK, term: Any, x: Tensor, t_start: float, t_end: float,
                 h: float | Tensor, run: AdaptiveRun, state: Tensor | None, draw: Callable[[int], Tensor] | None):
        B, dev, fd = x.shape[0], x.device, x.dtype
        self.step, self.term, self.run, self.draw = step, term, run, draw
        self.x, self.state_k = x, state
        self.direction = 1.0 if t_end > t_start else -1.0
        self.t_start, self.t_end = t_start, t_end
        self.t = torch.full((B,), t_start, device=dev, dtype=fd)
        self.t_fin = torch.full((B,), t_end, device=dev, dtype=fd)
        self.h = h if isinstance(h, Tensor) else torch.full((B,), float(h), device=dev, dtype=fd)
        # Steps that would end within this gap of t_end land on it (at least 1e-12 of any remaining time).
        self.tiny = 1e-12 * max(1.0, abs(t_start), abs(t_end))
        self.eps16 = 16 * torch.finfo(fd).eps
        self.prev_err = torch.ones(B, device=dev, dtype=fd)
        self.n_acc = torch.zeros(B, device=dev, dtype=torch.long)
        self.n_rej = torch.zeros(B, device=dev, dtype=torch.long)
        self.nonfinite_rej = torch.zeros(B, device=dev, dtype=torch.bool)
        self.stack = BrownianBridgeStack(x) if draw is not None else None
        self.all_idx = torch.arange(B, device=dev)
        self.idx = None  # compact mode: the running samples; None = all (no gathers on the common path)
        self.active = torch.ones(B, device=dev, dtype=torch.bool)  # masked mode
        self.streak = 0
        self.show = False  # whether the loop shows a progress bar (it then wants the smallest step size)
        self.counts = run.count_per_sample
        self.pi = run.controller.beta != 0  # only a PI controller reads the previous error
        self.hold = run.controller.hold_after_reject  # per-sample "previous attempt rejected" flags
        self.rejected_last = torch.zeros(B, device=dev, dtype=torch.bool)
        # remaining time t_end - t, signed so that it is positive, in one operation
        self.toward = torch.sub if direction_is_up(t_start, t_end) else torch.rsub

    def attempt(self, k: int) -> tuple[int, int, bool, float, float | None, float]:
        run, step, idx = self.run, self.step, self.idx
        x, nd = self.x, self.x.ndim
        up = self.direction > 0
        z = self.draw(k) if self.draw is not None else None
        sel = (lambda v: v) if idx is None else (lambda v: v[idx])  # noqa: E731
        xa, ta, ha, fa = sel(x), sel(self.t), sel(self.h), sel(self.t_fin)
        live = None if run.compact else self.active
        if live is not None:
            ha = torch.where(live, ha, torch.zeros_like(ha))
        dw = None
        if self.stack is not None:
            ha, dw = self.stack.take(self.all_idx if idx is None else idx, ha, sel(z))
        remaining = self.toward(fa, ta)
        ha = torch.minimum(ha, remaining)
        last = (remaining - ha) <= self.tiny
        t1 = torch.where(last, fa, ta + ha if up else ta - ha)
        sa = self.term.drift(xa, ta) if self.state_k is None else sel(self.state_k)
        x_prop, err, st = step.step(self.term, xa, ta, t1, sa, dw)
        err = err if step.per_sample else err.expand(xa.shape[0])
        finite = torch.isfinite(err)
        ok = err <= 1.0
        if live is not None:
            ok = ok & live
        prev = sel(self.prev_err) if self.pi else None
        held = sel(self.rejected_last) if self.hold else False
        fac = run.controller.factor(err, prev, run.q, ok, alpha=run.alpha, after_reject=held)
        t_new = torch.where(ok, t1, ta)
        h_new = torch.minimum(ha * fac, self.toward(fa, t_new))
        okb = append_dims(ok, nd)
        x_new = torch.where(okb, x_prop, xa)
        st_new = None if st is None else torch.where(okb, st, sa)
        if run.nonfinite_streak is None:
            nf_new = ~finite
            bad = nf_new & ~torch.isfinite(sa.reshape(sa.shape[0], -1)).all(1)
        else:  # the streak rule alone decides
            nf_new = bad = None
        if live is not None:
            h_new = torch.where(live, h_new, ha)
            if nf_new is not None:
                nf_new = torch.where(live, nf_new, sel(self.nonfinite_rej))
                bad = bad & live
        if idx is None:
            self.x, self.t, self.h, self.state_k = x_new, t_new, h_new, st_new
            if run.nonfinite_streak is None:
                self.nonfinite_rej = nf_new
        else:
            self.x, self.t, self.h = x.index_copy(0, idx, x_new), self.t.index_copy(0, idx, t_new), \
                self.h.index_copy(0, idx, h_new)
            if run.nonfinite_streak is None:
                self.nonfinite_rej = self.nonfinite_rej.index_copy(0, idx, nf_new)
            if st_new is not None:
                self.state_k = self.state_k.index_copy(0, idx, st_new)
        if self.hold:
            rej_new = ~ok if live is None else torch.where(live, ~ok, held)
            self.rejected_last = rej_new if idx is None else self.rejected_last.index_copy(0, idx, rej_new)
        if self.pi:
            err_new = torch.where(ok, err, prev)
            self.prev_err = err_new if idx is None else self.prev_err.index_copy(0, idx, err_new)
        if self.counts:
            rej = ~ok if live is None else live & ~ok
            if idx is None:
                self.n_acc += ok
                self.n_rej += rej
            else:
                self.n_acc.index_add_(0, idx, ok.long())
                self.n_rej.index_add_(0, idx, rej.long())
        t, h = self.t, self.h
        running = self.toward(self.t_fin, t) > self.tiny
        if live is not None:
            self.active = running
        floor = (run.h_min if run.h_min is not None
                 else self.eps16 * torch.maximum(t.abs(), self.t_fin.abs()).clamp_min(1.0))
        under = (h < floor) & running
        fd = t.dtype
        # The single host read of this attempt: every count and flag the control flow needs.
        vals = [ok.sum(dtype=fd), finite.sum(dtype=fd), running.sum(dtype=fd), under.sum(dtype=fd),
                t.min() if up else t.max(), t[0]]
        if live is not None:
            vals.append(live.sum(dtype=fd))
        if bad is not None:
            vals.append(bad.sum(dtype=fd))
        if self.show:
            vals.append(torch.where(running, h, torch.full_like(h, math.inf)).min())
        flags = torch.stack(vals).tolist()
        n_ok, n_finite, n_run, n_under = (int(v) for v in flags[:4])
        n_att = int(flags[6]) if live is not None else ok.numel()
        n_bad = int(flags[6 + (live is not None)]) if bad is not None else 0
        self.streak = self.streak + 1 if n_finite < err.numel() else 0
        if n_bad or (run.nonfinite_streak is not None and self.streak >= run.nonfinite_streak):
            self._nonfinite(k, n_bad, bad, finite, sa, x_prop, ta)
        if n_under:
            self._underflow(under, k)
        if self.stack is not None and n_ok < ok.numel():
            self.stack.push(self.all_idx if idx is None else idx, ~ok, ha, dw)
        if run.compact and step.per_sample and 0 < n_run < x.shape[0]:
            self.idx = running.nonzero().squeeze(1)
        t_least = self.t_end if not n_run else flags[4]
        return n_ok, n_att - n_ok, n_run > 0, t_least, flags[-1] if self.show else None, flags[5]

    def _step_count(self, i: int, k: int) -> int:
        """Sample ``i``'s accepted steps (or the attempt ``k`` where they are not counted); error path only."""
        return int(self.n_acc[i]) if self.counts else k

    def _nonfinite(self, k, n_bad, bad, finite, sa, x_prop, ta):
        """Error path only. A batched step has one norm: the sample named is the first whose own
        derivative or proposal is non-finite."""
        j = int(torch.nonzero(bad)[0]) if n_bad else first_bad_sample(sa, x_prop)
        j = j if j is not None else int(torch.nonzero(~finite)[0])
        i = j if self.idx is None else int(self.idx[j])
        t_bad = float(ta[j])
        x_t = None if self.step.per_sample else t_bad
        if n_bad:
            n = self._step_count(i, k)
            raise NonFiniteError(f"{self.run.name}: fn returned non-finite values for sample {i} at t={t_bad:.6g} "
                                 f"(its step {n})", step=n, t=t_bad, x=self.x, sample=i, x_t=x_t)
        raise NonFiniteError(f"{self.run.name}: the proposal for sample {i} stayed non-finite for {self.streak} "
                             f"shrinking steps at t={t_bad:.6g} (attempt {k}); the score function likely returns "
                             "NaN/inf there", step=k, t=t_bad, x=self.x, sample=i, x_t=x_t)

    def _underflow(self, under, k):
        """Error path only: the first sample whose step size fell below the minimum."""
        run, per_sample = self.run, self.step.per_sample
        i = int(torch.nonzero(under)[0])
        ti, hi = float(self.t[i]), float(self.h[i])
        n = self._step_count(i, k)
        if bool(self.nonfinite_rej[i]):
            raise NonFiniteError(f"{run.name}: fn returned non-finite values for sample {i} just after t={ti:.6g} "
                                 f"(its step {n}; the step size shrank to {hi:.3g} without avoiding them)", step=n,
                                 t=ti, x=self.x, sample=i, x_t=None if per_sample else ti)
        floor = f"h_min={run.h_min}" if run.h_min is not None else "16 eps relative to t"
        raise StepSizeError(f"{run.name}: step size underflow for sample {i} at t={ti:.6g}: {hi:.3g} below {floor} "
                            f"(rtol={self.step.rtol}, atol={self.step.atol}); the problem is too stiff for the "
                            "tolerances, or the score blows up", t=self.t.clone() if per_sample else ti,
                            dt=(self.direction * self.h).clone() if per_sample else self.direction * hi, x=self.x,
                            steps=k + 1)

    def max_steps_error(self, max_steps: int) -> StepSizeError:
        per_sample = self.step.per_sample
        running = self.toward(self.t_fin, self.t) > self.tiny  # error path only
        return StepSizeError(f"{self.run.name}: max_steps={max_steps} exceeded; {int(running.sum())} samples did not "
                             f"reach t={self.t_end}", t=self.t.clone() if per_sample else float(self.t[0]),
                             dt=(self.direction * self.h).clone() if per_sample else self.direction * float(self.h[0]),
                             x=self.x, steps=max_steps)

    def per_sample_stats(self) -> dict:
        if not self.counts:
            return {}
        return {"accepted_per_sample": self.n_acc.to("cpu"), "rejected_per_sample": self.n_rej.to("cpu")}

    def state(self) -> Tensor:
        return self.x
