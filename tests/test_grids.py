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
