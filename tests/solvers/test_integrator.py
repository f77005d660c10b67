r"""The one loop's parts: the Brownian path (refined for strong order), the controllers, the callback.

Gaussian data $x_0 \sim \mathcal N(\mu, v I)$ under VP gives the exact score $-(x - m\mu)/\sigma_t^2$ with
$\sigma_t^2 = m^2 v + s^2$: the reverse SDE is linear with additive noise, where Euler–Maruyama has strong
order 1 (Kloeden & Platen 1992, Sec. 10.2 and 10.3).
"""

from __future__ import annotations

import math

import pytest
import torch

import sdegen
from sdegen.solvers.base import AbstractFixedGridSolver, CountingScore, Dynamics, NonFiniteError, integrate_fixed_grid
from sdegen.solvers.brownian import BrownianBridgeStack, BrownianPath
from sdegen.solvers.controllers import FixedGrid, PIController
from sdegen.solvers.ode_steps import ODEEuler
from sdegen.solvers.sde_steps import EulerMaruyama

from test_steps import fitted_slope, gaussian_score


@pytest.mark.parametrize("tabulated", [False, True], ids=["generic", "tabulated"])
def test_euler_maruyama_strong_order_on_one_refined_path(tabulated):
    """One Brownian path on 2048 fine steps, read on grids of 16..128 steps (sums of the fine increments):
    the RMS pathwise error against the fine solution falls with slope ``EulerMaruyama.order`` (1.0 for
    additive noise) within 0.2. B = 400 paths: the RMS error's relative standard error is about
    1/sqrt(2B) ~ 4 % per level, ~0.05 on the slope over a factor 8 in h."""
    sde, eps, n_fine = sdegen.VPSDE(), 1e-2, 2048
    dyn = Dynamics(sde, CountingScore(gaussian_score(sde)))
    gen = torch.Generator().manual_seed(0)
    x_T = sde.prior_sample((400, 2), generator=gen, dtype=torch.float64)
    fine_times = torch.linspace(sde.T, eps, n_fine + 1, dtype=torch.float64)
    dw = torch.randn((n_fine, *x_T.shape), generator=gen, dtype=torch.float64) * math.sqrt((sde.T - eps) / n_fine)

    def solve(n):
        times = torch.linspace(sde.T, eps, n + 1, dtype=torch.float64)
        solver = EulerMaruyama.tabulated(sde, times) if tabulated else EulerMaruyama()
        path = BrownianPath.from_increments(dw, n_fine // n)
        return integrate_fixed_grid(solver, dyn, x_T, times, brownian=path)[0]

    ref = solve(n_fine)
    steps = [16, 32, 64, 128]
    errs = [float((solve(n) - ref).square().sum(1).mean().sqrt()) for n in steps]
    slope = fitted_slope([1.0 / n for n in steps], errs)
    assert abs(slope - EulerMaruyama.order) < 0.2, (slope, errs)


def test_brownian_path_refinement_sums_fine_increments():
    dw = torch.randn(8, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    path = BrownianPath.from_increments(dw, 4)
    assert path.steps() == 2
    assert torch.allclose(path.dw(1), dw[4:].sum(0), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="factor"):
        BrownianPath.from_increments(dw, 3)


def test_brownian_path_draws_in_step_order_with_the_step_variance():
    """Drawn increments are generator draws in step order, scaled by sqrt(|dt|) (the loop's former rule)."""
    x = torch.zeros(5, 2, dtype=torch.float64)
    times = [1.0, 0.75, 0.25]
    path = BrownianPath(times, x, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    z0, z1 = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.equal(path.dw(0), z0 * 0.5) and torch.equal(path.dw(1), z1 * math.sqrt(0.5))


def test_loop_rejects_a_path_of_another_length():
    sde = sdegen.VPSDE()
    dyn = Dynamics(sde, CountingScore(gaussian_score(sde)))
    path = BrownianPath.from_increments(torch.zeros(6, 4, 2, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="brownian covers 3 steps, the grid has 4"):
        integrate_fixed_grid(EulerMaruyama(), dyn, torch.zeros(4, 2, dtype=torch.float64),
                             torch.linspace(1.0, 0.1, 5, dtype=torch.float64), brownian=path)


def test_callback_sees_every_step():
    sde = sdegen.VPSDE()
    dyn = Dynamics(sde, CountingScore(gaussian_score(sde)))
    seen = []
    times = torch.linspace(1.0, 0.1, 6, dtype=torch.float64)
    x, _, _ = integrate_fixed_grid(EulerMaruyama(), dyn, torch.zeros(3, 2, dtype=torch.float64), times,
                                   generator=torch.Generator().manual_seed(0),
                                   callback=lambda info: seen.append((info["i"], info["t"], info["t_next"],
                                                                      info["x"].clone())))
    assert [s[0] for s in seen] == list(range(5))
    assert [s[2] for s in seen] == times[1:].tolist() and torch.equal(seen[-1][3], x)


def test_pi_controller_reject_cap_and_tensor_float_agreement():
    """Rejected steps grow by at most reject_max; the float and (B,) tensor paths give the same ratio."""
    ctrl = PIController(safety=0.9, min_factor=0.2, max_factor=10.0, beta=0.0, reject_max=0.9)
    errs = [0.0, 1e-3, 0.5, 1.0, 4.0, math.inf]
    for ok in (True, False):
        floats = [ctrl.factor(e, 1.0, 2, ok) for e in errs]
        tens = ctrl.factor(torch.tensor(errs, dtype=torch.float64), None, 2, torch.tensor([ok] * len(errs)))
        assert torch.allclose(tens, torch.tensor(floats, dtype=torch.float64), rtol=1e-15, atol=0)
        assert max(floats) <= (10.0 if ok else 0.9) and min(floats) >= 0.2
    # I controller: 0.9 * 0.5^(-1/2)
    assert ctrl.factor(0.5, 1.0, 2, True) == pytest.approx(0.9 * 0.5 ** -0.5, rel=1e-15)
    with pytest.raises(ValueError, match="reject_max"):
        PIController(reject_max=1.5)


def test_fixed_grid_holds_host_and_device_times():
    times = torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)
    grid = FixedGrid(times, torch.zeros(4, 2, dtype=torch.float32))
    assert grid.n == 2 and grid.t_list == [1.0, 0.5, 0.1]
    assert grid.vecs[1].shape == (4,) and grid.vecs[1].dtype == torch.float32 and float(grid.vecs[1][0]) == 0.5


def test_bridge_stack_fresh_draw_when_empty():
    x = torch.zeros(3, 2, dtype=torch.float64)
    stack = BrownianBridgeStack(x)
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = torch.tensor([0.04, 0.01, 0.09], dtype=torch.float64)
    h2, dw = stack.take(torch.arange(3), h, z)
    assert torch.equal(h2, h) and torch.allclose(dw, z * h.sqrt()[:, None])


class _Identity(AbstractFixedGridSolver):
    """x unchanged, with one score call per step (exercises the loop's checks only)."""

    order = 1.0
    stochastic = False

    def step(self, dyn, x, t0, t1, state, dw):
        dyn.score(x, t0)
        return x, None, state


@pytest.mark.parametrize("value,dtype", [(3e38, torch.float32), (1e4, torch.float16)])
def test_finite_state_with_an_overflowing_sum_is_not_an_error(value, dtype):
    """The loop's per-step finiteness flag is the state's sum: huge but finite entries must not raise."""
    sde = sdegen.VPSDE()
    x = torch.full((64, 8), value, dtype=dtype)
    times = torch.linspace(1.0, 0.5, 5)
    out, _, _ = integrate_fixed_grid(_Identity(), Dynamics(sde, CountingScore(lambda x, t: torch.zeros_like(x))),
                                     x, times)
    assert torch.equal(out, x)


def test_first_non_finite_step_is_named():
    sde = sdegen.VPSDE()
    times = torch.linspace(1.0, 0.5, 11)

    def score(x, t):  # NaN in sample 3 from t < 0.72 on (the 7th grid time, step index 6 starts there)
        s = torch.zeros_like(x)
        if float(t[0]) < 0.72:
            s[3] = float("nan")
        return s

    with pytest.raises(NonFiniteError) as err:
        integrate_fixed_grid(ODEEuler(), Dynamics(sde, CountingScore(score)), torch.ones(5, 2), times)
    assert (err.value.step, err.value.sample) == (6, 3)
