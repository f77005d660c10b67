r"""Same model, same grid, same noise: sdegen's stochastic samplers equal diffusers' schedulers.

The scheduler's discrete schedule becomes a ``DiscreteVPSDE`` (``from_discrete_eps`` with its betas,
``first_step=0``): timestep $k$ sits at $t = (k+1)/1000$, where the SDE's marginal is exactly the
scheduler's ``alphas_cumprod[k]``. The stand-in model (diffusers schedulers accept any output) is
linear in $x$ and reads the noise level of the *rounded* timestep it receives, so that both sides see
the same function at the fractional midpoint timesteps of the KDPM2 schedulers (diffusers maps a
midpoint σ to a timestep by interpolating $\log\sigma$, the ``DiscreteVPSDE`` by interpolating
$\log\bar\alpha$; both round to the same integer here).

**Same noise.** diffusers draws one ``randn_tensor(shape, generator=...)`` per step that adds noise
(Euler ancestral: every step; KDPM2 ancestral: on the second stage; DPM-Solver++ SDE: every step,
or ``variance_noise=`` when given). sdegen's loop hands step $k$ the increment $\Delta w_k = \sqrt{|\Delta t_k|}\,z_k$
with $z_k$ = ``noise[k]``; feeding the same per-step draws ($z_k$ from the same seeded generator, one
``randn`` call per step as diffusers makes) gives the same path. The scheduler's last step goes to
$\sigma = 0$ ($t = 0$), so these runs call [`integrate_fixed_grid`][sdegen.solvers.base.integrate_fixed_grid]
directly on a grid ending at $t = 0$ (``sdegen.sample`` grids end at ``eps > 0``).

**Tolerance.** diffusers stores its σ tables in float32; the tests overwrite them with the same
schedule in float64 (``SDE.sigma`` at the scheduler's times), so that the comparison is of the
algorithms. (With the float32 tables the 2M-SDE update differs by up to 1.2e-5 relative at 20 steps:
its divided differences amplify the rounding of λ.) ``EulerAncestralDiscreteScheduler`` and
``DPMSolverMultistepScheduler`` still compute their steps in float32 (``step`` casts the sample), so
they are compared at float32 round-off accumulated over 10-20 steps: ``1e-6`` times the largest state
entry (measured up to 1.7e-7). The KDPM2 schedulers, ``SASolverScheduler`` and
``DPMSolverSinglestepScheduler`` keep the sample's dtype and match to float64 round-off (``1e-11``;
measured <= 1e-13).

Not compared: diffusers' third-order ``sde-dpmsolver++`` update. Its $D_2$ coefficient
``(1 - exp(-2h) - 2h)/(2h)^2 - 0.5`` tends to $-1$ as $h \to 0$ where the exact integral
$I_2/h^2$ of a second derivative tends to 0, so it is not a third-order (or consistent second-derivative)
update (the single-step scheduler's ``sde-dpmsolver++`` order-3 ``heun`` update has the same
coefficient); sdegen's 3M-SDE uses the exact $I_2$ (see `sdegen.solvers.sde_dpm`) and is checked against the
exact Gaussian moments in ``tests/solvers/test_stochastic_samplers.py`` instead.
"""

from __future__ import annotations

import pytest
import torch

from sdegen.adapters import from_discrete_eps
from sdegen.solvers.ancestral_k import DPM2, EulerAncestral
from sdegen.solvers.base import Dynamics, integrate_fixed_grid
from sdegen.solvers.dpm_single import DPMSolverSinglestep, singlestep_orders
from sdegen.solvers.sa_solver import SASolver
from sdegen.solvers.sde_dpm import SDEDPMSolverPP

diffusers = pytest.importorskip("diffusers")
# diffusers' own deprecation notices (numpy on torch tensors in its set_timesteps; algorithm_type="dpmsolver"):
# thousands per run, none about sdegen.
pytestmark = [pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning:diffusers")]

F64 = torch.float64
N_TRAIN = 1000
B, D = 6, 4
RTOL = 1e-6
SCHEDULE = dict(num_train_timesteps=N_TRAIN, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
BETAS = torch.linspace(1e-4, 0.02, N_TRAIN, dtype=F64)
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0)
W = torch.eye(D, dtype=F64) + 0.1 * torch.randn(D, D, generator=torch.Generator().manual_seed(0), dtype=F64)


def eps_model(x, k, **_):
    r"""$\hat\epsilon = 0.9\,s_k\,W x + 0.05$ with $s_k$ the std of the rounded training step $k$."""
    k = torch.as_tensor(k).to(F64).reshape(-1).expand(x.shape[0]).round().long().clamp(0, N_TRAIN - 1)
    std = (1 - ALPHAS_CUMPROD[k]).sqrt().reshape(-1, 1)
    return 0.9 * std * (x @ W.T) + 0.05


SDE, SCORE = from_discrete_eps(eps_model, BETAS, first_step=0)


def _times(steps) -> torch.Tensor:
    return (torch.as_tensor(steps, dtype=F64) + 1) / N_TRAIN


def _noise(n: int, seed: int = 2) -> torch.Tensor:
    """``n`` unit draws of shape ``(B, D)``, one ``randn`` call each, as diffusers draws them."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(B, D, generator=g, dtype=F64) for _ in range(n)])


def _x_T():
    return torch.randn(B, D, generator=torch.Generator().manual_seed(1), dtype=F64)


def _diffusers(sched, x, step_kwargs):
    for k, t in enumerate(sched.timesteps):
        out = eps_model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, **step_kwargs(k)).prev_sample
    return x


def _sdegen(solver, x_sigma_picture, times, noise):
    """Start from the scheduler's state in the σ picture ($\\hat x = x/m$): x_T = m(T) x_hat."""
    m_T = SDE.marginal(times[:1])[0]
    return integrate_fixed_grid(solver, Dynamics(SDE, SCORE), x_sigma_picture * m_T, times, noise=noise)[0]


def _assert_close(ours, theirs):
    err = (ours - theirs).abs().max().item()
    assert err <= RTOL * theirs.abs().max().item(), (err, theirs.abs().max().item())


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("n", [10, 20])
def test_euler_ancestral_equals_diffusers(n, spacing):
    sched = diffusers.EulerAncestralDiscreteScheduler(**SCHEDULE, timestep_spacing=spacing)
    sched.set_timesteps(n)
    times = torch.cat([_times(sched.timesteps), torch.zeros(1, dtype=F64)])
    sched.sigmas = SDE.sigma(times).abs().to(F64)      # the same schedule in float64 (see the module docstring)
    x_T = _x_T() * float(sched.init_noise_sigma)
    gen = torch.Generator().manual_seed(2)
    theirs = _diffusers(sched, x_T.clone(), lambda k: {"generator": gen})
    ours = _sdegen(EulerAncestral.tabulated(SDE, times, eta=1.0), x_T, times, _noise(n))
    _assert_close(ours, theirs)


def _kdpm2_float64_tables(sched, times, ancestral: bool) -> None:
    """Overwrite the KDPM2 schedulers' float32 sigma tables with the same schedule in float64 (their
    ``step`` keeps the sample's dtype, so the comparison is then at float64 round-off). The tables are
    rebuilt by the schedulers' own layout: first level once, the others twice, the midpoint levels
    geometric means; ancestral: sigma_up/sigma_down of the step to the next level."""
    sig = torch.cat([SDE.sigma(times[:-1]), torch.zeros(1, dtype=F64)])

    def rep(v):
        return torch.cat([v[:1], v[1:].repeat_interleave(2), v[-1:]])

    if not ancestral:
        sched.sigmas, sched.sigmas_interpol = rep(sig), rep(sig.log().lerp(sig.roll(1).log(), 0.5).exp())
        return
    nxt = sig.roll(-1)
    nxt[-1] = 0.0
    up = (nxt ** 2 * (sig ** 2 - nxt ** 2) / sig ** 2) ** 0.5
    down = (nxt ** 2 - up ** 2) ** 0.5
    down[-1] = 0.0
    mid = sig.log().lerp(down.log(), 0.5).exp()
    mid[-2:] = 0.0
    sched.sigmas, sched.sigmas_interpol, sched.sigmas_up, sched.sigmas_down = rep(sig), rep(mid), rep(up), rep(down)


@pytest.mark.parametrize("ancestral", [False, True])
@pytest.mark.parametrize("n", [10, 15])
@pytest.mark.parametrize("float64_tables", [False, True])
def test_kdpm2_equals_diffusers(n, ancestral, float64_tables):
    """As stored (float32 sigma tables): to float32 round-off of the tables (5e-6 relative; measured
    <= 5e-7); with the tables in float64: to 1e-11 (measured 2e-15 to 2e-14)."""
    cls = diffusers.KDPM2AncestralDiscreteScheduler if ancestral else diffusers.KDPM2DiscreteScheduler
    sched = cls(**SCHEDULE, timestep_spacing="trailing")
    sched.set_timesteps(n)
    main = sched.timesteps[::2]          # the first-stage timesteps; midpoints interleave them
    times = torch.cat([_times(main), torch.zeros(1, dtype=F64)])
    if float64_tables:
        _kdpm2_float64_tables(sched, times, ancestral)
    x_T = _x_T() * float(sched.init_noise_sigma)
    gen = torch.Generator().manual_seed(2)
    theirs = _diffusers(sched, x_T.clone(), (lambda k: {"generator": gen}) if ancestral else (lambda k: {}))
    ours = _sdegen(DPM2.tabulated(SDE, times, ancestral=ancestral), x_T, times, _noise(n))
    err = (ours - theirs).abs().max().item()
    assert err < (1e-11 if float64_tables else 5e-6 * theirs.abs().max().item()), err


@pytest.mark.parametrize("order,solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun")])
@pytest.mark.parametrize("n", [10, 20])
def test_sde_dpm_solver_pp_equals_diffusers(n, order, solver_type):
    sched = diffusers.DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="sde-dpmsolver++", solver_order=order,
                                                  solver_type=solver_type, final_sigmas_type="sigma_min")
    sched.set_timesteps(n)
    # final_sigmas_type="sigma_min": the last level is timestep 0's, t = 1/N_TRAIN.
    times = torch.cat([_times(sched.timesteps), _times([0])])
    sched.sigmas = SDE.sigma(times).to(F64)             # the same schedule in float64 (see the module docstring)
    noise = _noise(n)
    x_T = _x_T()
    theirs = _diffusers(sched, x_T.clone(), lambda k: {"variance_noise": noise[k]})
    ours_type = "exact" if solver_type == "heun" else "midpoint"
    # diffusers lowers the order on the final steps only when there are fewer than 15 of them.
    solver = SDEDPMSolverPP.tabulated(SDE, times, order=order, eta=1.0, solver_type=ours_type,
                                      lower_order_final=n < 15)
    ours = integrate_fixed_grid(solver, Dynamics(SDE, SCORE), x_T, times, noise=noise)[0]
    _assert_close(ours, theirs)


@pytest.mark.parametrize("orders", [(1, 1), (2, 2), (3, 3), pytest.param((3, 1), marks=pytest.mark.slow),
                                    pytest.param((4, 4), marks=pytest.mark.slow), pytest.param((1, 2), marks=pytest.mark.slow)])
@pytest.mark.parametrize("window", [False, True])
def test_sa_solver_equals_diffusers_to_float64(orders, window):
    """SASolverScheduler keeps the sample's dtype; with its sigmas overwritten by the float64 values of the
    same schedule the comparison is at float64 round-off (measured <= 1e-13; tolerance 1e-11).
    ``window``: diffusers' default tau(t) = 1 for training steps 200..800, else 0, which is sdegen's
    ``tau_sigma`` = (sigma at step 200, sigma at step 800); otherwise tau = 1 on every step."""
    n = 12
    po, co = orders
    sched = diffusers.SASolverScheduler(**SCHEDULE, predictor_order=po, corrector_order=co,
                                        tau_func=None if window else (lambda t: 1))
    sched.set_timesteps(n)
    times = torch.cat([_times(sched.timesteps), _times([0])])     # final level: timestep 0's
    sched.sigmas = SDE.sigma(times).to(F64)
    x_T = _x_T()
    gen = torch.Generator().manual_seed(2)
    theirs = _diffusers(sched, x_T.clone(), lambda k: {"generator": gen})
    win = tuple(SDE.sigma(_times([200, 800])).tolist()) if window else None
    solver = SASolver.tabulated(SDE, times, predictor_order=po, corrector_order=co, tau=1.0, tau_sigma=win)
    ours = integrate_fixed_grid(solver, Dynamics(SDE, SCORE), x_T, times, noise=_noise(n))[0]
    assert (ours - theirs).abs().max().item() < 1e-11


@pytest.mark.parametrize("algorithm,solver_type,order", [
    ("dpmsolver++", "midpoint", 2), ("dpmsolver++", "heun", 3), ("dpmsolver++", "midpoint", 3),
    ("dpmsolver", "heun", 2), ("dpmsolver", "midpoint", 3), ("dpmsolver", "heun", 3),
    ("sde-dpmsolver++", "midpoint", 2), ("sde-dpmsolver++", "heun", 2), ("sde-dpmsolver++", "midpoint", 3)])
@pytest.mark.parametrize("n", [10, pytest.param(11, marks=pytest.mark.slow)])
def test_dpm_solver_singlestep_equals_diffusers_to_float64(n, algorithm, solver_type, order):
    """DPMSolverSinglestepScheduler keeps the sample's dtype: with its sigmas in float64 the comparison is
    at float64 round-off (measured <= 5e-14; tolerance 1e-11). Its steps are grouped into single-step
    updates (``order_list`` 1, 2, 3, 1, 2, 3, ...): sdegen's loop grid is the group boundaries and each
    group's inner points are the stages. sde-dpmsolver++ draws one noise per scheduler step, in order:
    the stages' draws go to ``draw``, each group's last one is the loop's draw (``noise="independent"``)."""
    sched = diffusers.DPMSolverSinglestepScheduler(**SCHEDULE, algorithm_type=algorithm, solver_type=solver_type,
                                                   solver_order=order, final_sigmas_type="sigma_min",
                                                   lower_order_final=True)
    sched.set_timesteps(n)
    fine = torch.cat([_times(sched.timesteps), _times([0])])
    sched.sigmas = SDE.sigma(fine).to(F64)
    orders = singlestep_orders(n, order)
    x_T = _x_T()
    gen = torch.Generator().manual_seed(2)
    theirs = _diffusers(sched, x_T.clone(), lambda k: {"generator": gen})
    z = list(_noise(n))
    stage, final, pos = [], [], 0
    for k in orders:
        stage += z[pos:pos + k - 1]
        final.append(z[pos + k - 1])
        pos += k
    solver = DPMSolverSinglestep.tabulated(
        SDE, fine, orders, prediction="noise" if algorithm == "dpmsolver" else "data",
        solver_type="exact" if solver_type == "heun" else "midpoint", eta=1.0 if algorithm.startswith("sde") else 0.0,
        noise="independent", draw=lambda k: stage[k])
    times = DPMSolverSinglestep.group_times(fine, orders)
    ours = integrate_fixed_grid(solver, Dynamics(SDE, SCORE), x_T, times, noise=torch.stack(final))[0]
    assert (ours - theirs).abs().max().item() < 1e-11


def test_noise_matters():
    """The comparison has power: other draws give samples far outside the tolerance."""
    sched = diffusers.EulerAncestralDiscreteScheduler(**SCHEDULE, timestep_spacing="trailing")
    sched.set_timesteps(10)
    times = torch.cat([_times(sched.timesteps), torch.zeros(1, dtype=F64)])
    x_T = _x_T() * float(sched.init_noise_sigma)
    gen = torch.Generator().manual_seed(2)
    theirs = _diffusers(sched, x_T.clone(), lambda k: {"generator": gen})
    ours = _sdegen(EulerAncestral.tabulated(SDE, times, eta=1.0), x_T, times, _noise(10, seed=3))
    assert (ours - theirs).abs().max().item() > 100 * RTOL * theirs.abs().max().item()
