r"""The stochastic k-diffusion-style solvers prepare their tables in the loop (issue 15, item 5).

Each of SDE-DPM-Solver++, SA-Solver, Euler ancestral, DPM-2 (ancestral), Restart and single-step
DPM-Solver, constructed directly with its options and run through ``integrate_fixed_grid`` (which
calls ``prepare`` on the grid's ``GridCoefficients``), must give the same samples bit for bit as its
``tabulated(sde, times, **options)`` form with the same seed: both are one code path, so any
difference (even one ulp) is a bug, not rounding. A table prepared for another grid must be refused
with a ``ValueError`` instead of being applied with the wrong weights.
"""

from __future__ import annotations

import pytest
import torch

import sdegen
from sdegen.grids import get_grid
from sdegen.solvers.ancestral_k import DPM2, EulerAncestral
from sdegen.solvers.base import Dynamics, integrate_fixed_grid
from sdegen.solvers.correctors import PredictorCorrector
from sdegen.solvers.dpm_single import DPMSolverSinglestep, fast_orders
from sdegen.solvers.restart import Restart, default_interval, restart_times
from sdegen.solvers.sa_solver import SASolver
from sdegen.solvers.sde_dpm import SDEDPMSolverPP

F64 = torch.float64
EPS = 1e-3
GM = sdegen.GaussianMixture(means=[[1.0, -0.5], [-1.0, 0.5]], stds=[[0.5, 0.3], [0.4, 0.6]], weights=[0.3, 0.7])
SDES = {"vp": sdegen.VPSDE, "ve": lambda: sdegen.VESDE(sigma_min=0.01, sigma_max=20.0)}
SHAPE = (5, 2)


def _draw(k: int) -> torch.Tensor:
    """The k-th unit draw of Restart and the single-step stages: a fixed function of k."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + k), dtype=F64)


def _run(solver, sde, times, seed: int = 0) -> torch.Tensor:
    x = sde.prior_sample(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return integrate_fixed_grid(solver, Dynamics(sde, GM.score_fn(sde)), x, times,
                                generator=torch.Generator().manual_seed(seed + 1))[0]


def _restart_grid(sde):
    main = get_grid("karras", sde, 8, EPS)
    lo, hi = default_interval(sde, main)
    return restart_times(sde, main, lo, hi, 2, 2)


def _single_fine(sde):
    fine = get_grid("karras", sde, 9, EPS)
    orders = [3, 3, 2, 1]
    return fine, orders, DPMSolverSinglestep.group_times(fine, orders)


# name -> (direct solver, tabulated solver, loop grid), for an SDE
CASES = {
    "sde_dpm_3m_eta05": lambda sde, t: (SDEDPMSolverPP(order=3, eta=0.5),
                                        SDEDPMSolverPP.tabulated(sde, t, order=3, eta=0.5), t),
    "sde_dpm_2m_midpoint": lambda sde, t: (SDEDPMSolverPP(solver_type="midpoint"),
                                           SDEDPMSolverPP.tabulated(sde, t, solver_type="midpoint"), t),
    "sa_solver_3_2_window": lambda sde, t: (
        SASolver(predictor_order=3, corrector_order=2, tau_sigma=(0.05, 2.0)),
        SASolver.tabulated(sde, t, predictor_order=3, corrector_order=2, tau_sigma=(0.05, 2.0)), t),
    "euler_ancestral": lambda sde, t: (EulerAncestral(eta=0.7), EulerAncestral.tabulated(sde, t, eta=0.7), t),
    "dpm2": lambda sde, t: (DPM2(), DPM2.tabulated(sde, t), t),
    "dpm2_ancestral": lambda sde, t: (DPM2(ancestral=True), DPM2.tabulated(sde, t, ancestral=True), t),
    "restart": lambda sde, t: (Restart(draw=_draw), Restart.tabulated(sde, _restart_grid(sde), draw=_draw),
                               _restart_grid(sde)),
    "dpm_single_sde": lambda sde, t: (
        DPMSolverSinglestep(eta=1.0, draw=_draw, orders=_single_fine(sde)[1], fine=_single_fine(sde)[0]),
        DPMSolverSinglestep.tabulated(sde, _single_fine(sde)[0], _single_fine(sde)[1], eta=1.0, draw=_draw),
        _single_fine(sde)[2]),
}


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("case", list(CASES))
def test_direct_solver_prepared_by_the_loop_equals_tabulated(case, sde_name):
    sde = SDES[sde_name]()
    direct, tabulated, times = CASES[case](sde, get_grid("karras", sde, 10, EPS))
    assert direct.table is None and tabulated.table is not None
    a, b = _run(direct, sde, times), _run(tabulated, sde, times)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_a_wrapped_predictor_is_prepared_too():
    """PC without a corrector is its predictor: the wrapper forwards ``prepare`` (same samples bit for bit)."""
    sde = sdegen.VPSDE()
    times = get_grid("karras", sde, 10, EPS)
    assert torch.equal(_run(PredictorCorrector(EulerAncestral()), sde, times), _run(EulerAncestral(), sde, times))


@pytest.mark.parametrize("case", list(CASES))
def test_a_table_for_another_grid_is_refused(case):
    sde = sdegen.VPSDE()
    _, tabulated, times = CASES[case](sde, get_grid("karras", sde, 10, EPS))
    shorter = torch.cat([times[:-2], times[-1:]])                      # one step fewer
    with pytest.raises(ValueError, match="another grid|grid it runs on|group boundaries"):
        _run(tabulated, sde, shorter)
    moved = times.clone()
    moved[1] = 0.5 * (times[1] + times[2])                                 # same length, one time moved
    with pytest.raises(ValueError, match="another grid|group boundaries"):
        _run(tabulated, sde, moved)


def test_the_same_grid_in_float32_is_accepted():
    """A float32 copy of the grid the table was built for is the same grid (relative 1e-6 match)."""
    sde = sdegen.VPSDE()
    times = get_grid("karras", sde, 10, EPS).to(F64)
    solver = EulerAncestral.tabulated(sde, times)
    assert torch.isfinite(_run(solver, sde, times.float())).all()


def test_single_step_needs_its_fine_grid_and_orders():
    sde = sdegen.VPSDE()
    times = get_grid("log_snr", sde, 6, EPS)
    with pytest.raises(ValueError, match="orders= and fine="):
        _run(DPMSolverSinglestep(prediction="noise"), sde, times)
    with pytest.raises(ValueError, match="sum to the number of grid steps 6"):
        DPMSolverSinglestep(orders=fast_orders(7), fine=times)
    with pytest.raises(ValueError, match="orders must be"):
        DPMSolverSinglestep(orders=[4])


def test_non_affine_sde_is_a_type_error_naming_affine():
    sde = sdegen.CustomSDE(drift=lambda x, t: -x, diffusion=lambda t: torch.full_like(t, 2 ** 0.5))
    times = torch.linspace(1.0, EPS, 6, dtype=F64)
    x = torch.zeros(SHAPE, dtype=F64)
    with pytest.raises(TypeError, match="AffineSDE"):
        integrate_fixed_grid(EulerAncestral(), Dynamics(sde, lambda x, t: -x), x, times)
