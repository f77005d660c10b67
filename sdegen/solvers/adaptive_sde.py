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

**Implementation.** The pair is data: the tableau `sdegen.solvers.tableaus.EM_HEUN` ($c = (0, 1)$,
$a_{21} = 1$, $b = (\tfrac12, \tfrac12)$, $\hat b = (1, 0)$) run by the explicit-RK core with additive
noise (`sdegen.solvers.explicit_rk.EulerHeun`: with the signed step $\Delta t = -h$ its stage-2 input
is $x'$, its solution $x''$, its error $x'' - x'$ and its declared norm the mixed max above), and the
accept/reject loop, the I controller and the bridge stack are the one adaptive loop's
(`sdegen.solvers.loop.integrate_adaptive`), shared with ``rk45``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .._utils import check_positive
from .loop import AdaptiveRun, integrate_adaptive
from .base import Dynamics, StepSizeError, check_finite_state  # noqa: F401 (StepSizeError: documented here)
from .controllers import PIController
from .explicit_rk import EulerHeun

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
                            beta=0.0, reject_max=max(min(self.safety, 1.0), self.min_factor),
                            hold_after_reject=False)  # Alg. 1 of the paper has no such rule

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
    kw = dict(device=x.device, dtype=x.dtype)
    h = torch.full((x.shape[0],), min(opts.h_init, t_start - t_end), **kw)
    if noise is not None:
        draw = lambda k: noise(k).to(**kw)  # noqa: E731
    else:
        draw = lambda k: torch.randn(x.shape, generator=generator, **kw)  # noqa: E731
    run = AdaptiveRun(controller=opts.controller(), alpha=opts.exponent, max_steps=opts.max_steps, h_min=opts.h_min,
                      compact=True, nonfinite_streak=3, count_per_sample=False, name="adaptive_sde")
    step = EulerHeun(rtol=opts.rtol, atol=opts.atol, per_sample=opts.per_sample)
    x, stats, traj = integrate_adaptive(step, _ReverseTerm(dyn), x, float(t_start), float(t_end), h, run, draw=draw,
                                        progress=progress, record_every=record_every)
    return x, stats, traj


class _ReverseTerm:
    """The reverse SDE as the core's term: drift $f - g^2 s_\theta$, diffusion $g(t)$."""

    __slots__ = ("drift", "diffusion")

    def __init__(self, dyn: Dynamics):
        self.drift, self.diffusion = dyn.reverse_drift, dyn.diffusion


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
