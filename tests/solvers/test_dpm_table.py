"""The tabulated DPM-Solver step (host float64 coefficients) is the generic step, to round-off."""

import pytest
import torch

import sdegen
from sdegen.grids import get_grid
from sdegen.solvers.base import CountingScore, Dynamics, integrate_fixed_grid
from sdegen.solvers.dpm_solver import DPMSolver


@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.SubVPSDE(), sdegen.VESDE()], ids=repr)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("lower_order_final", [False, True])
def test_tabulated_equals_generic(sde, order, prediction, lower_order_final):
    score = sdegen.named_mixture("anisotropic").score_fn(sde)
    x = sde.prior_sample((32, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times = get_grid("karras", sde, 12, 1e-3, rho=7.0)
    solver = DPMSolver(order=order, prediction=prediction, n_steps=12, lower_order_final=lower_order_final)
    a, _, _ = integrate_fixed_grid(solver, Dynamics(sde, CountingScore(score)), x, times)
    b, _, _ = integrate_fixed_grid(solver.tabulated(sde, times), Dynamics(sde, CountingScore(score)), x, times)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    assert not torch.equal(a, x)  # it moved


@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.SubVPSDE(), sdegen.VESDE()], ids=repr)
@pytest.mark.parametrize("grid", ["karras", "uniform", "log_snr"])
@pytest.mark.parametrize("final_euler", [False, True])
def test_heun_karras_tabulated_equals_generic(sde, grid, final_euler):
    from sdegen.solvers.edm import HeunKarras

    score = sdegen.named_mixture("anisotropic").score_fn(sde)
    x = sde.prior_sample((32, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times = get_grid(grid, sde, 9, 1e-3)
    solver = HeunKarras(n_steps=9, final_euler=final_euler)
    counts = [CountingScore(score), CountingScore(score)]
    a, _, _ = integrate_fixed_grid(solver, Dynamics(sde, counts[0]), x, times)
    tab = solver.tabulated(sde, times)
    assert tab.table is not None and len(tab.table) == 9
    b, _, _ = integrate_fixed_grid(tab, Dynamics(sde, counts[1]), x, times)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    assert counts[0].nfe == counts[1].nfe == 18 - final_euler
    assert not torch.equal(a, x)
    # With churn the noise level moves with the step: no table, the generic step runs.
    assert HeunKarras(n_steps=9, s_churn=1.0, final_euler=False).tabulated(sde, times).table is None
