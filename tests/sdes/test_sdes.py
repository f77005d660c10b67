"""SDE classes against their closed forms (Song et al. 2021, eq. 11, 12, 9 and App. B)."""

import math

import pytest
import torch

import sdegen
from sdegen import AffineSDE, CustomSDE, SubVPSDE, VESDE, VPSDE

F64 = torch.float64
T_GRID = torch.tensor([0.0, 1e-4, 1e-3, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1.0], dtype=F64)


def vp_closed(t, b0=0.1, b1=20.0):
    B = b0 * t + 0.5 * t**2 * (b1 - b0)
    return math.exp(-0.5 * B), math.sqrt(1 - math.exp(-B))


def subvp_closed(t, b0=0.1, b1=20.0):
    B = b0 * t + 0.5 * t**2 * (b1 - b0)
    return math.exp(-0.5 * B), 1 - math.exp(-B)


def ve_closed(t, smin=0.01, smax=50.0):
    sig = smin * (smax / smin) ** t
    return 1.0, math.sqrt(sig**2 - smin**2)


@pytest.mark.parametrize("sde,closed", [(VPSDE(), vp_closed), (SubVPSDE(), subvp_closed), (VESDE(), ve_closed)])
def test_marginal_matches_closed_form(sde, closed):
    m, s = sde.marginal(T_GRID)
    for ti, mi, si in zip(T_GRID.tolist(), m.tolist(), s.tolist()):
        me, se = closed(ti)
        assert mi == pytest.approx(me, rel=1e-12, abs=1e-14)
        assert si == pytest.approx(se, rel=1e-10, abs=1e-14)


def test_coefficients_closed_form():
    t = T_GRID
    beta = 0.1 + t * 19.9
    x = torch.randn(t.shape[0], 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    vp, svp, ve = VPSDE(), SubVPSDE(), VESDE()
    torch.testing.assert_close(vp.drift(x, t), -0.5 * beta[:, None] * x)
    torch.testing.assert_close(vp.diffusion(t), beta.sqrt())
    B = 0.1 * t + 0.5 * t**2 * 19.9
    torch.testing.assert_close(svp.diffusion(t) ** 2, beta * (1 - torch.exp(-2 * B)))
    sig = 0.01 * (5000.0**t)
    torch.testing.assert_close(ve.diffusion(t), sig * math.sqrt(2 * math.log(5000.0)))
    torch.testing.assert_close(ve.drift(x, t), torch.zeros_like(x))


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), VPSDE(0.5, 5.0, T=2.0),
                                 AffineSDE(a=lambda t: -t, g=lambda t: 1 + t)])
def test_ode_coefs_and_probability_flow_velocity(sde):
    """ode_coefs(t) = (a(t), -g(t)^2/2), and the solvers' velocity a x - g^2/2 s equals f - g^2/2 s."""
    from sdegen.solvers.base import Dynamics

    t = T_GRID * sde.T
    a, h = sde.ode_coefs(t)
    torch.testing.assert_close(a, sde.drift_coef(t), rtol=1e-13, atol=0)
    torch.testing.assert_close(h, -0.5 * sde.diffusion(t) ** 2, rtol=1e-13, atol=0)
    g = torch.Generator().manual_seed(1)
    x, s = (torch.randn(t.shape[0], 3, dtype=F64, generator=g) for _ in range(2))
    v = Dynamics(sde, lambda x_, t_: s).ode_drift(x, t)
    torch.testing.assert_close(v, sde.drift(x, t) - 0.5 * sde.diffusion(t)[:, None] ** 2 * s, rtol=1e-13, atol=1e-13)
    r = Dynamics(sde, lambda x_, t_: s).reverse_drift(x, t)
    torch.testing.assert_close(r, sde.drift(x, t) - sde.diffusion(t)[:, None] ** 2 * s, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), VPSDE(0.5, 5.0, T=2.0)])
def test_marginal_solves_moment_odes(sde):
    """dm/dt = a m and d(s^2)/dt = 2 a s^2 + g^2 (central differences, O(h^2) ~ 1e-9)."""
    t = torch.linspace(0.05, 0.95, 19, dtype=F64) * sde.T
    h = 1e-5
    mp, sp = sde.marginal(t + h)
    mm, sm = sde.marginal(t - h)
    m, s = sde.marginal(t)
    a, g = sde.drift_coef(t), sde.diffusion(t)
    torch.testing.assert_close((mp - mm) / (2 * h), a * m, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close((sp**2 - sm**2) / (2 * h), 2 * a * s**2 + g**2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ref", [VPSDE(), SubVPSDE(), VESDE(), VPSDE(1.0, 1.0)])
def test_numerical_affine_matches_closed_form(ref):
    """A user AffineSDE from callables a(t), g(t) reproduces the closed form within 1e-6 (issue 2)."""
    user = AffineSDE(a=ref.drift_coef, g=ref.diffusion, T=ref.T)
    t = torch.rand(257, dtype=F64, generator=torch.Generator().manual_seed(3)) * ref.T
    t = torch.cat([t, T_GRID * ref.T])
    m_ref, s_ref = ref.marginal(t)
    m, s = user.marginal(t)
    assert (m - m_ref).abs().max() < 1e-6
    assert (s - s_ref).abs().max() < 1e-6
    # relative accuracy of the std once it is not tiny (near t=0 the absolute bound above governs)
    assert ((s - s_ref).abs() / s_ref.clamp_min(5e-2)).max() < 1e-6


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), AffineSDE(a=lambda t: -t, g=lambda t: 1 + t)])
def test_inverse_schedules(sde):
    t = torch.linspace(0.01, 1.0, 50, dtype=F64)
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t)), t, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sde.t_from_sigma(sde.sigma(t)), t, rtol=1e-9, atol=1e-9)
    # d sigma / dt = g^2 / (2 m^2 sigma)
    h = 1e-6
    fd = (sde.sigma(t + h * (t < 1)) - sde.sigma(t - h)) / (h * (1 + (t < 1).to(F64)))
    torch.testing.assert_close(sde.dsigma_dt(t), fd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()])
def test_transition_composes(sde):
    """Kernels compose: (0 -> t1) then (t1 -> t2) equals (0 -> t2)."""
    t1 = torch.tensor([0.2, 0.4], dtype=F64)
    t2 = torch.tensor([0.5, 0.9], dtype=F64)
    r1, q1 = sde.transition(torch.zeros_like(t1), t1)
    r2, q2 = sde.transition(t1, t2)
    m, s = sde.marginal(t2)
    torch.testing.assert_close(r1 * r2, m)
    torch.testing.assert_close((r2 * q1) ** 2 + q2**2, s**2)


def test_vp_discretize_step_is_ddpm_step():
    vp = VPSDE()
    t = torch.full((4,), 0.5, dtype=F64)
    x = torch.ones(4, 2, dtype=F64)
    f, G = vp.discretize_step(x, t, 0.01)
    mt, _ = vp.marginal(t)
    mp, _ = vp.marginal(t - 0.01)
    alpha = (mt / mp) ** 2
    torch.testing.assert_close(f, (alpha.sqrt() - 1)[:, None] * x)
    torch.testing.assert_close(G, (1 - alpha).sqrt())


@pytest.mark.parametrize("pf,c", [(False, 1.0), (True, 0.5)])
def test_reverse_drift(pf, c):
    vp = VPSDE()
    score = lambda x, t: -x * 2.0  # noqa: E731
    rs = vp.reverse(score, probability_flow=pf)
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.rand(5, dtype=F64, generator=torch.Generator().manual_seed(2))
    g2 = vp.diffusion(t) ** 2
    torch.testing.assert_close(rs.drift(x, t), vp.drift(x, t) - c * g2[:, None] * score(x, t))
    expected_g = torch.zeros_like(t) if pf else vp.diffusion(t)
    torch.testing.assert_close(rs.diffusion(t), expected_g)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), CustomSDE(lambda x, t: -x, lambda t: 2.0, prior_std=3.0)])
def test_prior_log_prob_is_density_of_prior_sample(sde):
    gen = torch.Generator().manual_seed(5)
    x = sde.prior_sample((20000, 3), generator=gen, dtype=F64)
    s = sde.prior_std()
    ref = torch.distributions.Normal(0.0, s).log_prob(x).sum(1)
    torch.testing.assert_close(sde.prior_log_prob(x), ref)
    # sample variance within 5 standard errors: SE(var) = s^2 sqrt(2/n)
    var = x.var(0)
    assert ((var - s**2).abs() / (s**2 * math.sqrt(2 / x.shape[0]))).max() < 5
    x2 = sde.prior_sample((20000, 3), generator=torch.Generator().manual_seed(5), dtype=F64)
    assert torch.equal(x, x2)


def test_custom_sde_checks():
    sde = CustomSDE(lambda x, t: -x[:, :1], lambda t: 1.0)
    with pytest.raises(ValueError, match="drift"):
        sde.drift(torch.ones(2, 3), torch.zeros(2))
    with pytest.raises(TypeError, match="drift"):
        CustomSDE(3.0, lambda t: 1.0)


@pytest.mark.parametrize("ctor,match", [
    (lambda: VPSDE(beta_min=-1.0), "beta_min"),
    (lambda: VPSDE(beta_min=0.0), "beta_min"),
    (lambda: VPSDE(beta_min=2.0, beta_max=1.0), "beta_max"),
    (lambda: SubVPSDE(beta_max=float("nan")), "beta_max"),
    (lambda: VESDE(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
    (lambda: VESDE(sigma_min=0.0), "sigma_min"),
    (lambda: VESDE(sigma_max=-3), "sigma_max"),
    (lambda: VPSDE(T=0.0), "T"),
    (lambda: AffineSDE(a=lambda t: t), "both"),
    (lambda: AffineSDE(a=1.0, g=lambda t: t), "callable"),
])
def test_bad_parameters(ctor, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ctor()


def test_bad_time_and_shapes():
    vp = VPSDE()
    with pytest.raises(ValueError, match=r"t must lie in \[0"):
        vp.marginal(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="t must lie"):
        vp.marginal(-0.1)
    with pytest.raises(ValueError, match="shape"):
        vp.prior_sample((3,))
    with pytest.raises(TypeError, match="x must be a floating"):
        vp.prior_log_prob(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        vp.time(torch.zeros(3), torch.zeros(2, 2))


def test_float32_and_scalar_time():
    vp = VPSDE()
    m32, s32 = vp.marginal(torch.tensor([0.5], dtype=torch.float32))
    assert m32.dtype == torch.float32 and s32.dtype == torch.float32
    m, s = vp.marginal(0.5)
    assert m.shape == (1,) and abs(float(s) - vp_closed(0.5)[1]) < 1e-6


@pytest.mark.cuda
def test_cuda_marginal_and_prior():
    dev = torch.device("cuda")
    for sde in (VPSDE(), SubVPSDE(), VESDE(), AffineSDE(a=lambda t: -t, g=lambda t: 1 + t)):
        t = torch.linspace(0, 1, 11, device=dev, dtype=F64)
        m, s = sde.marginal(t)
        assert m.device.type == "cuda" and s.device.type == "cuda"
        mc, sc = sde.marginal(t.cpu())
        torch.testing.assert_close(m.cpu(), mc)
        torch.testing.assert_close(s.cpu(), sc)
        x = sde.prior_sample((8, 2), device=dev, generator=torch.Generator(device=dev).manual_seed(0))
        assert x.device.type == "cuda" and sde.prior_log_prob(x).device.type == "cuda"


def test_top_level_names():
    for name in ("SDE", "AffineSDE", "VPSDE", "SubVPSDE", "VESDE", "GaussianMixture"):
        assert hasattr(sdegen, name)
