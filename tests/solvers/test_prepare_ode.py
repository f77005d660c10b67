"""The deterministic multistep/ODE solvers have one step path: the fixed-grid loop prepares their per-step
coefficients from the grid's `GridCoefficients`, however the solver was built.

- A solver constructed directly and run through `integrate_fixed_grid` equals the same solver's
  ``tabulated(sde, times)`` bit for bit (the loop prepares it; ``tabulated`` is that same ``prepare``).
- ``prepare`` rebuilds the rows for the grid it is given: a solver tabulated on another grid gives the numbers
  of the grid it runs on, never those of its old table.
- A non-affine SDE is a ``TypeError`` naming the AffineSDE requirement (not a wrong number), from the loop and
  from ``sample``; ``n_steps`` different from the grid's and a log-SNR step into ``s = 0`` are ``ValueError``.
"""

import pytest
import torch

import sdegen
from sdegen.grids import get_grid
from sdegen.solvers.ab_logsnr import ABLogSNR
from sdegen.solvers.base import CountingScore, Dynamics, integrate_fixed_grid
from sdegen.solvers.deis import DEIS
from sdegen.solvers.dpm_solver import DPMSolver
from sdegen.solvers.edm import HeunKarras
from sdegen.solvers.multistep import LMS, PNDM
from sdegen.solvers.unipc import UniPC

N = 8
SOLVERS = {
    "dpm_solver": DPMSolver(order=3, prediction="data", lower_order_final=True),
    "dpm_solver_noise": DPMSolver(order=2, prediction="noise", solver_type="midpoint"),
    "heun_karras": HeunKarras(n_steps=N),
    "heun_karras_churn": HeunKarras(n_steps=N, s_churn=2.0),
    "pndm": PNDM(warmup="prk"),
    "plms": PNDM(warmup="heun"),
    "lms": LMS(4),
    "deis": DEIS(order=3),
    "unipc": UniPC(order=2),
    "unipc_noise": UniPC(order=3, prediction="noise", variant="bh1"),
    "ab_logsnr": ABLogSNR(3),
}
#: The sample() method of each solver class (the builders return the plain solver).
METHODS = {DPMSolver: "dpm_solver", HeunKarras: "heun_karras", PNDM: "pndm", LMS: "lms", DEIS: "deis",
           UniPC: "unipc", ABLogSNR: "ab_logsnr"}


def _run(solver, sde, times, x, noise=None):
    score = sdegen.named_mixture("anisotropic").score_fn(sde)
    return integrate_fixed_grid(solver, Dynamics(sde, CountingScore(score)), x, times, noise=noise)[0]


@pytest.mark.parametrize("name", list(SOLVERS))
def test_direct_solver_equals_tabulated_bit_for_bit(name):
    solver, sde = SOLVERS[name], sdegen.VPSDE()
    times = get_grid("karras", sde, N, 1e-3)
    x = sde.prior_sample((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    noise = torch.randn((N, 16, 2), generator=torch.Generator().manual_seed(1))
    direct = _run(solver, sde, times, x, noise)
    assert torch.equal(direct, _run(solver.tabulated(sde, times), sde, times, x, noise))
    assert torch.isfinite(direct).all() and not torch.equal(direct, x)
    # A table built for another grid is rebuilt for the grid the solver runs on.
    other = get_grid("uniform", sde, N, 1e-2)
    assert torch.equal(direct, _run(solver.tabulated(sde, other), sde, times, x, noise))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_non_affine_sde_is_a_type_error(name):
    sde = sdegen.CustomSDE(drift=lambda x, t: -x, diffusion=lambda t: torch.ones_like(t))
    times = torch.linspace(1.0, 1e-3, N + 1, dtype=torch.float64)
    x = torch.zeros(4, 2)
    with pytest.raises(TypeError, match=f"{type(SOLVERS[name]).__name__} needs an AffineSDE .*got CustomSDE"):
        integrate_fixed_grid(SOLVERS[name], Dynamics(sde, CountingScore(lambda x, t: -x)), x, times)


@pytest.mark.parametrize("method", sorted(set(METHODS.values())))
def test_sample_on_a_non_affine_sde_is_a_type_error(method):
    sde = sdegen.CustomSDE(drift=lambda x, t: -x, diffusion=lambda t: torch.ones_like(t))
    with pytest.raises(TypeError, match="needs an AffineSDE"):
        sdegen.sample(sde, lambda x, t: -x, (4, 2), method=method, steps=N, grid="uniform")


def test_n_steps_must_be_the_grids():
    sde = sdegen.VPSDE()
    times = get_grid("karras", sde, N, 1e-3)
    x = torch.zeros(4, 2)
    for solver in (DPMSolver(n_steps=N + 1), HeunKarras(n_steps=N - 1), DEIS(n_steps=2 * N), UniPC(n_steps=1)):
        with pytest.raises(ValueError, match=f"n_steps={solver.n_steps} but runs on a grid of {N} steps"):
            _run(solver, sde, times, x)


@pytest.mark.parametrize("solver", [DPMSolver(), DEIS(), UniPC(), ABLogSNR()], ids=lambda s: type(s).__name__)
def test_log_snr_step_into_zero_std_is_a_value_error(solver):
    sde = sdegen.VPSDE()
    times = torch.linspace(1.0, 0.0, N + 1, dtype=torch.float64)       # s(0) = 0: lambda = +inf
    with pytest.raises(ValueError, match=r"needs std s\(t\) > 0 at every grid time; the grid reaches t=0"):
        _run(solver, sde, times, torch.zeros(4, 2))
