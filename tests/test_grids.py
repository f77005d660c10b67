"""Time grids: shape, ends, monotonicity, and each grid's defining formula."""

import math

import pytest
import torch

import sdegen
from sdegen import grids

SDES = [sdegen.VPSDE(), sdegen.SubVPSDE(), sdegen.VESDE()]


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("name", list(grids.GRIDS))
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_grid_shape_ends_monotone(sde, name, steps):
    eps = 1e-3
    t = grids.get_grid(name, sde, steps, eps)
    assert t.dtype == torch.float64 and t.shape == (steps + 1,)
    assert float(t[0]) == sde.T and float(t[-1]) == eps
    assert bool((t[1:] < t[:-1]).all())


def test_uniform_and_quadratic_formulas():
    sde, eps, n = sdegen.VPSDE(), 1e-3, 10
    i = torch.arange(n + 1, dtype=torch.float64)
    torch.testing.assert_close(grids.uniform(sde, n, eps), 1.0 - i * (1.0 - eps) / n, rtol=0, atol=1e-15)
    torch.testing.assert_close(grids.quadratic(sde, n, eps), eps + (1 - eps) * (1 - i / n) ** 2, rtol=0, atol=1e-15)


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("rho", [1.0, 7.0])
def test_karras_grid_matches_sigma_formula(sde, rho):
    # sigma(t_i) must equal (smax^(1/rho) + i/n (smin^(1/rho) - smax^(1/rho)))^rho (EDM eq. 5).
    eps, n = 1e-3, 12
    t = grids.karras(sde, n, eps, rho=rho)
    smax, smin = (float(v) for v in sde.sigma(torch.tensor([sde.T, eps], dtype=torch.float64)))
    i = torch.arange(n + 1, dtype=torch.float64)
    expect = (smax ** (1 / rho) + i / n * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    # The inverse sigma -> t is closed form (VP, VE) or 64-step bisection (sub-VP): relative 1e-9.
    torch.testing.assert_close(sde.sigma(t), expect, rtol=1e-9, atol=0)


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_log_snr_grid_is_uniform_in_lambda(sde):
    lam = sde.log_snr(grids.log_snr(sde, 9, 1e-3))
    steps = lam[1:] - lam[:-1]
    torch.testing.assert_close(steps, steps.mean().expand(9), rtol=1e-8, atol=0)


def test_user_grid_and_errors():
    sde = sdegen.VPSDE()
    user = torch.tensor([1.0, 0.5, 0.01])
    assert grids.get_grid(user, sde, 2).dtype == torch.float64
    with pytest.raises(ValueError, match="unknown grid 'cosine'.*uniform, quadratic, log_snr, karras"):
        grids.get_grid("cosine", sde, 10)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        grids.get_grid("uniform", sde, 0)
    with pytest.raises(ValueError, match=r"eps must lie in \(0, T\)"):
        grids.get_grid("uniform", sde, 5, eps=1.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        grids.get_grid(torch.tensor([0.1, 0.5]), sde, 1)
    with pytest.raises(ValueError, match="takes no options"):
        grids.get_grid("uniform", sde, 5, rho=3.0)
    with pytest.raises(ValueError, match="rho must be"):
        grids.get_grid("karras", sde, 5, rho=-1.0)
    with pytest.raises(TypeError, match="needs an AffineSDE"):
        grids.log_snr(sdegen.CustomSDE(lambda x, t: -x, lambda t: torch.ones_like(t)), 5)
    assert math.isclose(float(grids.uniform(sdegen.CustomSDE(lambda x, t: -x, lambda t: torch.ones_like(t)), 4)[1]),
                        1 - (1 - 1e-3) / 4)


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("name", list(grids.GRIDS))
def test_grids_start_at_t_start(sde, name):
    # Explicit t_start= and an enclosing sampling_start give the same grid, from t_start to eps.
    t0, eps = 0.4 * sde.T, 1e-3
    a = grids.get_grid(name, sde, 9, eps, t_start=t0)
    with grids.sampling_start(t0):
        b = grids.get_grid(name, sde, 9, eps)
    assert torch.equal(a, b) and a[0] == t0 and a[-1] == eps and bool((a[1:] < a[:-1]).all())
    assert grids.get_grid(name, sde, 9, eps)[0] == sde.T        # the context is reset on exit


def test_log_snr_and_quadratic_formulas_from_t_start():
    sde = sdegen.VPSDE()
    lam = sde.log_snr(grids.log_snr(sde, 8, 1e-3, t_start=0.5))
    torch.testing.assert_close(lam, torch.linspace(float(lam[0]), float(lam[-1]), 9, dtype=torch.float64),
                               rtol=1e-8, atol=1e-10)
    assert float(lam[0]) == pytest.approx(float(sde.log_snr(torch.tensor([0.5], dtype=torch.float64))), rel=1e-12)
    q = grids.quadratic(sde, 4, 0.1, t_start=0.5)
    torch.testing.assert_close(q, 0.1 + 0.4 * torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64) ** 2)


def test_t_start_errors_in_grids():
    sde = sdegen.VPSDE()
    with pytest.raises(ValueError, match=r"t_start must lie in \(0, T\]"):
        grids.uniform(sde, 4, t_start=1.5)
    with pytest.raises(ValueError, match=r"eps must lie in \(0, t_start\) = \(0, 0.01\)"):
        grids.uniform(sde, 4, 0.05, t_start=0.01)
    with pytest.raises(TypeError, match="t_start must be a real number"):
        grids.karras(sde, 4, t_start=True)
    with pytest.raises(ValueError, match="takes no options"):
        grids.get_grid(torch.tensor([1.0, 0.1]), sde, None, rho=7.0)
