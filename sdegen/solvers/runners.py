r"""Runners and builders of [`sdegen.sample`][sdegen.sampling.sample] other than the generic fixed-grid rules.

The ancestral step's builder (the DDPM chain on a VPSDE, a chain SDE's own plan, the posterior step
otherwise), the adaptive probability-flow backends and torchsde. ``ctx`` is a
`sdegen.sampling.RunContext`. Split from ``sampling.py`` (issue 15: no package file over 600 lines).
Forward time runs from 0 (data) to ``T``; samplers integrate from ``t_start`` down to ``eps``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping

import torch
from torch import Tensor

from .._utils import check_positive
from ..sdes import VPSDE
from ..sdes.discrete import AbstractChainSDE
from .sde_steps import Ancestral, ChainStep, ancestral_table, chain_table, ddpm_ancestral_table


def _build_ancestral(ctx, opts: dict) -> Ancestral:
    r"""VPSDE: the DDPM chain of ``vp.discretize(N)`` on $t_i = iT/N$ (``eps`` ignored); other affine SDEs:
    the Tweedie posterior step on the grid to ``eps`` (uniform unless ``grid=`` is given to ``pc``)."""
    sde = ctx.dyn.affine
    eta = opts.get("eta")
    grid = opts.get("grid", "uniform")
    if isinstance(sde, AbstractChainSDE) and not ctx.steps_given and isinstance(grid, str) and grid == "uniform":
        # The chain's own sampler (e.g. the diffusers scheduler the adapter read): its steps, its
        # final step (no extra denoising), its noise and its eta unless eta= is given.
        plan = sde.plan
        eta = plan.eta if eta is None else check_positive(eta, "eta", allow_zero=True)
        if opts.get("variance") is not None:
            if opts["variance"] not in ("posterior", "beta"):
                raise ValueError(f"variance must be 'posterior' (DDPM's beta-tilde) or 'beta', got {opts['variance']!r}")
            plan = replace(plan, variance=opts["variance"])
        ctx.times = plan.times(sde.alpha_bar.numel() - 1, sde.T)
        ctx.steps = len(plan.steps)
        ctx.own_final_step = True
        if plan.x0_transform is not None or plan.variance.startswith("learned") or \
                float(sde.alpha_bar[plan.steps[0]]) == 0.0:
            return ChainStep.from_plan(sde, plan, eta, ctx.times)
        return Ancestral(chain_table(sde, plan, eta, ctx.times))
    if eta is not None or opts.get("variance") is not None:
        name, value = ("eta", eta) if eta is not None else ("variance", opts["variance"])
        raise ValueError(f"{name}={value!r} applies to the ancestral step on a chain SDE's own plan (e.g. an SDE "
                         "from sdegen.adapters.from_diffusers or from_discrete_eps, without steps=); here the step is "
                         "the posterior (eta = 1)")
    if isinstance(sde, VPSDE):
        grid = opts.get("grid", "uniform")
        if not (isinstance(grid, str) and grid == "uniform"):
            raise ValueError("the ancestral step on a VPSDE is the DDPM chain on its own grid t_i = iT/N; "
                             f"grid={grid!r} does not apply (use predictor='reverse_diffusion' for other grids)")
        n = ctx.steps
        if ctx.t_start < sde.T:
            # Part-way on the chain: steps = N is the chain's length (as DDPM img2img: strength x N
            # steps), and the run starts at its step k with t_k = k T / N = t_start.
            k = round(n * ctx.t_start / sde.T)
            if k < 1 or abs(k * sde.T / n - ctx.t_start) > 1e-9 * sde.T:
                raise ValueError(f"method 'ancestral' on a VPSDE runs the DDPM chain of steps={n} on t_i = iT/N; "
                                 f"t_start={ctx.t_start:.6g} is not on it (nearest: {max(k, 1) * sde.T / n:.6g}); "
                                 "choose t_start (or strength) and steps with strength * steps an integer")
            ab = _ddpm_alphas_cumprod(sde, n).reshape(-1)
            ab = ab[1:] if ab.numel() == n + 1 else ab        # abar_1 .. abar_N
            ctx.times = torch.arange(k, -1, -1, dtype=torch.float64) * (sde.T / n)
            ctx.steps = k
            return Ancestral(ddpm_ancestral_table(ab[:k], ctx.times))
        ctx.times = torch.arange(n, -1, -1, dtype=torch.float64) * (sde.T / n)
        return Ancestral(ddpm_ancestral_table(_ddpm_alphas_cumprod(sde, n), ctx.times))
    return Ancestral(ancestral_table(sde, ctx.times))


def _ddpm_alphas_cumprod(vp: VPSDE, n: int) -> Tensor:
    r"""$\bar\alpha_i$ of ``vp.discretize(n)``, with the step-count error phrased for the ancestral method."""
    try:
        return vp.discretize(n).alphas_cumprod
    except ValueError as err:
        raise ValueError(f"method 'ancestral' on a VPSDE runs the DDPM chain vp.discretize(steps), which needs "
                         f"steps > beta_max * T = {vp.beta_max * vp.T:g}; got steps={n} ({err})") from None


def _adaptive_ode_runner(integrator):
    """Runner for an adaptive probability-flow ODE integrator, an entry of
    `sdegen.solvers.ode_integrators.ODE_INTEGRATORS` (``integrator.integrate(ode_drift, y0, t0, t1, **opts)``)."""

    def run(ctx, **opts):
        y, stats, traj = integrator.integrate(ctx.dyn.ode_drift, ctx.x, ctx.t_start, ctx.eps, progress=ctx.progress,
                                              record_every=ctx.record_every, **opts)
        return y, traj, _times_from(stats, traj, ctx), dict(stats)

    return run


def _run_torchsde(ctx, **opts):
    fn = _backend("sdegen.solvers.backends", "torchsde_integrate")()
    generator = ctx.generator
    if ctx.noise is not None:
        # torchsde draws its own Brownian path from one seed; with per-sample seeds, derive that seed
        # from the seeded noise so that the same seeds give the same samples (one host read). The path
        # is shared by the batch, so torchsde samples stay repeatable but not batch-invariant.
        z = ctx.noise(0).reshape(-1)[:64].to("cpu", torch.float64)
        generator = torch.Generator().manual_seed(int((z * 1e6).round().abs().sum().item()) % 2**62)
    y, stats = fn(ctx.dyn.reverse_drift, ctx.dyn.diffusion, ctx.x, ctx.t_start, ctx.eps, steps=ctx.steps,
                  generator=generator, **opts)
    return y, None, _times_from(stats, None, ctx), dict(stats)


def _times_from(stats: Mapping, traj, ctx) -> Tensor:
    if isinstance(stats, Mapping) and isinstance(stats.get("times"), Tensor):
        return stats["times"].detach().to("cpu", torch.float64)
    if traj:
        return torch.tensor([t for t, _ in traj], dtype=torch.float64)
    return torch.tensor([ctx.t_start, ctx.eps], dtype=torch.float64)


def _backend(module: str, name: str) -> Callable[[], Callable]:
    def get():
        from importlib import import_module

        return getattr(import_module(module), name)

    return get
