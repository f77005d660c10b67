"""Flow matching / rectified flow as an affine SDE: coefficients, shift, samplers, likelihood, diffusers parity.

Oracle: the exact score of a Gaussian mixture under `FlowMatchingSDE` (sdegen.GaussianMixture works on
any AffineSDE), so every sampler and the likelihood are checked against exact answers.
"""

import math

import pytest
import torch

import sdegen
from sdegen import adapters
from sdegen.parameterization import from_score
from sdegen.sdes.flow import flow_unshift

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- the SDE
def test_coefficients_are_the_straight_path():
    sde = sdegen.FlowMatchingSDE()
    assert sde.T == 1 - 1e-3 and sde.prior_std() == sde.T
    t = torch.linspace(0.0, sde.T, 41, dtype=F64)
    m, s = sde.marginal(t)
    torch.testing.assert_close(m, 1 - t, rtol=0, atol=0)
    torch.testing.assert_close(s, t, rtol=0, atol=0)
    # The general interpolant with autograd derivatives gives the same drift, diffusion and ODE coefs.
    gen = sdegen.InterpolantSDE(lambda u: 1 - u, lambda u: u, T=sde.T)
    tt = t[1:]
    torch.testing.assert_close(gen.drift_coef(tt), sde.drift_coef(tt), rtol=1e-14, atol=0)
    torch.testing.assert_close(gen.diffusion(tt), sde.diffusion(tt), rtol=1e-14, atol=0)
    for a, b in zip(gen.ode_coefs(tt), sde.ode_coefs(tt)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(sde.drift_coef(tt), -1 / (1 - tt))
    torch.testing.assert_close(sde.diffusion(tt).square(), 2 * tt / (1 - tt))


def test_drift_and_diffusion_reproduce_the_marginal():
    # Independent check of a = alpha'/alpha and g^2 = 2 sigma (sigma' - a sigma): a plain AffineSDE
    # given only (a, g) integrates its marginal numerically (Gauss-Legendre tables, O(h^4)); it must
    # give (1 - t, t). Up to t = 0.99 (a = -1/(1-t) is stiff at T) the table error is below 1e-8.
    sde = sdegen.FlowMatchingSDE()
    numeric = sdegen.AffineSDE(a=sde.drift_coef, g=sde.diffusion, T=sde.T, grid_size=4096)
    t = torch.linspace(0.01, 0.99, 50, dtype=F64)
    m, s = numeric.marginal(t)
    torch.testing.assert_close(m, 1 - t, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(s, t, rtol=1e-8, atol=1e-8)


def test_schedule_inverses():
    sde = sdegen.FlowMatchingSDE()
    t = torch.linspace(0.01, sde.T, 30, dtype=F64)
    torch.testing.assert_close(sde.log_snr(t), 2 * torch.log((1 - t) / t))
    torch.testing.assert_close(sde.sigma(t), t / (1 - t))
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t)), t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sde.t_from_sigma(sde.sigma(t)), t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [1.0, 1.5, 0.0])
def test_flow_sde_needs_T_below_one(T):
    with pytest.raises(ValueError, match=r"T < 1|T must be a finite positive"):
        sdegen.FlowMatchingSDE(T=T)


def test_interpolant_validation():
    with pytest.raises(ValueError, match=r"alpha\(t\) > 0.*alpha\(T\) = 0"):
        sdegen.InterpolantSDE(lambda t: 1 - t, lambda t: t, T=1.0)
    with pytest.raises(ValueError, match=r"alpha\(0\) = 1 and sigma\(0\) = 0"):
        sdegen.InterpolantSDE(lambda t: 2 - t, lambda t: t, T=0.5)
    with pytest.raises(ValueError, match="non-increasing SNR"):
        # sigma falls after t = 0.5 while alpha stays 1: the SNR rises, g^2 < 0.
        sdegen.InterpolantSDE(lambda t: torch.ones_like(t), lambda t: t * (1 - t), T=0.9)
    with pytest.raises(TypeError, match=r"not differentiable by autograd.*d_sigma="):
        sdegen.InterpolantSDE(lambda t: 1 - t, lambda t: torch.from_numpy(t.detach().numpy()), T=0.5)
    # Explicit derivatives are used as given (here the cosine path, Nichol & Dhariwal 2021).
    c = 0.5 * math.pi
    sde = sdegen.InterpolantSDE(lambda t: torch.cos(c * t), lambda t: torch.sin(c * t), T=0.99,
                                d_alpha=lambda t: -c * torch.sin(c * t), d_sigma=lambda t: c * torch.cos(c * t))
    t = torch.linspace(0.05, 0.95, 7, dtype=F64)
    # VP-type path (alpha^2 + sigma^2 = 1): a = -c tan(ct), g^2 = 2c tan(ct).
    torch.testing.assert_close(sde.drift_coef(t), -c * torch.tan(c * t))
    torch.testing.assert_close(sde.diffusion(t).square(), 2 * c * torch.tan(c * t))


def test_shift_and_grid_match_the_formula():
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=F64)
    torch.testing.assert_close(sdegen.flow_shift(t, 3.0), 3 * t / (1 + 2 * t), rtol=0, atol=0)
    torch.testing.assert_close(flow_unshift(sdegen.flow_shift(t, 3.0), 3.0), t, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(sdegen.flow_shift(t, 1.0), t)
    sde = sdegen.FlowMatchingSDE()
    grid = sde.grid(8, shift=3.0, eps=0.01)
    assert grid.dtype == F64 and grid.shape == (9,)
    assert float(grid[0]) == sde.T and float(grid[-1]) == 0.01
    assert bool((grid[1:] < grid[:-1]).all())
    u = flow_unshift(grid, 3.0)                 # uniform before the shift
    torch.testing.assert_close(u[1:] - u[:-1], (u[1:] - u[:-1]).mean().expand(8), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="shift must be"):
        sdegen.flow_shift(t, 0.0)
    with pytest.raises(ValueError, match="eps must be"):
        sde.grid(4, eps=1.0)


# ---------------------------------------------------------------------------------------------- velocity
def test_from_flow_with_the_exact_velocity_gives_the_exact_score():
    # Gaussian data N(mu, tau^2 I): E[x0 | x_t = x] = mu + (1-t) tau^2 (x - (1-t) mu) / ((1-t)^2 tau^2 + t^2),
    # and the velocity E[eps - x0 | x_t] = (x - (1-t) E[x0|x]) / t - E[x0|x], written from the data's
    # posterior, not from sdegen's table. Through from_flow it must give the oracle's exact score.
    sde = sdegen.FlowMatchingSDE()
    gm = sdegen.named_mixture("gaussian")                 # N(0.5, 0.5^2 I) in 2-D
    mu, tau2 = 0.5, 0.25
    gen = _gen(0)
    t = 0.02 + 0.95 * torch.rand(64, generator=gen, dtype=F64)
    x = 1.5 * torch.randn(64, 2, generator=gen, dtype=F64)

    def velocity(x, t_model):
        tt = (t_model / 1000)[:, None]                    # time_scale=1000: diffusers-style timesteps
        x0 = mu + (1 - tt) * tau2 * (x - (1 - tt) * mu) / ((1 - tt) ** 2 * tau2 + tt ** 2)
        return (x - (1 - tt) * x0) / tt - x0

    _, score_fn = adapters.from_flow(velocity, sde, time_scale=1000.0)
    exact = gm.score(x, t, sde)
    torch.testing.assert_close(score_fn(x, t), exact, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(from_score("flow_velocity", exact, x, t, sde), velocity(x, 1000 * t),
                               rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------- samplers
N_SAMPLES = 4000


def _moments_ok(x, gm, n_se=4.0):
    r"""Sample mean and variances within ``n_se`` standard errors of the mixture's exact values.

    SE of a mean: sqrt(var / n); of a variance: var sqrt(2 / n) (Gaussian approximation; the
    8-Gaussian mixture has kurtosis below the Gaussian's, so this overstates the SE slightly).
    """
    n = x.shape[0]
    mean, var = gm.mean(), gm.covariance().diagonal()
    z_mean = (x.mean(0) - mean) / (var / n).sqrt()
    z_var = (x.var(0) - var) / (var * math.sqrt(2 / n))
    return bool((z_mean.abs() < n_se).all() and (z_var.abs() < n_se).all()), (z_mean.tolist(), z_var.tolist())


@pytest.mark.parametrize("method, options", [
    ("ode_euler", {"steps": 40}),
    ("dpm_solver", {"steps": 15}),
    ("euler_maruyama", {"grid": "shift3"}),
], ids=["ode_euler", "dpm_solver", "euler_maruyama"])
def test_exact_score_reproduces_the_data(method, options):
    # Measured (seeds 0-2): |variance error| <= 4.1 % (ode_euler, 40 steps), <= 2.9 % (dpm_solver, 15),
    # <= 2.4 % (euler_maruyama, 80 steps on the shift-3 grid), against an SE of 2.2 % at n = 4000
    # (the check allows 4 SE = 8.9 %).
    sde = sdegen.FlowMatchingSDE()
    gm = sdegen.named_mixture("8gaussians")
    if options.get("grid") == "shift3":
        options = {"grid": sde.grid(80, shift=3.0)}      # fine near T, where the reverse SDE is stiff
    res = sdegen.sample(sde, gm.score_fn(sde), (N_SAMPLES, 2), method=method, generator=_gen(1), dtype=F64,
                        **options)
    assert res.samples.dtype == F64
    ok, z = _moments_ok(res.samples, gm)
    assert ok, z
    # Power: the same sampler with the exact score of a mixture whose means are x 1.1 (variance
    # +21 %, 9 SE) must fail the check.
    far = sdegen.GaussianMixture(1.1 * gm.means, stds=0.2, dtype=F64)
    if method == "ode_euler":
        wrong = sdegen.sample(sde, far.score_fn(sde), (N_SAMPLES, 2), method=method, generator=_gen(1), dtype=F64,
                              **options)
        assert not _moments_ok(wrong.samples, gm)[0]


def test_log_likelihood_is_the_oracles_exact_log_p():
    # Exact score + exact p_T: only the ODE error remains (~1e-5 nats/dim at rtol = atol = 1e-6);
    # with the SDE's N(0, T^2 I) prior the dropped (1-T) x0 part costs < 1e-2 nats here.
    sde = sdegen.FlowMatchingSDE()
    gm = sdegen.named_mixture("8gaussians")
    x = gm.sample(6, generator=_gen(3))
    truth = gm.log_prob_t(x, 1e-5, sde)
    res = sdegen.log_likelihood(sde, gm.score_fn(sde), x, rtol=1e-6, atol=1e-6, eps=1e-5,
                                prior=lambda z: gm.log_prob_t(z, sde.T, sde))
    assert ((res.log_prob - truth).abs() / gm.dim).max() < 1e-3
    res_sde = sdegen.log_likelihood(sde, gm.score_fn(sde), x, rtol=1e-6, atol=1e-6, eps=1e-5)
    assert (res_sde.log_prob - truth).abs().max() < 1e-2


def test_log_likelihood_on_a_general_interpolant():
    # The cosine path with autograd derivatives: the oracle's log p is reproduced as well.
    c = 0.5 * math.pi
    sde = sdegen.InterpolantSDE(lambda t: torch.cos(c * t), lambda t: torch.sin(c * t), T=0.999)
    gm = sdegen.named_mixture("gaussian")
    x = gm.sample(4, generator=_gen(4))
    res = sdegen.log_likelihood(sde, gm.score_fn(sde), x, rtol=1e-6, atol=1e-6, eps=1e-4,
                                prior=lambda z: gm.log_prob_t(z, sde.T, sde))
    assert ((res.log_prob - gm.log_prob_t(x, 1e-4, sde)).abs() / gm.dim).max() < 1e-3


# ---------------------------------------------------------------------------------------------- diffusers
class _TinyVelocity(torch.nn.Module):
    """A random 2-layer velocity net u(x, timestep) with a sinusoidal time input (float64)."""

    def __init__(self, dim=4, hidden=32, seed=0):
        super().__init__()
        g = _gen(seed)
        self.w1 = torch.nn.Parameter(0.5 * torch.randn(dim + 2, hidden, generator=g, dtype=F64))
        self.w2 = torch.nn.Parameter(0.5 * torch.randn(hidden, dim, generator=g, dtype=F64))

    def forward(self, x, timestep):
        tt = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1).expand(x.shape[0]) / 1000
        h = torch.cat([x, torch.sin(3 * tt)[:, None], torch.cos(3 * tt)[:, None]], 1)
        return torch.tanh(h @ self.w1) @ self.w2


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_parity_with_diffusers_flow_match_euler(shift):
    # Same model, same times, same x_T: diffusers' FlowMatchEulerDiscreteScheduler loop and sdegen's
    # ode_euler on FlowMatchingSDE.grid(N, shift) agree. The scheduler keeps sigmas in float32 and
    # casts the sample to float32 in every step, so the agreement is to float32 rounding (~1e-6
    # relative after 12 steps), not float64. Its final step (sigma -> 0) is x - t u = the x0 prediction.
    diffusers = pytest.importorskip("diffusers")
    sde = sdegen.FlowMatchingSDE()
    N, eps = 12, 0.02
    grid = sde.grid(N, shift=shift, eps=eps)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=flow_unshift(grid, shift).tolist())    # the scheduler applies the shift itself
    torch.testing.assert_close(sched.sigmas[:-1].to(F64), grid, rtol=1e-6, atol=1e-7)
    assert float(sched.sigmas[-1]) == 0.0
    torch.testing.assert_close(sched.timesteps.to(F64), 1000 * grid, rtol=1e-6, atol=1e-4)

    net = _TinyVelocity()
    x_T = sde.prior_sample((16, 4), generator=_gen(5), dtype=F64)
    x = x_T.clone()
    with torch.no_grad():
        for k, ts in enumerate(sched.timesteps):
            if k == N:
                before_last = x.clone()
            x = sched.step(net(x, ts), ts, x, return_dict=False)[0]
    _, score_fn = adapters.from_flow(net, sde, time_scale=1000.0)
    res = sdegen.sample(sde, score_fn, x_T.shape, method="ode_euler", grid=grid, x_T=x_T)
    assert res.nfe == N and res.samples.dtype == F64
    torch.testing.assert_close(res.samples, before_last, rtol=1e-5, atol=1e-5)
    # The scheduler's last Euler step to sigma = 0 is the x0 prediction at t = eps.
    t_eps = torch.full((16,), eps, dtype=F64)
    with torch.no_grad():
        x0_hat = from_score("x0", score_fn(res.samples, t_eps), res.samples, t_eps, sde)
    torch.testing.assert_close(x0_hat, x, rtol=1e-5, atol=1e-5)


def test_every_method_runs_on_the_flow_sde():
    # Contract on the T < 1 endpoint: every sampler in sdegen.METHODS starts at T = 0.999 and returns
    # finite samples of the requested shape and dtype (distributions are checked above for three).
    # The external backends (torchdiffeq, scipy, torchsde) integrate the same drift as rk45 and
    # euler_maruyama; they are left out because importing them costs ~2 s here.
    sde = sdegen.FlowMatchingSDE()
    gm = sdegen.named_mixture("gaussian")
    for method, spec in sdegen.METHODS.items():
        if method in ("torchdiffeq", "scipy", "torchsde"):
            continue
        options = {"steps": 8} if spec.fixed_grid else {}
        res = sdegen.sample(sde, gm.score_fn(sde), (16, 2), method=method, generator=_gen(6), dtype=F64, **options)
        assert res.samples.shape == (16, 2) and res.samples.dtype == F64, method
        assert bool(torch.isfinite(res.samples).all()), method
