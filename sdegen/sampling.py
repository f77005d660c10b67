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
import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ._utils import check_positive
from .sdes import SDE, AffineSDE, VPSDE
from .grids import get_grid, sampling_start, user_grid
from ._sample_inputs import _BoundNoise, _check_eps, _check_start, _noised_start, _per_sample_noise, _start_state
from .solvers.runners import _adaptive_ode_runner, _backend, _build_ancestral, _run_torchsde
from .solvers.ode_integrators import ODE_INTEGRATORS, ODEIntegrator
from .solvers.base import AbstractFixedGridSolver, CountingScore, Dynamics, NonFiniteError, SampleResult, \
    integrate_fixed_grid
from .solvers.correctors import (AnnealedLangevinCorrector, BatchLangevinCorrector, LangevinCorrector,
                                  PredictorCorrector, langevin_alpha)
from .solvers.ode_steps import ODEEuler, ODEHeun
from .solvers.sde_steps import Ancestral, EulerMaruyama, ReverseDiffusion
from .sdes.discrete import AbstractChainSDE
from .solvers.adaptive_sde import ADAPTIVE_SDE_OPTIONS, run_adaptive_sde
from .solvers.dpm_solver import DPM_SOLVER_OPTIONS, DPMSolver, build_dpm_solver
from .solvers.edm import HEUN_KARRAS_OPTIONS, HeunKarras, build_heun_karras
from .solvers.sde_dpm import SDE_DPM_OPTIONS, SDEDPMSolverPP, build_sde_dpm_solver
from .solvers.ancestral_k import DPM2, DPM2_OPTIONS, EULER_ANCESTRAL_OPTIONS, EulerAncestral, build_dpm2, \
    build_euler_ancestral
from .solvers.restart import RESTART_OPTIONS, Restart, build_restart
from .solvers.sa_solver import SA_SOLVER_OPTIONS, SASolver, build_sa_solver
from .solvers.dpm_single import DPM_FAST_OPTIONS, DPM_SINGLESTEP_OPTIONS, DPMSolverSinglestep, build_dpm_fast, \
    build_dpm_singlestep
from .solvers.unipc import UNIPC_OPTIONS, UniPC, build_unipc
from .solvers.deis import DEIS, DEIS_OPTIONS, build_deis
from .solvers.ab_logsnr import AB_LOGSNR_OPTIONS, ABLogSNR, build_ab_logsnr
from .solvers.multistep import IPNDM_OPTIONS, LMS, LMS_OPTIONS, PNDM, PNDM_OPTIONS, build_ipndm, build_lms, build_pndm

__all__ = ["sample", "METHODS", "MethodSpec", "RunContext", "predictors"]


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
        callback: called by the fixed-grid loop after every step (see ``sample``), or ``None``.
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
    callback: Callable[[dict], Any] | None = None

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

    A fixed-grid method is data: its builder (``build(ctx, options) -> solver``), the solver class and
    whether the generic ``grid`` option sets the grid first; the runner is then the one loop. Such a row
    is at once a ``sample`` method, a PC predictor (``predictor=`` of ``"pc"``), an inpainting
    predictor ([`sdegen.conditional.inpaint`][sdegen.conditional.inpaint]) and a row of the contract
    test and the benchmarks.

    Attributes:
        run: ``run(ctx, **options) -> (x, trajectory | None, times | None, stats)``; derived from
            ``build`` when not given.
        options: allowed keyword options and their defaults.
        reverse_sde: whether it samples the reverse SDE (then ``denoise`` defaults to ``True``).
        fixed_grid: whether ``steps`` applies (else passing ``steps`` is an error).
        default_steps: ``steps`` when not given (fixed-grid methods).
        backend: for adapters, a zero-argument callable returning the backend function whose keyword
            parameters are further allowed options (imported lazily: optional dependencies).
        doc: one line for error messages and docs.
        build: fixed-grid builder ``build(ctx, options) -> AbstractFixedGridSolver`` (sets ``ctx.times``
            when the method runs on a grid of its own), or ``None`` for adaptive and backend methods.
        solver: the solver class ``build`` returns (its ``order``, ``evals_per_step``, ``stochastic``).
        grid_option: the ``grid`` option (a name of `sdegen.grids.GRIDS` or a tensor) sets ``ctx.times``
            before ``build`` runs.
    """

    run: Callable[..., tuple] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    reverse_sde: bool = False
    fixed_grid: bool = True
    default_steps: int | None = 1000
    backend: Callable[[], Callable] | None = None
    doc: str = ""
    build: Callable[..., AbstractFixedGridSolver] | None = None
    solver: type | None = None
    grid_option: bool = False

    def __post_init__(self):
        if (self.run is None) == (self.build is None):
            raise ValueError("a MethodSpec needs exactly one of run= (its own runner) and build= (a fixed-grid builder)")
        if self.run is None:
            object.__setattr__(self, "run", _fixed_grid_runner(self.build, grid_option=self.grid_option))

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
                                          desc=ctx.method, callback=ctx.callback)
        n = ctx.times.numel() - 1
        return x, traj, ctx.times, {"steps": n, "solver": repr(solver), "declared_nfe": solver.nfe(n)}

    return run


def _rule(cls):
    """Builder for a step rule without options: the plain rule, which the loop prepares for the grid (its
    coefficient table for an affine SDE; ``drift`` and ``diffusion`` each step otherwise)."""

    def build(ctx: RunContext, opts: dict) -> AbstractFixedGridSolver:
        return cls()

    return build


def predictors() -> dict[str, Callable[[RunContext, dict], AbstractFixedGridSolver]]:
    """Every fixed-grid method of [`METHODS`][sdegen.sampling.METHODS] (but ``pc``) as a PC predictor:
    ``builder(ctx, pc_options)`` runs the method's own builder with its defaults and the PC run's ``grid``."""
    return {name: functools.partial(_predictor, spec) for name, spec in METHODS.items()
            if spec.build is not None and name != "pc"}


def _predictor(spec: MethodSpec, ctx: RunContext, opts: dict) -> AbstractFixedGridSolver:
    return spec.build(ctx, {**spec.options, "grid": opts["grid"]})
_CORRECTORS = {"langevin": LangevinCorrector, "langevin_batch": BatchLangevinCorrector,
               "annealed_langevin": AnnealedLangevinCorrector, None: None}


def _build_pc(ctx: RunContext, opts: dict) -> AbstractFixedGridSolver:
    predictor = _choice(opts["predictor"], predictors(), "predictor")
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
    # Time-only step rules are tabulated once per run: a corrector update is then two kernels.
    table = corr.tabulate(ctx.sde, t, alphas, ctx.x.dtype)
    return PredictorCorrector(pred, corr, n_corr, ctx.unit_draw(), alphas, table)


def _choice(value, table: Mapping, name: str):
    if value not in table:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, table))}")
    return table[value]


#: The ``grid`` option of the generic fixed-grid methods (see [`sdegen.grids`][sdegen.grids]).
_GRID = {"grid": "uniform"}


def _ode_integrator_rows(integrators: Mapping[str, ODEIntegrator]) -> dict[str, MethodSpec]:
    """A probability-flow ``sample`` row for every adaptive ODE integrator (`sdegen.solvers.ode_integrators`):
    its options and defaults are the integrator's own (``solver``, ``rtol``, ``atol``), its further keyword
    options those of its function."""
    return {name: MethodSpec(_adaptive_ode_runner(integ), options=integ.options(), fixed_grid=False,
                             default_steps=None, backend=integ.load, doc=integ.doc)
            for name, integ in integrators.items()}


class MethodTable(dict):
    """A plain ``dict`` of [`MethodSpec`][sdegen.sampling.MethodSpec] whose repr lists names and docs.

    ``print(sdegen.METHODS)`` then reads as a table instead of a wall of runner reprs.
    """

    def __repr__(self) -> str:
        width = max(map(len, self), default=0)
        rows = "\n".join(f"  {name:<{width}}  {spec.doc}" for name, spec in self.items())
        return f"{len(self)} sampling methods (sdegen.METHODS[name] is a MethodSpec):\n{rows}"


METHODS: MethodTable = MethodTable({
    "euler_maruyama": MethodSpec(build=_rule(EulerMaruyama), solver=EulerMaruyama, grid_option=True,
                                 reverse_sde=True, options=_GRID,
                                 doc="reverse SDE, Euler–Maruyama (strong order 1 for additive noise)"),
    "reverse_diffusion": MethodSpec(build=_rule(ReverseDiffusion), solver=ReverseDiffusion, grid_option=True,
                                    reverse_sde=True, options=_GRID,
                                    doc="reverse SDE, the SDE's own discretization reversed (Song et al. eq. 47)"),
    "ancestral": MethodSpec(build=_build_ancestral, solver=Ancestral, reverse_sde=True,
                            options={"eta": None, "variance": None},
                            doc="ancestral posterior sampling (VP: exactly DDPM; VE: SMLD)"),
    "pc": MethodSpec(build=_build_pc, solver=PredictorCorrector, grid_option=True, reverse_sde=True,
                     options={"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16,
                              "corrector_steps": 1, "data_std": 0.0, **_GRID},
                     doc="predictor-corrector: predictor + Langevin/annealed Langevin corrector (or None)"),
    "ode_euler": MethodSpec(build=_rule(ODEEuler), solver=ODEEuler, grid_option=True, options=_GRID,
                            doc="probability-flow ODE, explicit Euler (order 1)"),
    "ode_heun": MethodSpec(build=_rule(ODEHeun), solver=ODEHeun, grid_option=True, options=_GRID,
                           doc="probability-flow ODE, Heun (order 2, 2 evaluations per step)"),
    **_ode_integrator_rows(ODE_INTEGRATORS),
    "torchsde": MethodSpec(_run_torchsde, options={"solver": "euler"}, reverse_sde=True,
                           backend=_backend("sdegen.solvers.backends", "torchsde_integrate"),
                           doc="reverse SDE through torchsde.sdeint"),
    "heun_karras": MethodSpec(build=build_heun_karras, solver=HeunKarras, options=HEUN_KARRAS_OPTIONS, default_steps=18,
                              doc="probability-flow ODE, EDM Heun on the Karras rho grid (2N-1 evaluations)"),
    "dpm_solver": MethodSpec(build=build_dpm_solver, solver=DPMSolver, options=DPM_SOLVER_OPTIONS, default_steps=20,
                             doc="probability-flow ODE, DPM-Solver/DPM-Solver++ multistep, orders 1-3"),
    "unipc": MethodSpec(build=build_unipc, solver=UniPC, options=UNIPC_OPTIONS, default_steps=20,
                        doc="probability-flow ODE, UniPC multistep predictor-corrector (UniP orders 1-3 + UniC)"),
    "deis": MethodSpec(build=build_deis, solver=DEIS, options=DEIS_OPTIONS, default_steps=20,
                       doc="probability-flow ODE, DEIS tAB exponential integrator, orders 1-3"),
    "pndm": MethodSpec(build=build_pndm, solver=PNDM, options=PNDM_OPTIONS, default_steps=50,
                       doc="probability-flow ODE, PNDM pseudo linear multistep (warmup 'prk'; 'heun' = PLMS)"),
    "ipndm": MethodSpec(build=build_ipndm, solver=PNDM, options=IPNDM_OPTIONS, default_steps=20,
                        doc="probability-flow ODE, iPNDM (AB4 on the DDIM transfer, lower-order start)"),
    "lms": MethodSpec(build=build_lms, solver=LMS, options=LMS_OPTIONS, default_steps=20,
                      doc="probability-flow ODE, linear multistep in sigma, orders 1-4"),
    "adaptive_sde": MethodSpec(run_adaptive_sde, options=ADAPTIVE_SDE_OPTIONS, reverse_sde=True, fixed_grid=False,
                               default_steps=None, doc="reverse SDE, adaptive EM/improved-Euler pair with rtol/atol"),
    "sde_dpm_solver": MethodSpec(build=build_sde_dpm_solver, solver=SDEDPMSolverPP, options=SDE_DPM_OPTIONS, reverse_sde=True,
                                 default_steps=20,
                                 doc="reverse SDE, SDE-DPM-Solver++ 1 / 2M-SDE / 3M-SDE with eta (one evaluation per step)"),
    "euler_ancestral": MethodSpec(build=build_euler_ancestral, solver=EulerAncestral, grid_option=True,
                                  options=EULER_ANCESTRAL_OPTIONS, reverse_sde=True, default_steps=50,
                                  doc="Euler ancestral in (x/m, sigma) with eta (k-diffusion, diffusers EulerAncestral)"),
    "dpm2": MethodSpec(build=build_dpm2(False), solver=DPM2, grid_option=True, options=DPM2_OPTIONS, default_steps=20,
                       doc="probability-flow ODE, k-diffusion DPM-2 (midpoint in log sigma, 2 evaluations per step)"),
    "dpm2_ancestral": MethodSpec(build=build_dpm2(True), solver=DPM2, grid_option=True,
                                 options=EULER_ANCESTRAL_OPTIONS, reverse_sde=True, default_steps=20,
                                 doc="DPM-2 ancestral with eta (k-diffusion, diffusers KDPM2Ancestral)"),
    "restart": MethodSpec(build=build_restart, solver=Restart, options=RESTART_OPTIONS, default_steps=18,
                          doc="Restart sampling: Heun ODE with K forward re-noising restarts over a sigma interval"),
    "sa_solver": MethodSpec(build=build_sa_solver, solver=SASolver, options=SA_SOLVER_OPTIONS, reverse_sde=True,
                            default_steps=20,
                            doc="reverse SDE, SA-Solver stochastic Adams predictor-corrector with tau (1 evaluation per step)"),
    "dpm_solver_singlestep": MethodSpec(build=build_dpm_singlestep, solver=DPMSolverSinglestep, options=DPM_SINGLESTEP_OPTIONS,
                                        default_steps=20,
                                        doc="DPM-Solver single-step orders 1-3 (optional SDE noise eta); steps = evaluations"),
    "dpm_fast": MethodSpec(build=build_dpm_fast, solver=DPMSolverSinglestep, options=DPM_FAST_OPTIONS, default_steps=20,
                           doc="k-diffusion dpm_fast: steps = evaluation budget split over DPM-Solver-3/2/1 steps"),
    "ab_logsnr": MethodSpec(build=build_ab_logsnr, solver=ABLogSNR, grid_option=True, options=AB_LOGSNR_OPTIONS,
                            default_steps=20, doc="probability-flow ODE, Adams-Bashforth 2/3 in log-SNR (1 evaluation per step)"),
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


# ---------------------------------------------------------------------------------------------- entry point
def sample(sde: SDE, score_fn: Callable[..., Tensor], shape, *, method: str, steps: int | None = None,
           eps: float | None = None, generator: torch.Generator | None = None, device=None, dtype=None,
           progress: bool = False, return_trajectory: bool | int = False, x_T: Tensor | None = None,
           model_kwargs: dict | None = None, seeds=None, x_init: Tensor | None = None,
           t_start: float | None = None, strength: float | None = None, callback: Callable[[dict], Any] | None = None,
           **method_options) -> SampleResult:
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
        callback: fixed-grid methods call ``callback(info)`` after every step with ``info = {"i": step,
            "t": t_i, "t_next": t_{i+1}, "x": state at t_{i+1}}`` (as k-diffusion's samplers); it must not
            modify ``x`` in place. Adaptive and backend methods take none (a ``TypeError``).
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
    if callback is not None and (spec.build is None or not callable(callback)):
        raise TypeError(f"callback must be a callable and applies to the fixed-grid methods; got "
                        f"{type(callback).__name__} with method {method!r}")
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
                         steps_given=steps_given, t_start=t_start, callback=callback)
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
