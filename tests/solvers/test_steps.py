r"""Step rules checked against the mathematics: single-step formulas, ODE orders, EM's weak error.

Gaussian data $x_0 \sim \mathcal N(\mu, v I)$ under an affine SDE has $p_t = \mathcal N(m\mu, \sigma_t^2 I)$ with
$\sigma_t^2 = m^2 v + s^2$ and the exact score $-(x - m\mu)/\sigma_t^2$. The probability-flow ODE then
keeps $(x - m\mu)/\sigma_t$ constant (differentiate: both $y = x - m\mu$ and $\sigma_t$ obey
$\dot u = (a + g^2/(2\sigma_t^2))\,u$), which gives the exact reference for the order tests, and
Euler–Maruyama is a linear Gaussian recursion whose mean and variance are computed exactly below.
"""

from __future__ import annotations

import math

import pytest
import torch

import sdegen
from sdegen.sampling import sample
from sdegen.solvers.base import CountingScore, Dynamics
from sdegen.solvers.correctors import AnnealedLangevinCorrector, LangevinCorrector, PredictorCorrector
from sdegen.solvers.ode_steps import ODEEuler, ODEHeun
from sdegen.solvers.sde_steps import (Ancestral, Euler, EulerMaruyama, ReverseDiffusion, ancestral_table,
                                      ddpm_ancestral_table)

MU, V = 0.5, 0.25          # data N(0.5, 0.5^2 I): named_mixture("gaussian")


def gaussian_score(sde):
    def score(x, t):
        m, s = sde.marginal(t)
        var = m.square() * V + s.square()
        return -(x - m[:, None] * MU) / var[:, None]
    return score


def exact_flow(sde, x_T, t_end):
    """The exact probability-flow map from T to t_end for Gaussian data."""
    T = torch.full((x_T.shape[0],), sde.T, dtype=x_T.dtype)
    t = torch.full_like(T, t_end)
    mT, sT = sde.marginal(T)
    m, s = sde.marginal(t)
    sig_T = (mT.square() * V + sT.square()).sqrt()
    sig = (m.square() * V + s.square()).sqrt()
    return m[:, None] * MU + (sig / sig_T)[:, None] * (x_T - mT[:, None] * MU)


def fitted_slope(hs, errs):
    lh, le = torch.tensor(hs).log(), torch.tensor(errs).log()
    return float(((lh - lh.mean()) * (le - le.mean())).sum() / (lh - lh.mean()).square().sum())


@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.SubVPSDE(), sdegen.VESDE(sigma_max=10.0)],
                         ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("method,order", [("ode_euler", 1.0), ("ode_heun", 2.0)])
def test_ode_order(sde, method, order):
    """Global error at eps against the exact flow; fitted slope of log error on log h within 0.25."""
    eps = 1e-2
    x_T = sde.prior_sample((64, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = exact_flow(sde, x_T, eps)
    steps = [32, 64, 128, 256]
    errs = []
    for n in steps:
        res = sample(sde, gaussian_score(sde), x_T.shape, method=method, steps=n, eps=eps, x_T=x_T)
        errs.append(float((res.samples - ref).abs().max()))
    slope = fitted_slope([1 / n for n in steps], errs)
    assert abs(slope - order) < 0.25, (slope, errs)


def em_moments(sde, n_steps, eps, denoise):
    r"""Exact mean and variance (per coordinate) of Euler–Maruyama's output for Gaussian data.

    Step $t_0 \to t_1$: $x_1 = c\,x_0 + d + g\,\Delta w$ with $c = 1 + (a + g^2/\sigma^2)\Delta t$,
    $d = -g^2 m \mu \Delta t/\sigma^2$ (all at $t_0$), so $M_1 = cM_0 + d$ and $V_1 = c^2V_0 + g^2|\Delta t|$.
    Tweedie at eps: $\hat x_0 = ((1 - s^2/\sigma^2)x + s^2 m\mu/\sigma^2)/m$.
    """
    times = torch.linspace(sde.T, eps, n_steps + 1, dtype=torch.float64)
    M, Var = 0.0, sde.prior_std() ** 2
    for k in range(n_steps):
        t0 = times[k:k + 1]
        dt = float(times[k + 1] - times[k])
        a = float(sde.drift_coef(t0))
        g2 = float(sde.diffusion(t0).square())
        m, s = (float(v) for v in sde.marginal(t0))
        sig2 = m * m * V + s * s
        c = 1 + (a + g2 / sig2) * dt
        M, Var = c * M - g2 * m * MU * dt / sig2, c * c * Var + g2 * abs(dt)
    if denoise:
        m, s = (float(v) for v in sde.marginal(times[-1:]))
        sig2 = m * m * V + s * s
        c = (1 - s * s / sig2) / m
        M, Var = c * M + s * s * MU / sig2, c * c * Var
    return M, Var


@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.VESDE(sigma_max=10.0)], ids=["vp", "ve"])
def test_em_matches_exact_gaussian_recursion(sde):
    """With 8 steps EM is visibly biased; its samples match the exact recursion, not the data law.

    40,000 samples in 2-D (80,000 coordinates): se(mean) = sqrt(Var/80000), se(var) ~ Var*sqrt(2/80000);
    |z| < 5 on both.
    """
    n = 40_000
    res = sample(sde, gaussian_score(sde), (n, 2), method="euler_maruyama", steps=8, dtype=torch.float64,
                 generator=torch.Generator().manual_seed(3))
    M, Var = em_moments(sde, 8, 1e-3, denoise=True)
    x = res.samples.reshape(-1)
    N = x.numel()
    z_mean = (float(x.mean()) - M) / math.sqrt(Var / N)
    z_var = (float(x.var()) - Var) / (Var * math.sqrt(2 / N))
    assert abs(z_mean) < 5 and abs(z_var) < 5, (z_mean, z_var, M, Var)
    # the recursion is far from the data law at 8 steps, so the check is not vacuous
    assert abs(Var - V) > 10 * Var * math.sqrt(2 / N) or abs(M - MU) > 10 * math.sqrt(Var / N)


def test_em_weak_error_first_order():
    """Weak error |E x - mu| + |Var x - v| of EM (no denoising) falls like h: fitted slope 1 +- 0.25."""
    sde = sdegen.VPSDE()
    steps = [50, 100, 200, 400]
    errs = []
    for n in steps:
        M, Var = em_moments(sde, n, 1e-3, denoise=False)
        _, s = sde.marginal(torch.tensor([1e-3], dtype=torch.float64))
        m = math.exp(-0.5 * float(sde.int_beta(torch.tensor(1e-3, dtype=torch.float64))))
        errs.append(abs(M - m * MU) + abs(Var - (m * m * V + float(s) ** 2)))
    slope = fitted_slope([1 / n for n in steps], errs)
    assert abs(slope - 1.0) < 0.25, (slope, errs)


def _dyn(sde, score=None):
    return Dynamics(sde, CountingScore(score or gaussian_score(sde)))


def test_ve_ancestral_step_is_smld():
    """VE: mean x + (s0^2 - s1^2) score, variance s1^2 (s0^2 - s1^2)/s0^2 (Song et al. 2021, eq. 47)."""
    sde = sdegen.VESDE(sigma_max=10.0)
    times = torch.tensor([0.7, 0.4], dtype=torch.float64)
    a, b, c = ancestral_table(sde, times)[0]
    _, s = sde.marginal(times)
    s0, s1 = float(s[0]), float(s[1])
    assert float(a) == pytest.approx(1.0, rel=1e-12)
    assert float(b) == pytest.approx(s0**2 - s1**2, rel=1e-10)
    assert float(c) ** 2 * 0.3 == pytest.approx(s1**2 * (s0**2 - s1**2) / s0**2, rel=1e-10)


def test_ddpm_table_matches_ho_et_al():
    """DDPM: mean (x + beta_i score)/sqrt(alpha_i), variance beta_tilde_i, zero on the last step."""
    betas = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    times = torch.tensor([1.0, 2 / 3, 1 / 3, 0.0], dtype=torch.float64)
    tab = ddpm_ancestral_table(ab, times)
    for k, i in enumerate([3, 2, 1]):
        beta, alpha = betas[i - 1], 1 - betas[i - 1]
        ab_prev = ab[i - 2] if i > 1 else torch.tensor(1.0, dtype=torch.float64)
        tilde = beta * (1 - ab_prev) / (1 - ab[i - 1])
        assert torch.allclose(tab[k], torch.stack([1 / alpha.sqrt(), beta / alpha.sqrt(), (tilde * 3).sqrt()]),
                              rtol=1e-12, atol=1e-15)
    assert float(tab[-1, 2]) == 0.0


def test_reverse_diffusion_equals_em_without_kernel():
    """For a non-affine SDE the SDE's discretization is Euler's, so the two predictors coincide."""
    sde = sdegen.CustomSDE(drift=lambda x, t: -x ** 3, diffusion=lambda t: 1.0 + t)
    dyn = _dyn(sde, lambda x, t: -x)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t0, t1 = torch.full((8,), 0.6, dtype=torch.float64), torch.full((8,), 0.5, dtype=torch.float64)
    dw = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * math.sqrt(0.1)
    a, _, _ = EulerMaruyama().step(dyn, x, t0, t1, None, dw)
    b, _, _ = ReverseDiffusion().step(dyn, x, t0, t1, None, dw)
    expected = x + (-x ** 3 - 1.6 ** 2 * -x) * -0.1 + 1.6 * dw
    assert torch.allclose(a, expected, atol=1e-12) and torch.allclose(b, expected, atol=1e-12)


@pytest.mark.parametrize("tabulated", [False, True])
def test_em_and_ode_euler_are_one_euler_on_two_terms(tabulated):
    r"""EM and ODE Euler are the one ``Euler`` step on the reverse SDE and on its probability flow: from
    the same state their results differ by $-\tfrac12 g^2 s\,\Delta t + g\,\Delta w$ (the drifts differ by
    $-\tfrac12 g^2 s$; only the SDE has noise), and ODE Euler ignores ``dw``. Float64 rounding only."""
    sde = sdegen.VPSDE()
    score = gaussian_score(sde)
    dyn = _dyn(sde, score)
    times = torch.tensor([0.8, 0.6, 0.3], dtype=torch.float64)
    em, ode = ((cls.tabulated(sde, times) if tabulated else cls()) for cls in (EulerMaruyama, ODEEuler))
    assert isinstance(em, Euler) and isinstance(ode, Euler)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t0, t1 = times[1].expand(8), times[2].expand(8)
    dw = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * math.sqrt(0.3)
    state = 1 if tabulated else None                     # the second step, t = 0.6 -> 0.3
    a, _, _ = em.step(dyn, x, t0, t1, state, dw)
    b, _, _ = ode.step(dyn, x, t0, t1, state, dw)
    c, _, _ = ode.step(dyn, x, t0, t1, state, None)
    g = sde.diffusion(t0)[:, None]
    assert torch.allclose(a - b, -0.5 * g ** 2 * score(x, t0) * -0.3 + g * dw, rtol=0, atol=1e-12)
    assert torch.equal(b, c)


def test_declared_orders_and_evals():
    assert (EulerMaruyama.order, EulerMaruyama.stochastic, EulerMaruyama.evals_per_step) == (1.0, True, 1)
    assert (ODEEuler.order, ODEEuler.stochastic) == (1.0, False)
    assert (ODEHeun.order, ODEHeun.evals_per_step) == (2.0, 2)
    pc = PredictorCorrector(ODEHeun(), LangevinCorrector(), 3, draw=lambda k: None)
    assert (pc.order, pc.stochastic, pc.evals_per_step) == (2.0, False, 5)
    assert Ancestral(torch.zeros(1, 3)).evals_per_step == 1


@pytest.mark.parametrize("corrector", [LangevinCorrector(snr=0.2), AnnealedLangevinCorrector(snr=0.2)])
def test_corrector_step_is_per_sample(corrector):
    """A sample's Langevin step does not depend on its batch-mates (the reference uses batch means)."""
    sde = sdegen.VPSDE()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, generator=g, dtype=torch.float64)
    other = torch.randn(1, 4, generator=g, dtype=torch.float64) * 7
    t = torch.full((3,), 0.5, dtype=torch.float64)
    alpha = torch.full((3,), 0.99, dtype=torch.float64)
    dyn = _dyn(sde)
    out = corrector.correct(dyn, x, t, alpha, noise)
    x2 = torch.cat([x[:2], other])
    out2 = corrector.correct(dyn, x2, t, alpha, noise)
    assert torch.equal(out[:2], out2[:2])


def test_langevin_snr_rule_per_sample_value():
    r"""$\epsilon_b = 2\alpha_b r^2 s(t)^2$ (SNR rule at the bound $d/s^2$ of the expected score norm) and
    $x + \epsilon s + \sqrt{2\epsilon} z$, sample by sample."""
    sde = sdegen.VESDE()
    x = torch.tensor([[1.0, 2.0], [0.0, -3.0]], dtype=torch.float64)
    noise = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)
    dyn = _dyn(sde, lambda x, t: -x)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    alpha = torch.tensor([1.0, 0.5], dtype=torch.float64)
    out = LangevinCorrector(snr=0.3).correct(dyn, x, t, alpha, noise)
    for b in range(2):
        eps = 2 * float(alpha[b]) * (0.3 * float(sde.marginal(t)[1][b])) ** 2
        assert torch.allclose(out[b], x[b] - eps * x[b] + math.sqrt(2 * eps) * noise[b], atol=1e-12)


def test_langevin_step_does_not_use_its_own_noise_norm():
    """Injected noise variance per coordinate is 2*eps exactly: the step is independent of z.

    With eps from the realised ||z_b|| the variance of sqrt(2 eps) z_j would be (d+2)/d times too large
    (2x in 2-D). 200,000 draws: se of the variance estimate is sqrt(2/200000) = 0.3 %; tolerance 5 se.
    """
    sde = sdegen.VESDE()
    n, d = 200_000, 2
    x = torch.ones(n, d, dtype=torch.float64)
    dyn = _dyn(sde, lambda x, t: torch.zeros_like(x) + 1.0)     # eps = 2 * (0.5 s(t))^2
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.full((n,), 0.5, dtype=torch.float64)
    out = LangevinCorrector(snr=0.5).correct(dyn, x, t, torch.ones(n, dtype=torch.float64), noise)
    eps = 2 * (0.5 * float(sde.marginal(t[:1])[1])) ** 2
    ratio = float((out - x - eps).var()) / (2 * eps)
    assert abs(ratio - 1) < 5 * math.sqrt(2 / (n * d)), ratio


def test_langevin_zero_score_takes_only_the_noise_step():
    """A zero score (between modes) moves x by the noise term only: the step has no 1/||s|| singularity."""
    sde = sdegen.VESDE()
    dyn = _dyn(sde, lambda x, t: torch.zeros_like(x))
    x = torch.ones(2, 2, dtype=torch.float64)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    out = LangevinCorrector().correct(dyn, x, t, torch.ones(2, dtype=torch.float64), torch.ones_like(x))
    eps = 2 * (0.16 * float(sde.marginal(t[:1])[1])) ** 2
    torch.testing.assert_close(out, x + math.sqrt(2 * eps), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.SubVPSDE(), sdegen.VESDE(sigma_max=10.0)],
                         ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("cls", [EulerMaruyama, ReverseDiffusion, ODEEuler, ODEHeun])
def test_tabulated_rule_equals_generic(sde, cls):
    """The precomputed-coefficient fast path is the same update as the generic rule (float64)."""
    times = torch.linspace(1.0, 1e-3, 6, dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, 2, generator=g, dtype=torch.float64)
    dyn = _dyn(sde)
    fast, slow = cls.tabulated(sde, times), cls()
    state = fast.init_state(dyn, x, times[:1].expand(16))
    for k in range(5):
        t0, t1 = times[k].expand(16), times[k + 1].expand(16)
        dw = torch.randn(16, 2, generator=g, dtype=torch.float64) * float(times[k] - times[k + 1]).__abs__() ** 0.5
        a, _, state = fast.step(dyn, x, t0, t1, state, dw if cls.stochastic else None)
        b, _, _ = slow.step(dyn, x, t0, t1, None, dw if cls.stochastic else None)
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), (k, (a - b).abs().max())
        x = a


def test_pc_tabulated_alpha_equals_per_step_alpha():
    """PC's precomputed alpha_k = m(t_k)^2/m(t_{k+1})^2 gives the same steps as computing it each step."""
    from sdegen.solvers.correctors import langevin_alpha

    sde = sdegen.SubVPSDE()
    times = torch.linspace(1.0, 1e-3, 5, dtype=torch.float64)
    draws = torch.randn(4, 8, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    outs = []
    for alphas in (None, tuple(langevin_alpha(sde, times[:-1], times[1:]).tolist())):
        pc = PredictorCorrector(ODEEuler(), LangevinCorrector(0.2), 1, draw=lambda k: draws[k], alphas=alphas)
        x, state, dyn = x0, None, _dyn(sde)
        state = pc.init_state(dyn, x, times[0].expand(8))
        for k in range(4):
            x, _, state = pc.step(dyn, x, times[k].expand(8), times[k + 1].expand(8), state, None)
        outs.append(x)
    assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)
