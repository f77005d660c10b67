"""The discrete-chain SDE (``sdegen.sdes.discrete.DiscreteVPSDE``): exact at the chain's steps, a VP SDE between.

Moved from ``tests/test_adapters.py`` with the class (issue 15, item 8); ``sdegen.adapters.DiscreteVPSDE``
stays the same class.
"""

import pytest
import torch

import sdegen
from sdegen.sdes.discrete import DiscreteVPSDE

from schedules import cosine_betas, linear_betas

F64 = torch.float64


def test_adapters_and_sdes_name_the_same_class():
    assert sdegen.adapters.DiscreteVPSDE is DiscreteVPSDE is sdegen.sdes.DiscreteVPSDE


@pytest.mark.parametrize("betas", [linear_betas(50), cosine_betas(30)])
def test_discrete_vp_exact_at_training_steps(betas):
    sde = DiscreteVPSDE(betas)
    n = betas.numel()
    t = torch.arange(1, n + 1, dtype=F64) / n
    m, s = sde.marginal(t)
    ab = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(m.square(), ab, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.square(), 1 - ab, rtol=1e-12, atol=0)
    # The exact one-step kernel between neighbouring steps is DDPM's q(x_i | x_{i-1}) = N(sqrt(1-b_i) x, b_i).
    r, q = sde.transition(t - 1.0 / n, t)
    torch.testing.assert_close(r.square(), 1 - betas, rtol=1e-12, atol=0)
    torch.testing.assert_close(q.square(), betas, rtol=1e-9, atol=0)
    torch.testing.assert_close(sde.betas, betas, rtol=1e-12, atol=0)


def test_discrete_vp_interpolation_and_sde_consistency():
    betas = cosine_betas(20)
    sde = DiscreteVPSDE(betas)
    n = 20
    # Midpoints: log abar is the mean of its neighbours (linear interpolation).
    t = (torch.arange(n, dtype=F64) + 0.5) / n
    L = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(torch.log1p(-betas), 0)])
    torch.testing.assert_close(sde.log_alpha_bar(t), 0.5 * (L[:-1] + L[1:]), rtol=1e-12, atol=1e-14)
    # beta(t) = -d log abar / dt (finite difference inside each piece), and g^2 = beta keeps VP: s^2 = 1 - m^2.
    h = 1e-6
    fd = -(sde.log_alpha_bar(t + h) - sde.log_alpha_bar(t - h)) / (2 * h)
    torch.testing.assert_close(sde.beta(t), fd, rtol=1e-6, atol=0)
    torch.testing.assert_close(sde.diffusion(t).square(), sde.beta(t))
    # The base class's numerical marginal from a(t), g(t) alone agrees with the closed form at its
    # table nodes (its quadrature is exact for piecewise-constant beta; its Hermite interpolation
    # between nodes assumes a smooth beta, so only the nodes are compared).
    generic = sdegen.AffineSDE(a=sde.drift_coef, g=sde.diffusion, grid_size=4 * n)
    tt = torch.arange(1, 4 * n + 1, dtype=F64) / (4 * n)
    for a, b in zip(generic.marginal(tt), sde.marginal(tt)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # log-SNR inverse round trip.
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(tt)), tt, rtol=1e-10, atol=1e-12)


def test_discrete_vp_approaches_linear_vp():
    # DDPM's schedule beta_i = beta(t_{i-1/2})/N is the VP SDE's discretization; since
    # log(1 - beta_i) = -beta_i - beta_i^2/2 + ..., the marginals agree to O(1/N).
    vp = sdegen.VPSDE(0.1, 20.0)
    errs = []
    for n in (100, 400):
        i = torch.arange(1, n + 1, dtype=F64)
        betas = (0.1 + (i - 0.5) / n * 19.9) / n     # midpoint rule: beta at the middle of each interval
        sde = DiscreteVPSDE(betas)
        t = torch.linspace(0.05, 1, 20, dtype=F64)
        errs.append(float((sde.marginal(t)[0] - vp.marginal(t)[0]).abs().max()))
    assert errs[1] < errs[0] / 3          # first order in 1/N: a factor 4 for 4x the steps
    assert errs[1] < 0.01


def test_discrete_vp_errors():
    with pytest.raises(ValueError, match="exactly one"):
        DiscreteVPSDE()
    with pytest.raises(ValueError, match="betas"):
        DiscreteVPSDE(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="non-increasing"):
        DiscreteVPSDE(alphas_cumprod=torch.tensor([0.5, 0.9]))
