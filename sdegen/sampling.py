r"""``sdegen.sample``: one entry point for every sampler, driven by the explicit [`METHODS`][sdegen.sampling.METHODS] table.

Forward time runs from 0 (data) to ``sde.T`` (noise); every sampler starts from the prior at ``T``
and integrates *down* to ``eps`` (the truncation time, default ``1e-3``), either the reverse-time SDE

$$dx = [f(x,t) - g(t)^2 \nabla_x \log p_t(x)]\,dt + g(t)\,d\bar w \qquad \text{(Song et al. 2021, eq. 6)}$$

or the probability-flow ODE $dx/dt = f(x,t) - \tfrac12 g(t)^2 \nabla_x \log p_t(x)$ (eq. 13). Fixed-grid
methods use the uniform grid $t_k = T - k (T - \epsilon)/N$, $k = 0..N$ (``N = steps``) unless given
``grid=`` (a name of `sdegen.grids.GRIDS` or a tensor of times), and the one loop
[`integrate_fixed_grid`][sdegen.solvers.base.integrate_fixed_grid]. Reverse-SDE methods end with one Tweedie denoising
step $\hat x_0 = (x + s(\epsilon)^2 \nabla\log p_\epsilon(x))/m(\epsilon)$ (``denoise=True``, one more score
evaluation, counted in ``nfe``).

Adding a method is one entry in [`METHODS`][sdegen.sampling.METHODS]: a `MethodSpec` with the runner, its options
and their defaults.
"""

from __future__ import annotations

import functools
import math
import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ._utils import check_positive
from .sdes import SDE, AffineSDE, VPSDE
from .grids import get_grid, sampling_start, user_grid
from .solvers.base import AbstractFixedGridSolver, CountingScore, Dynamics, NonFiniteError, SampleResult, \
    check_finite_state, integrate_fixed_grid
from .solvers.correctors import (AnnealedLangevinCorrector, BatchLangevinCorrector, LangevinCorrector,
                                  PredictorCorrector, langevin_alpha)
from .solvers.ode_steps import ODEEuler, ODEHeun
from .solvers.sde_steps import Ancestral, ChainStep, EulerMaruyama, ReverseDiffusion, ancestral_table, chain_table, \
    ddpm_ancestral_table
from .sdes.discrete import AbstractChainSDE
from .solvers.adaptive_sde import ADAPTIVE_SDE_OPTIONS, run_adaptive_sde
from .solvers.dpm_solver import DPM_SOLVER_OPTIONS, build_dpm_solver
from .solvers.edm import HEUN_KARRAS_OPTIONS, build_heun_karras
from .solvers.sde_dpm import SDE_DPM_OPTIONS, build_sde_dpm_solver
from .solvers.dpm_single import DPM_FAST_OPTIONS, DPM_SINGLESTEP_OPTIONS, build_dpm_fast, build_dpm_singlestep
from .solvers.restart import RESTART_OPTIONS, build_restart
from .solvers.sa_solver import SA_SOLVER_OPTIONS, build_sa_solver
from .solvers.ancestral_k import DPM2_OPTIONS, EULER_ANCESTRAL_OPTIONS, build_dpm2, build_euler_ancestral
from .solvers.unipc import UNIPC_OPTIONS, build_unipc
from .solvers.deis import DEIS_OPTIONS, build_deis
from .solvers.multistep import IPNDM_OPTIONS, LMS_OPTIONS, PNDM_OPTIONS, build_ipndm, build_lms, build_pndm

__all__ = ["sample", "METHODS", "MethodSpec", "RunContext"]


# ---------------------------------------------------------------------------------------------- plumbing
@dataclass
class RunContext:
    r"""Everything a method runner needs (built and validated by [`sample`][sdegen.sampling.sample]).

    Attributes:
        sde: the forward SDE.
        dyn: the SDE with the *counted* score ([`Dynamics`][sdegen.sampling.Dynamics]).
        x: ``(B, *D)`` start state $x_T$.
        eps: final time.
        steps: step count (``None`` for adaptive methods).
        generator: source of the random draws.
        noise: a per-sample noise object or ``None``.
        progress: show a tqdm bar.
        record_every: keep every k-th state (``None``: no trajectory).
        times: the decreasing float64 grid of fixed-grid methods; a builder may replace it.
        method: the method name (progress-bar label).
        steps_given: whether the caller passed ``steps=`` (else a chain SDE's own plan may apply).
        own_final_step: set by a builder whose grid ends with the model's own final step (a chain
            plan), so ``denoise`` defaults to ``False``.
        t_start: the time of ``x`` and the start of every grid (``sde.T``, or earlier for an
            img2img/SDEdit run; ``None`` read as ``sde.T``).
    """

    sde: SDE
    dyn: Dynamics
    x: Tensor
    eps: float
    steps: int | None
    generator: torch.Generator | None
    noise: Any
    progress: bool
    record_every: int | None
    method: str
    times: Tensor | None = None
    steps_given: bool = True
    own_final_step: bool = False
    t_start: float | None = None

    def __post_init__(self):
        if self.t_start is None:
            self.t_start = float(self.sde.T)

    def unit_draw(self) -> Callable[[int], Tensor]:
        """``draw(k)``: the k-th extra unit Gaussian shaped like ``x`` (for correctors)."""
        x = self.x
        if self.noise is not None:
            offset = self.steps or 0
            # Per-sample noise objects are indexed by draw number; corrector draws come after the
            # loop's ``steps`` predictor draws so the two streams never overlap.
            return lambda k: self.noise(offset + k).to(device=x.device, dtype=x.dtype)
        return lambda k: torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)


@functools.lru_cache(maxsize=None)
def _signature_params(fn: Callable) -> tuple[inspect.Parameter, ...]:
    """``fn``'s parameters, read once (``inspect.signature`` costs ~50 µs, paid on every ``sample`` call)."""
    return tuple(inspect.signature(fn).parameters.values())


@dataclass(frozen=True)
class MethodSpec:
    r"""One sampling method: how to run it and which options it takes.

    Attributes:
        run: ``run(ctx, **options) -> (x, trajectory | None, times | None, stats)``.
        options: allowed keyword options and their defaults.
        reverse_sde: whether it samples the reverse SDE (then ``denoise`` defaults to ``True``).
        fixed_grid: whether ``steps`` applies (else passing ``steps`` is an error).
        default_steps: ``steps`` when not given (fixed-grid methods).
        backend: for adapters, a zero-argument callable returning the backend function whose keyword
            parameters are further allowed options (imported lazily: optional dependencies).
        doc: one line for error messages and docs.
    """

    run: Callable[..., tuple]
    options: Mapping[str, Any] = field(default_factory=dict)
    reverse_sde: bool = False
    fixed_grid: bool = True
    default_steps: int | None = 1000
    backend: Callable[[], Callable] | None = None
    doc: str = ""

    def allowed_options(self) -> dict[str, Any]:
        """The options this method accepts (``denoise`` included) with defaults; ``...`` = backend default."""
        allowed = {"denoise": None, **self.options}
        if self.backend is not None:
            for p in _signature_params(self.backend()):
                if p.kind == p.KEYWORD_ONLY and p.name not in _RUNNER_OWNED and p.name not in allowed:
                    allowed[p.name] = p.default
        return allowed

    def accepts_any(self) -> bool:
        """True when the backend function takes ``**kwargs`` (it validates those itself)."""
        if self.backend is None:
            return False
        return any(p.kind == p.VAR_KEYWORD for p in _signature_params(self.backend()))


# Keyword parameters of backend functions that the runners set themselves.
_RUNNER_OWNED = frozenset({"progress", "record_every", "generator", "steps"})


def _fixed_grid_runner(build: Callable[[RunContext, dict], AbstractFixedGridSolver], *, grid_option: bool = False):
    """A runner that builds a fixed-grid solver and drives it with the one loop. With ``grid_option`` the
    method's ``grid`` option (a name of `sdegen.grids.GRIDS` or a user tensor of times) sets
    ``ctx.times`` before the build (heun_karras and dpm_solver read their grid options themselves)."""

    def run(ctx: RunContext, **opts):
        if grid_option:
            ctx.times = get_grid(opts["grid"], ctx.sde, ctx.steps, ctx.eps)
            ctx.steps = ctx.times.numel() - 1
        solver = build(ctx, opts)
        if ctx.t_start < ctx.sde.T and abs(float(ctx.times[0]) - ctx.t_start) > 1e-9 * max(1.0, ctx.sde.T):
            # A builder with a grid of its own (e.g. a chain SDE's plan) must not start a part-way run
            # from another time: x is a sample of p_{t_start}, nothing else.
            raise ValueError(f"method {ctx.method!r} runs its own time grid here, which starts at "
                             f"t={float(ctx.times[0]):.6g}, not at t_start={ctx.t_start:.6g}; it cannot start part-way")
        x, traj, _ = integrate_fixed_grid(solver, ctx.dyn, ctx.x, ctx.times, generator=ctx.generator,
                                          noise=ctx.noise, progress=ctx.progress, record_every=ctx.record_every,
                                          desc=ctx.method)
        return x, traj, ctx.times, {"steps": ctx.times.numel() - 1, "solver": repr(solver)}

    return run


def _build_ancestral(ctx: RunContext, opts: dict) -> Ancestral:
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
    r"""$\bar\alpha_i$ of ``vp.discretize(n)``; until [`sdegen.ddpm`][sdegen.ddpm] exists, the same chain computed here:
    $\beta_i = (\beta_\min + \tfrac{i-1}{N-1}(\beta_\max - \beta_\min))\,T/N$ (Song et al. 2021, App. B)."""
    try:
        return vp.discretize(n).alphas_cumprod
    except ValueError as err:
        raise ValueError(f"method 'ancestral' on a VPSDE runs the DDPM chain vp.discretize(steps), which needs "
                         f"steps > beta_max * T = {vp.beta_max * vp.T:g}; got steps={n} ({err})") from None
    except ImportError:
        i = torch.arange(1, n + 1, dtype=torch.float64)
        frac = (i - 1) / max(n - 1, 1)
        betas = (vp.beta_min + frac * (vp.beta_max - vp.beta_min)) * (vp.T / n)
        return torch.cumprod(1 - betas, 0)


def _rule(cls):
    """Builder for a step rule: the tabulated form (coefficients precomputed on the grid) for affine SDEs,
    the generic form, which calls ``drift`` and ``diffusion`` each step, otherwise."""

    def build(ctx: RunContext, opts: dict) -> AbstractFixedGridSolver:
        if isinstance(ctx.sde, AffineSDE):
            return cls.tabulated(ctx.sde, ctx.times)
        return cls()

    return build


_PREDICTORS: dict[str, Callable[[RunContext, dict], AbstractFixedGridSolver]] = {
    "euler_maruyama": _rule(EulerMaruyama),
    "reverse_diffusion": _rule(ReverseDiffusion),
    "ancestral": _build_ancestral,
    "ode_euler": _rule(ODEEuler),
    "ode_heun": _rule(ODEHeun),
}
_CORRECTORS = {"langevin": LangevinCorrector, "langevin_batch": BatchLangevinCorrector,
               "annealed_langevin": AnnealedLangevinCorrector, None: None}


def _build_pc(ctx: RunContext, opts: dict) -> AbstractFixedGridSolver:
    predictor = _choice(opts["predictor"], _PREDICTORS, "predictor")
    corrector = _choice(opts["corrector"], _CORRECTORS, "corrector")
    check_positive(opts["snr"], "snr")
    n_corr = opts["corrector_steps"]
    if not isinstance(n_corr, int) or isinstance(n_corr, bool) or n_corr < 1:
        raise ValueError(f"corrector_steps must be an int >= 1, got {n_corr!r}")
    pred = predictor(ctx, opts)
    if corrector is None:
        return pred          # PC without a corrector is exactly the predictor: no extra evaluations
    t = ctx.times            # after the predictor's builder, which may have replaced the grid
    alphas = tuple(langevin_alpha(ctx.sde, t[:-1], t[1:]).tolist())
    if corrector is LangevinCorrector:
        corr = corrector(snr=float(opts["snr"]), data_std=opts["data_std"])
    elif opts["data_std"] != 0.0:
        raise ValueError(f"data_std applies to corrector='langevin' only, got data_std={opts['data_std']!r} "
                         f"with corrector={opts['corrector']!r}")
    else:
        corr = corrector(snr=float(opts["snr"]))
    return PredictorCorrector(pred, corr, n_corr, ctx.unit_draw(), alphas)


def _choice(value, table: Mapping, name: str):
    if value not in table:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, table))}")
    return table[value]


def _adaptive_ode_runner(module: str, fn_name: str, returns_trajectory: bool):
    """Runner for probability-flow ODE integrators ``fn(ode_drift, y0, t0, t1, **opts)`` (imported lazily)."""

    def run(ctx: RunContext, **opts):
        fn = _backend(module, fn_name)()
        if returns_trajectory:
            y, stats, traj = fn(ctx.dyn.ode_drift, ctx.x, ctx.t_start, ctx.eps, progress=ctx.progress,
                                record_every=ctx.record_every, **opts)
        else:
            (y, stats), traj = fn(ctx.dyn.ode_drift, ctx.x, ctx.t_start, ctx.eps, **opts), None
        return y, traj, _times_from(stats, traj, ctx), dict(stats)

    return run


def _run_torchsde(ctx: RunContext, **opts):
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


def _times_from(stats: Mapping, traj, ctx: RunContext) -> Tensor:
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


_TOL = {"rtol": 1e-5, "atol": 1e-5}
#: The ``grid`` option of the generic fixed-grid methods (see [`sdegen.grids`][sdegen.grids]).
_GRID = {"grid": "uniform"}


class MethodTable(dict):
    """A plain ``dict`` of [`MethodSpec`][sdegen.sampling.MethodSpec] whose repr lists names and docs.

    ``print(sdegen.METHODS)`` then reads as a table instead of a wall of runner reprs.
    """

    def __repr__(self) -> str:
        width = max(map(len, self), default=0)
        rows = "\n".join(f"  {name:<{width}}  {spec.doc}" for name, spec in self.items())
        return f"{len(self)} sampling methods (sdegen.METHODS[name] is a MethodSpec):\n{rows}"


METHODS: MethodTable = MethodTable({
    "euler_maruyama": MethodSpec(_fixed_grid_runner(_PREDICTORS["euler_maruyama"], grid_option=True),
                                 reverse_sde=True, options=_GRID,
                                 doc="reverse SDE, Euler–Maruyama (strong order 1 for additive noise)"),
    "reverse_diffusion": MethodSpec(_fixed_grid_runner(_PREDICTORS["reverse_diffusion"], grid_option=True),
                                    reverse_sde=True, options=_GRID,
                                    doc="reverse SDE, the SDE's own discretization reversed (Song et al. eq. 47)"),
    "ancestral": MethodSpec(_fixed_grid_runner(_build_ancestral), reverse_sde=True,
                            options={"eta": None, "variance": None},
                            doc="ancestral posterior sampling (VP: exactly DDPM; VE: SMLD)"),
    "pc": MethodSpec(_fixed_grid_runner(_build_pc, grid_option=True), reverse_sde=True,
                     options={"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16,
                              "corrector_steps": 1, "data_std": 0.0, **_GRID},
                     doc="predictor-corrector: predictor + Langevin/annealed Langevin corrector (or None)"),
    "ode_euler": MethodSpec(_fixed_grid_runner(_PREDICTORS["ode_euler"], grid_option=True), options=_GRID,
                            doc="probability-flow ODE, explicit Euler (order 1)"),
    "ode_heun": MethodSpec(_fixed_grid_runner(_PREDICTORS["ode_heun"], grid_option=True), options=_GRID,
                           doc="probability-flow ODE, Heun (order 2, 2 evaluations per step)"),
    "rk45": MethodSpec(_adaptive_ode_runner("sdegen.solvers.rk45", "rk45_integrate", True), options=_TOL,
                       fixed_grid=False, default_steps=None,
                       backend=_backend("sdegen.solvers.rk45", "rk45_integrate"),
                       doc="probability-flow ODE, adaptive Dormand-Prince RK45 in torch"),
    "torchdiffeq": MethodSpec(_adaptive_ode_runner("sdegen.solvers.backends", "torchdiffeq_integrate", False),
                              options={"solver": "dopri5", **_TOL}, fixed_grid=False, default_steps=None,
                              backend=_backend("sdegen.solvers.backends", "torchdiffeq_integrate"),
                              doc="probability-flow ODE through torchdiffeq.odeint"),
    "scipy": MethodSpec(_adaptive_ode_runner("sdegen.solvers.backends", "scipy_integrate", False),
                        options={"solver": "RK45", **_TOL}, fixed_grid=False, default_steps=None,
                        backend=_backend("sdegen.solvers.backends", "scipy_integrate"),
                        doc="probability-flow ODE through scipy.integrate.solve_ivp (host copies)"),
    "torchsde": MethodSpec(_run_torchsde, options={"solver": "euler"}, reverse_sde=True,
                           backend=_backend("sdegen.solvers.backends", "torchsde_integrate"),
                           doc="reverse SDE through torchsde.sdeint"),
    "heun_karras": MethodSpec(_fixed_grid_runner(build_heun_karras), options=HEUN_KARRAS_OPTIONS, default_steps=18,
                              doc="probability-flow ODE, EDM Heun on the Karras rho grid (2N-1 evaluations)"),
    "dpm_solver": MethodSpec(_fixed_grid_runner(build_dpm_solver), options=DPM_SOLVER_OPTIONS, default_steps=20,
                             doc="probability-flow ODE, DPM-Solver/DPM-Solver++ multistep, orders 1-3"),
    "unipc": MethodSpec(_fixed_grid_runner(build_unipc), options=UNIPC_OPTIONS, default_steps=20,
                        doc="probability-flow ODE, UniPC multistep predictor-corrector (UniP orders 1-3 + UniC)"),
    "deis": MethodSpec(_fixed_grid_runner(build_deis), options=DEIS_OPTIONS, default_steps=20,
                       doc="probability-flow ODE, DEIS tAB exponential integrator, orders 1-3"),
    "pndm": MethodSpec(_fixed_grid_runner(build_pndm), options=PNDM_OPTIONS, default_steps=50,
                       doc="probability-flow ODE, PNDM pseudo linear multistep (warmup 'prk'; 'heun' = PLMS)"),
    "ipndm": MethodSpec(_fixed_grid_runner(build_ipndm), options=IPNDM_OPTIONS, default_steps=20,
                        doc="probability-flow ODE, iPNDM (AB4 on the DDIM transfer, lower-order start)"),
    "lms": MethodSpec(_fixed_grid_runner(build_lms), options=LMS_OPTIONS, default_steps=20,
                      doc="probability-flow ODE, linear multistep in sigma, orders 1-4"),
    "adaptive_sde": MethodSpec(run_adaptive_sde, options=ADAPTIVE_SDE_OPTIONS, reverse_sde=True, fixed_grid=False,
                               default_steps=None, doc="reverse SDE, adaptive EM/improved-Euler pair with rtol/atol"),
    "sde_dpm_solver": MethodSpec(_fixed_grid_runner(build_sde_dpm_solver), options=SDE_DPM_OPTIONS, reverse_sde=True,
                                 default_steps=20,
                                 doc="reverse SDE, SDE-DPM-Solver++ 1 / 2M-SDE / 3M-SDE with eta (one evaluation per step)"),
    "euler_ancestral": MethodSpec(_fixed_grid_runner(build_euler_ancestral, grid_option=True),
                                  options=EULER_ANCESTRAL_OPTIONS, reverse_sde=True, default_steps=50,
                                  doc="Euler ancestral in (x/m, sigma) with eta (k-diffusion, diffusers EulerAncestral)"),
    "dpm2": MethodSpec(_fixed_grid_runner(build_dpm2(False), grid_option=True), options=DPM2_OPTIONS, default_steps=20,
                       doc="probability-flow ODE, k-diffusion DPM-2 (midpoint in log sigma, 2 evaluations per step)"),
    "dpm2_ancestral": MethodSpec(_fixed_grid_runner(build_dpm2(True), grid_option=True),
                                 options=EULER_ANCESTRAL_OPTIONS, reverse_sde=True, default_steps=20,
                                 doc="DPM-2 ancestral with eta (k-diffusion, diffusers KDPM2Ancestral)"),
    "restart": MethodSpec(_fixed_grid_runner(build_restart), options=RESTART_OPTIONS, default_steps=18,
                          doc="Restart sampling: Heun ODE with K forward re-noising restarts over a sigma interval"),
    "sa_solver": MethodSpec(_fixed_grid_runner(build_sa_solver), options=SA_SOLVER_OPTIONS, reverse_sde=True,
                            default_steps=20,
                            doc="reverse SDE, SA-Solver stochastic Adams predictor-corrector with tau (1 evaluation per step)"),
    "dpm_solver_singlestep": MethodSpec(_fixed_grid_runner(build_dpm_singlestep), options=DPM_SINGLESTEP_OPTIONS,
                                        default_steps=20,
                                        doc="DPM-Solver single-step orders 1-3 (optional SDE noise eta); steps = evaluations"),
    "dpm_fast": MethodSpec(_fixed_grid_runner(build_dpm_fast), options=DPM_FAST_OPTIONS, default_steps=20,
                           doc="k-diffusion dpm_fast: steps = evaluation budget split over DPM-Solver-3/2/1 steps"),
})
"""Every sampling method by name: a dict of [`MethodSpec`][sdegen.sampling.MethodSpec] (runner, options
and their defaults, one-line doc). Runners take a `RunContext` and the method's options. The guide
[Choosing a sampler](../samplers.md) compares them; ``print(sdegen.METHODS)`` lists them."""


# ---------------------------------------------------------------------------------------------- validation
def _check_method(method) -> MethodSpec:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[method]


def _resolve_options(method: str, spec: MethodSpec, given: dict) -> dict:
    allowed = spec.allowed_options()
    unknown = sorted(set(given) - set(allowed))
    if unknown and not spec.accepts_any():
        raise TypeError(f"method {method!r} got unknown option(s) {', '.join(unknown)}; "
                        f"valid options: {', '.join(sorted(allowed)) or '(none)'}")
    opts = {k: v for k, v in allowed.items() if v is not inspect.Parameter.empty}
    if spec.backend is not None:
        # Backend defaults are the backend's business; pass only what the spec or the user set.
        opts = {k: v for k, v in opts.items() if k in spec.options or k == "denoise"}
    opts.update(given)
    return opts


def _check_steps(method: str, spec: MethodSpec, steps) -> int | None:
    if not spec.fixed_grid:
        if steps is not None:
            raise ValueError(f"method {method!r} is adaptive and takes no steps=; got steps={steps!r} "
                             "(control accuracy with rtol=/atol=)")
        return None
    if steps is None:
        return spec.default_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return steps


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


# ---------------------------------------------------------------------------------------------- entry point
def sample(sde: SDE, score_fn: Callable[..., Tensor], shape, *, method: str, steps: int | None = None,
           eps: float | None = None, generator: torch.Generator | None = None, device=None, dtype=None,
           progress: bool = False, return_trajectory: bool | int = False, x_T: Tensor | None = None,
           model_kwargs: dict | None = None, seeds=None, x_init: Tensor | None = None,
           t_start: float | None = None, strength: float | None = None, **method_options) -> SampleResult:
    r"""Draw samples by integrating the reverse-time SDE or the probability-flow ODE from ``T`` to ``eps``.

    Methods (see [`METHODS`][sdegen.sampling.METHODS]; each step rule's docstring gives its update and order):

    * ``"euler_maruyama"``: $x \leftarrow x + [f - g^2 s]\Delta t + g\,\Delta w$ ([`EulerMaruyama`][sdegen.sampling.EulerMaruyama]).
    * ``"reverse_diffusion"``: $x \leftarrow x - f_i + G_i^2 s + G_i z$ ([`ReverseDiffusion`][sdegen.sampling.ReverseDiffusion]).
    * ``"ancestral"``: posterior sampling; for [`VPSDE`][sdegen.VPSDE] exactly the DDPM chain of
      ``sde.discretize(steps)`` on $t_i = iT/N$ (``eps`` ignored, no denoising); VE: SMLD. On an SDE that
      carries a discrete chain (``adapters.DiscreteVPSDE``, e.g. from ``adapters.from_diffusers``) and
      without ``steps=``: the chain's own plan (the scheduler's steps, variance and final step, no
      denoising), with ``eta=`` as for DDIM ($\eta = 0$ DDIM, $\eta = 1$ the posterior) and
      ``variance="posterior"`` ($\tilde\beta$) or ``"beta"`` ($\beta$, DDPM's ``fixed_large``) overriding the plan's.
    * ``"pc"``: ``predictor=`` one of ``"reverse_diffusion"`` (default), ``"euler_maruyama"``,
      ``"ancestral"``, ``"ode_euler"``, ``"ode_heun"``; ``corrector="langevin"`` (default: the SNR rule
      at the expected score norm, a step per time, $2\alpha r^2(s(t)^2 + m(t)^2\sigma^2)$ with
      ``data_std=`` $\sigma$, default 0), ``"langevin_batch"`` (the paper's batch-mean norms; couples the
      samples of a batch), ``"annealed_langevin"`` or ``None``; ``snr=0.16``; ``corrector_steps=1``.
    * ``"ode_euler"``, ``"ode_heun"``: the probability-flow ODE on the fixed grid.

    The generic fixed-grid methods (``euler_maruyama``, ``reverse_diffusion``, ``pc``, ``ode_euler``,
    ``ode_heun``) take ``grid=``: ``"uniform"`` (default), ``"quadratic"``, ``"log_snr"``, ``"karras"``
    ([`sdegen.grids`][sdegen.grids]), or a decreasing tensor of times (which then sets the number of steps).
    ``heun_karras`` and ``dpm_solver`` take ``grid=`` and ``rho=`` with their own defaults. Measured on
    the exact-score VP problems, ``ode_heun`` gains most from ``grid="quadratic"`` (3-9x lower
    trajectory error than on the uniform grid at 10-100 NFE; see "Heun and the grid" in the docs'
    sampler guide).
    * ``"rk45"`` (``rtol=1e-5``, ``atol=1e-5``, ...), ``"torchdiffeq"`` (``solver="dopri5"``),
      ``"scipy"`` (``solver="RK45"``): adaptive probability-flow ODE solvers (no ``steps``).
    * ``"torchsde"``: the reverse SDE through ``torchsde.sdeint`` (``solver="euler"``, ...).

    Start part-way (img2img / SDEdit): ``sample(sde, score, None, method=..., x_init=x0, strength=0.5)``
    noises the data ``x0`` to $t_\text{start} = 0.5\,T$ by the SDE's exact transition and integrates
    from there; with the exact score the samples are again distributed as the data.

    Every method takes ``denoise=``: default ``True`` for the reverse-SDE methods (``False`` for the ODE
    ones), a final Tweedie step $\hat x_0 = (x + s(\epsilon)^2 s_\theta(x, \epsilon))/m(\epsilon)$ (one more score
    evaluation). It is skipped by default where it cannot apply (a non-affine SDE, a grid ending at 0).

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t, **model_kwargs)`` returning a tensor shaped like ``x``.
        shape (tuple[int, ...] | None): ``(B, *D)``; may be ``None`` when ``x_T`` is given.
        method: a key of [`METHODS`][sdegen.sampling.METHODS].
        steps: number of steps of fixed-grid methods (default 1000); adaptive methods take none.
        eps: final time, in ``(0, t_start)``; default ``1e-3``, or the last time of a user ``grid=``
            (given together with a grid it must equal the grid's last time).
        generator: source of every random draw (same state, same samples).
        device (torch.device | str | None): of the samples (default: ``x_T``'s, else the generator's device).
        dtype (torch.dtype | None): of the samples (default: ``x_T``'s, else the
            default dtype); float32 or float64.
        progress: show a tqdm bar with the current ``t``.
        return_trajectory: ``True`` keeps every state, an int ``k`` every k-th (bounded memory).
        x_T: start from this ``(B, *D)`` tensor instead of a prior draw (the state at ``t_start``;
            must be finite).
        model_kwargs: keyword arguments passed to every ``score_fn`` call (e.g. class labels).
        seeds (int | Sequence[int] | object | None): optional per-sample noise making sample ``k`` independent of its batch-mates: an int
            offset (sample ``k`` uses seed ``offset + k``), a sequence of ints (one per sample), or
            an object with ``prior(shape, device, dtype)`` and ``__call__(i)`` such as
            `sdegen.PerSampleNoise`. Fixed-grid methods then give sample ``k`` bitwise the
            same whatever the batch; adaptive methods only with per-sample step control.
        x_init: data ``(B, *D)`` to start from part-way (img2img / SDEdit, Meng et al. 2022): it is
            noised to ``t_start`` by the exact transition $x = m(t_\text{start})\,x_0 + s(t_\text{start})\,z$
            (``z`` from ``generator``, or the per-sample ``seeds``), then integrated down to ``eps``.
            Needs an [`AffineSDE`][sdegen.AffineSDE] and ``t_start=`` or ``strength=``.
        t_start: the start time in ``(eps, T]`` (default ``T``). Every grid (uniform, named, a
            user grid, the solvers' own such as Karras for ``heun_karras``/``dpm_solver``) then runs
            from ``t_start`` to ``eps``; ``steps`` counts the steps taken from ``t_start``, except for
            ``ancestral`` on a VPSDE, where ``steps`` is the DDPM chain's length $N$ and
            ``t_start`` must be one of its times $iT/N$. Below ``T`` it needs ``x_init`` or ``x_T``.
        strength: ``t_start = strength * T``, in ``(0, 1]`` (diffusers' img2img convention);
            exclusive with ``t_start``.
        **method_options (Any): the method's options (unknown ones are an error listing the valid ones).

    Returns:
        [`SampleResult`][sdegen.sampling.SampleResult] with ``samples`` ``(B, *D)``, ``nfe`` (counted score calls), ``trajectory``
        (``[(t, x), ...]`` or ``None``), ``times`` (float64 grid visited) and ``stats``.

    Raises:
        ValueError: unknown method, bad ``steps``/``eps``/shapes, a score output shaped unlike ``x``,
            NaN/inf in ``x_T`` or ``x_init``, a bad user grid (not 1-D, not strictly decreasing, not
            starting at ``t_start``, or contradicting ``steps=``/``eps=``), bad ``t_start``/``strength``.
        TypeError: unknown option (also of the torchdiffeq/scipy/torchsde backends), unsupported
            dtype, a score output with another dtype or device than ``x``, ``denoise=True`` without a
            Gaussian kernel.
        RuntimeError: the score function modified its input ``x`` in place.
        NonFiniteError: the state became NaN/inf (names the sample, the step and ``t``; ``x`` is the
            last good state).
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
    spec = _check_method(method)
    opts = _resolve_options(method, spec, method_options)
    steps_given = steps is not None
    if not steps_given and isinstance(sde, AbstractChainSDE):
        # The chain's own sampler settings for this method (e.g. diffusers' DPM-Solver++ grid and
        # order); options the caller passes win.
        opts.update({k: v for k, v in sde.plan.method_options.get(method, {}).items() if k not in method_options})
    steps = _check_steps(method, spec, steps)
    eps_given = eps is not None
    eps = _check_eps(1e-3 if eps is None else eps, sde.T)
    t_start = _check_start(sde, t_start, strength, x_init, x_T)
    grid = opts.get("grid")
    if grid is not None and not isinstance(grid, str):
        # A user grid sets the steps and the final time: checked once here (1-D, finite, strictly
        # decreasing, starting at t_start), converted to a float64 tensor for the builders, and any
        # steps=/eps= given must agree with it.
        grid = user_grid(grid, sde, steps=steps if steps_given else None, eps=eps if eps_given else None,
                         t_start=t_start)
        opts["grid"], steps, eps = grid, grid.numel() - 1, float(grid[-1])
    if not eps < t_start:
        raise ValueError(f"eps={eps!r} must lie below t_start={t_start!r} (samplers run from t_start down to eps)")
    if isinstance(return_trajectory, bool):
        record_every = 1 if return_trajectory else None
    elif isinstance(return_trajectory, int) and return_trajectory >= 1:
        record_every = return_trajectory
    else:
        raise ValueError(f"return_trajectory must be a bool or an int >= 1, got {return_trajectory!r}")
    given = x_T if x_T is not None else x_init
    if shape is None and given is None:
        raise ValueError("shape must be given (B, *D) unless x_T or x_init is")
    if shape is None and not isinstance(given, Tensor):
        raise TypeError(f"{'x_T' if x_T is not None else 'x_init'} must be a torch.Tensor, got {type(given).__name__}")
    seeds = _per_sample_noise(seeds, shape if shape is not None else tuple(given.shape))
    counted = CountingScore(score_fn, model_kwargs)
    dyn = Dynamics(sde, counted)
    denoise = opts.pop("denoise")
    with torch.no_grad():
        if x_init is not None:
            x = _noised_start(sde, x_init, t_start, shape, device, dtype, generator, seeds)
        else:
            x = _start_state(sde, shape, x_T, device, dtype, generator, seeds)
        times = None
        if spec.fixed_grid:
            times = torch.linspace(t_start, eps, steps + 1, dtype=torch.float64)
        if seeds is not None:
            seeds = _BoundNoise(seeds, x)
        ctx = RunContext(sde, dyn, x, eps, steps, generator, seeds, bool(progress), record_every, method, times,
                         steps_given=steps_given, t_start=t_start)
        # Every grid a builder asks for (named, user, a solver's own) starts at t_start.
        with sampling_start(t_start if t_start < sde.T else None):
            x, traj, times, stats = spec.run(ctx, **opts)
        t_end = float(times[-1])
        denoise = False if denoise is None and ctx.own_final_step else _resolve_denoise(denoise, spec, sde, t_end)
        if denoise:
            t = torch.full((x.shape[0],), t_end, device=x.device, dtype=x.dtype)
            x_last, x = x, sde.x0_from_score(x, t, dyn.score(x, t))
            bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                raise NonFiniteError(f"the final denoising step at t={t_end:.6g} produced NaN/inf (first in sample {i})",
                                     step=len(times) - 1, t=t_end, x=x_last, sample=i, x_t=t_end)
            times = torch.cat([times, times.new_zeros(1)])
            if traj is not None:
                traj.append((0.0, x.detach().clone()))
    stats = {"method": method, **stats, "denoise": denoise}
    return SampleResult(samples=x, nfe=counted.nfe, trajectory=traj, times=times, stats=stats)


def _resolve_denoise(denoise, spec: MethodSpec, sde: SDE, t_end: float) -> bool:
    possible = isinstance(sde, AffineSDE) and t_end > 0
    if denoise is None:
        return spec.reverse_sde and possible
    if not isinstance(denoise, bool):
        raise TypeError(f"denoise must be a bool, got {denoise!r}")
    if denoise and not possible:
        why = (f"the grid ends at t={t_end} where s(t) = 0" if isinstance(sde, AffineSDE)
               else f"{type(sde).__name__} is not an AffineSDE (Tweedie needs a Gaussian kernel)")
        raise TypeError(f"denoise=True is impossible here: {why}; pass denoise=False")
    return denoise
