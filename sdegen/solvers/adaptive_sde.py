r"""Adaptive-step reverse-SDE solver of Jolicoeur-Martineau et al. (2021), "Gotta Go Fast", Alg. 1.

The reverse SDE in forward time $t$ run downwards (Song et al. 2021, eq. 6), with $h > 0$ the step
and $F(x, t) = f(x, t) - g(t)^2 \nabla_x \log p_t(x)$:

$$x' = x - h F(x, t) + g(t)\,\Delta W, \qquad
  \tilde x = x - h F(x', t - h) + g(t - h)\,\Delta W, \qquad x'' = \tfrac12 (x' + \tilde x),$$

an Euler–Maruyama step $x'$ and an improved-Euler (stochastic Heun) step $x''$ sharing one
Brownian increment $\Delta W \sim \mathcal N(0, h I)$. Their difference estimates the local error,
scaled by a mixed tolerance

$$\delta = \max\big(\text{atol},\ \text{rtol}\cdot\max(|x'|, |x|)\big), \qquad
  E = \Big\| \frac{x' - x''}{\delta} \Big\|_2 \Big/ \sqrt{n}$$

(elementwise $\delta$; $n$ the number of entries: of one sample with ``per_sample=True``, of the
whole batch otherwise, as in the paper). The step is accepted if $E \le 1$ (the state becomes $x''$)
and the next step is $h \leftarrow \min\big(t - \epsilon,\ h\cdot\mathrm{clip}(\theta E^{-r}, f_\min, f_\max)\big)$
(paper: $\theta = 0.9$, $r = 0.9$). Two score evaluations per attempted step.

**Brownian path.** A rejected step's increment is not thrown away: redrawing it would bias the
samples towards increments that happen to give small errors. It is kept on a per-sample stack and the
next, shorter attempt takes its part by the Brownian bridge,
$\Delta W_{h'} \mid \Delta W_h \sim \mathcal N\big(\tfrac{h'}{h}\Delta W_h,\ \tfrac{h'(h - h')}{h} I\big)$, the
remainder staying on the stack for the following steps (Rackauckas & Nie 2017, "RSwM1"). The path
is therefore one Brownian motion whatever the step sequence, and the solver converges strongly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .._utils import append_dims, check_positive
from .base import Dynamics, NonFiniteError, StepSizeError, check_finite_state, progress_bar
from .brownian import BrownianBridgeStack
from .controllers import PIController

__all__ = ["AdaptiveSDE", "adaptive_sde_integrate"]


@dataclass(frozen=True)
class AdaptiveSDE:
    r"""Options of the adaptive EM / improved-Euler pair (see the module docstring for the rule).

    Args:
        rtol (float): relative tolerance of the mixed error scale $\delta$.
        atol (float): absolute tolerance of the mixed error scale $\delta$.
        h_init: first step size (paper: 0.01 for $T = 1$).
        safety: $\theta$ in $\theta E^{-r}$.
        exponent: $r$ (1/2 is classical for a local error of order 3/2; the paper prefers 0.9).
        min_factor (float): lower bound on the step-size change per attempt.
        max_factor (float): upper bound on the step-size change per attempt.
        per_sample: one step size per sample (a stiff sample does not slow the others; each score
            call then sees only the samples still running).
        max_steps: at most this many attempted steps (then [`StepSizeError`][sdegen.solvers.adaptive_sde.StepSizeError]).
        h_min: smallest step size before [`StepSizeError`][sdegen.solvers.adaptive_sde.StepSizeError].

    Class attributes: ``order = 1.0`` (strong order of the accepted improved-Euler update for
    additive noise); ``stochastic = True``.
    """

    rtol: float = 1e-2
    atol: float = 1e-2
    h_init: float = 1e-2
    safety: float = 0.9
    exponent: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    per_sample: bool = False
    max_steps: int = 100_000
    h_min: float = 1e-10

    order = 1.0
    stochastic = True
    evals_per_step = 2

    def controller(self) -> PIController:
        r"""The step-size controller: an I controller ($\beta = 0$) capped at ``safety`` after a rejection."""
        return PIController(safety=min(self.safety, 1.0), min_factor=self.min_factor, max_factor=self.max_factor,
                            beta=0.0, reject_max=max(min(self.safety, 1.0), self.min_factor))

    def __post_init__(self):
        for name in ("rtol", "atol", "h_init", "safety", "exponent", "min_factor", "max_factor", "h_min"):
            check_positive(getattr(self, name), name)
        if not self.min_factor < 1.0 < self.max_factor:
            raise ValueError(f"need min_factor < 1 < max_factor, got {self.min_factor}, {self.max_factor}")
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {self.max_steps!r}")
        if not isinstance(self.per_sample, bool):
            raise TypeError(f"per_sample must be a bool, got {self.per_sample!r}")


def adaptive_sde_integrate(
    opts: AdaptiveSDE,
    dyn: Dynamics,
    x: Tensor,
    t_start: float,
    t_end: float,
    *,
    generator: torch.Generator | None = None,
    noise: Callable[[int], Tensor] | None = None,
    progress: bool = False,
    record_every: int | None = None,
) -> tuple[Tensor, dict, list[tuple[float, Tensor]] | None]:
    r"""Integrate the reverse SDE from ``t_start`` down to ``t_end`` with adaptive steps.

    Args:
        opts: the solver options ([`AdaptiveSDE`][sdegen.solvers.adaptive_sde.AdaptiveSDE]).
        dyn: the SDE and the counted score.
        x: ``(B, *D)`` state at ``t_start``.
        t_start (float): start time, ``t_start > t_end``.
        t_end (float): end time, ``t_end > 0``.
        generator: source of the unit Gaussian draws (one ``x``-shaped draw per attempt).
        noise: optional ``noise(k)``: the k-th unit draw shaped like ``x`` (per-sample seeds); replaces
            ``generator``.
        progress: tqdm bar over time.
        record_every: keep every k-th accepted state (time = the least advanced sample's time).

    Returns:
        ``(x, stats, trajectory)``; ``stats`` has ``accepted``, ``rejected`` (attempts summed over
        samples in per-sample mode, over steps otherwise), ``attempts`` (loop iterations) and
        ``times`` (accepted times; ``[t_start, t_end]`` in per-sample mode).

    Raises:
        StepSizeError: a step size fell below ``h_min`` or ``max_steps`` attempts did not reach ``t_end``.
    """
    if not t_start > t_end > 0:
        raise ValueError(f"need t_start > t_end > 0, got t_start={t_start}, t_end={t_end}")
    check_finite_state(x, "x (the start state)")
    B, nd = x.shape[0], x.ndim
    kw = dict(device=x.device, dtype=x.dtype)
    t = torch.full((B,), float(t_start), **kw)
    h = torch.full((B,), min(opts.h_init, t_start - t_end), **kw)
    stack = BrownianBridgeStack(x)
    n_per = x[0].numel()
    accepted = rejected = advanced = 0
    times = [float(t_start)]
    traj = [(float(t_start), x.detach().clone())] if record_every else None
    bar = progress_bar(progress, t_start - t_end, "adaptive_sde")
    ctrl = opts.controller()
    all_idx = torch.arange(B, device=x.device)
    idx = None  # the running samples; None = all of them (no gathers on the common path)
    # A sample is done when it reaches t_end; steps that would land within this gap land on t_end.
    tiny = 1e-12 * max(1.0, abs(t_start))
    bad_streak = 0
    for k in range(opts.max_steps):
        z = noise(k).to(**kw) if noise is not None else torch.randn(x.shape, generator=generator, **kw)
        sel = (lambda v: v) if idx is None else (lambda v: v[idx])  # noqa: E731
        xa, ta = sel(x), sel(t)
        ha, dw = stack.take(all_idx if idx is None else idx, sel(h), sel(z))
        g0 = append_dims(dyn.diffusion(ta), nd)
        t1 = torch.where(ta - ha - t_end <= tiny, torch.full_like(ta, t_end), ta - ha)
        hh = append_dims(ta - t1, nd)
        x_em = xa - hh * dyn.reverse_drift(xa, ta) + g0 * dw
        x_tl = xa - hh * dyn.reverse_drift(x_em, t1) + append_dims(dyn.diffusion(t1), nd) * dw
        x_ie = 0.5 * (x_em + x_tl)
        scale = torch.maximum(xa.abs(), x_em.abs()).mul(opts.rtol).clamp_min(opts.atol)
        err2 = ((x_em - x_ie) / scale).square().reshape(xa.shape[0], -1).sum(1)
        if opts.per_sample:
            err = (err2 / n_per).sqrt()
        else:
            err = (err2.sum() / (n_per * xa.shape[0])).sqrt().expand(xa.shape[0])
        ok = err <= 1.0
        # A non-finite proposal is rejected like any other (and shrinks the step by min_factor; a NaN
        # factor would make NaN times); if it stays non-finite while the step shrinks, the score itself
        # is NaN/inf there: stop with the sample and time instead of crawling on.
        finite = torch.isfinite(err)
        # Next step: the I controller (beta = 0) with the paper's exponent, bounded; after a rejection
        # it grows by at most `safety` (err = inf or NaN gives min_factor).
        fac = ctrl.factor(err, None, 0, ok, alpha=opts.exponent)
        t_new = torch.where(ok, t1, ta)
        h_new = torch.minimum(ha * fac, t_new - t_end)
        x_new = torch.where(append_dims(ok, nd), x_ie, xa)
        if idx is None:
            x_prev, x, t, h = x, x_new, t_new, h_new
        else:
            x_prev = x
            x, t, h = x.index_copy(0, idx, x_new), t.index_copy(0, idx, t_new), h.index_copy(0, idx, h_new)
        running = t - t_end > tiny
        # The single host read of this attempt: every count and flag the control flow needs.
        fd = t.dtype
        flags = torch.stack([ok.sum(dtype=fd), finite.sum(dtype=fd), running.sum(dtype=fd),
                             (h < opts.h_min).logical_and_(running).sum(dtype=fd), t[0]]).tolist()
        n_ok, n_bad, n_run = int(flags[0]), ok.numel() - int(flags[1]), int(flags[2])
        if n_bad:
            bad_streak += 1
            if bad_streak >= 3:
                # Error path only. Batched mode spreads one error norm over the batch: the sample is
                # the first whose own error sum is non-finite.
                nonfinite = ~finite
                own = nonfinite & ~torch.isfinite(err2)
                j = int(torch.nonzero(own if bool(own.any()) else nonfinite)[0])
                i = j if idx is None else int(idx[j])
                t_bad = float(ta[j])
                raise NonFiniteError(f"adaptive_sde: the proposal for sample {i} stayed non-finite for {bad_streak} "
                                     f"shrinking steps at t={t_bad:.6g} (attempt {k}); the score function likely "
                                     "returns NaN/inf there", step=k, t=t_bad, x=x_prev, sample=i,
                                     x_t=t_bad if not opts.per_sample else None)
        else:
            bad_streak = 0
        if n_ok < ok.numel():
            stack.push(all_idx if idx is None else idx, ~ok, ha, dw)
        accepted += n_ok
        rejected += ok.numel() - n_ok
        if bar is not None:
            bar.n = float(t_start - t.max())
            bar.set_postfix(t=f"{float(t.max()):.4f}", h=f"{float(h.max()):.2e}", refresh=False)
            bar.update(0)
        if not opts.per_sample and n_ok:
            times.append(flags[4])
        advanced += n_ok > 0
        if traj is not None and n_ok and advanced % record_every == 0:
            traj.append((float(t.max()), x.detach().clone()))
        if n_run == 0:
            break
        if opts.per_sample and n_run < B:
            idx = running.nonzero().squeeze(1)
        if flags[3]:
            h_run = torch.where(running, h, torch.full_like(h, math.inf))  # error path only
            bad = int(h_run.argmin())
            t_bad = float(t[bad])
            raise StepSizeError(f"adaptive_sde: step size {float(h_run[bad]):.3g} below h_min={opts.h_min} for "
                                f"sample {bad} at t={t_bad:.6g} (rtol={opts.rtol}, atol={opts.atol}); loosen the "
                                "tolerances or check the score for blow-ups", t=t_bad,
                                dt=float(h_run[bad]), x=x, steps=k + 1)
    else:
        raise StepSizeError(f"adaptive_sde: max_steps={opts.max_steps} attempts did not reach t={t_end} "
                            f"(latest sample at t={float(t.max()):.6g})", t=float(t.max()),
                            dt=float(h.max()), x=x, steps=opts.max_steps)
    if bar is not None:
        bar.close()
    if opts.per_sample:
        times = [float(t_start), float(t_end)]
    stats = {"accepted": accepted, "rejected": rejected, "attempts": k + 1,
             "times": torch.tensor(times, dtype=torch.float64)}
    return x, stats, traj


def run_adaptive_sde(ctx, **opts):
    r"""``sdegen.sample(method="adaptive_sde")`` runner: ``(x, trajectory, times, stats)``.

    ``ctx``: a `sdegen.sampling.RunContext`; ``opts``: the fields of [`AdaptiveSDE`][sdegen.solvers.adaptive_sde.AdaptiveSDE]."""
    solver = AdaptiveSDE(**opts)
    noise = None
    if ctx.noise is not None:
        noise = ctx.noise  # per-sample seeds: the k-th attempt's unit draws
    x, stats, traj = adaptive_sde_integrate(solver, ctx.dyn, ctx.x, ctx.t_start, ctx.eps, generator=ctx.generator,
                                            noise=noise, progress=ctx.progress, record_every=ctx.record_every)
    times = stats.pop("times")
    return x, traj, times, stats


#: ``sdegen.sample(method="adaptive_sde")`` options and defaults.
ADAPTIVE_SDE_OPTIONS = {"rtol": 1e-2, "atol": 1e-2, "per_sample": False, "max_steps": 100_000, "h_init": 1e-2,
                        "safety": 0.9, "exponent": 0.9}
