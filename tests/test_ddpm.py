r"""The DDPM chain (issue 4): schedules, posterior, KL identities, the VLB and its limits, DDIM.

Exact references come from Gaussian data $x_0 \sim \mathcal N(\mu, s^2 I)$: under the chain
$x_i \sim \mathcal N(\sqrt{\bar\alpha_i}\mu, v_i I)$ with $v_i = \bar\alpha_i s^2 + 1 - \bar\alpha_i$, the
exact noise prediction is linear, $\epsilon^*(x_i, i) = \sqrt{1-\bar\alpha_i}(x_i - \sqrt{\bar\alpha_i}\mu)/v_i$,
and every term of the VLB has a closed-form expectation (``_analytic_vlb``).
"""

import copy
import math
import pickle

import numpy as np
import pytest
import torch

import sdegen
from sdegen.ddpm import DDPM
from sdegen.gaussian import gaussian_kl
from sdegen.vlb import continuous_vlb

F64 = torch.float64
MU, S2 = 0.5, 0.25          # the data N(0.5, 0.5^2 I) of named_mixture("gaussian")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def gaussian_eps(ddpm, mu=MU, s2=S2):
    """The exact eps*(x, i) of data N(mu, s2 I) under ``ddpm``'s own chain (also a mis-specified model)."""
    ab_all = ddpm.alpha_bar

    def eps_model(x, i):
        ab = ab_all.to(x)[i].reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s2 + 1 - ab)

    return eps_model


def _analytic_vlb(ddpm, x0, d, mu_m=MU, s2_m=S2, *, expected=False, terms=False):
    r"""Expected DDPM VLB (nats) at data points ``x0`` (``(B, d)``) for the model eps of N(mu_m, s2_m).

    With $x_i = \sqrt{\bar\alpha}x_0 + \sqrt{1-\bar\alpha}\epsilon$ and $v = \bar\alpha s_m^2 + 1-\bar\alpha$:
    $x_0 - \hat x_0 = (x_0-\mu_m)(1-\bar\alpha)/v - \sqrt{\bar\alpha(1-\bar\alpha)}\,s_m^2\epsilon/v$, so
    $\mathbb E\|x_0-\hat x_0\|^2 = \|x_0-\mu_m\|^2(1-\bar\alpha)^2/v^2 + d\,\bar\alpha(1-\bar\alpha)s_m^4/v^2$.
    Each $L_{i-1}$ is its SNR form, $L_0$ the Gaussian decoder with variance $\beta_1$, $L_T$ exact.
    ``expected=True``: also average over $x_0 \sim \mathcal N(\mu, s^2 I)$ (``x0`` is then ignored),
    i.e. $\|x_0-\mu_m\|^2 \to d(s^2 + (\mu-\mu_m)^2)$ and $\|x_0\|^2 \to d(s^2+\mu^2)$.
    ``terms=True``: return ``(L_T, (B, N) terms)`` with column j = L_j (column 0 = the decoder L_0).
    """
    ab = ddpm.alpha_bar
    N = ddpm.n_steps
    betas = torch.cat([torch.zeros(1, dtype=F64), ddpm.betas])
    post = torch.cat([torch.zeros(1, dtype=F64), ddpm.posterior_variance])
    sig2 = post if ddpm.variance == "posterior" else betas
    if expected:
        dev2 = torch.tensor([[d * (S2 + (MU - mu_m) ** 2)]], dtype=F64)
        x0sq = torch.tensor([d * (S2 + MU ** 2)], dtype=F64)
    else:
        dev2 = (x0 - mu_m).square().sum(1)[:, None]                           # (B, 1)
        x0sq = x0.square().sum(1)
    v = ab * s2_m + 1 - ab
    err = dev2 * (1 - ab).square() / v.square() + d * ab * (1 - ab) * s2_m ** 2 / v.square()   # (B, N+1)
    snr = ab / (1 - ab)
    i = torch.arange(2, N + 1)
    r = post[i] / sig2[i]
    kl = 0.5 * r * (snr[i - 1] - snr[i]) * err[:, i] + 0.5 * d * (r - 1 - r.log())
    L0 = 0.5 * d * math.log(2 * math.pi * float(betas[1])) + err[:, 1] / (2 * betas[1])
    abN = ab[N]
    LT = 0.5 * (abN * x0sq + d * ((1 - abN) - 1 - torch.log(1 - abN)))
    if terms:
        return LT, torch.cat([L0[:, None], kl], 1)
    return kl.sum(1) + L0 + LT


def _nll(x0, mu=MU, s2=S2):
    d = x0.shape[1]
    return 0.5 * ((x0 - mu).square().sum(1) / s2 + d * math.log(2 * math.pi * s2))


# ---------------------------------------------------------------------- schedules
def test_linear_schedule_is_the_discretized_vp():
    # The must-show: the DDPM schedule 1e-4 .. 0.02 over 1000 steps IS VPSDE(0.1, 20) with N = 1000.
    assert torch.equal(DDPM.linear(1000, 1e-4, 0.02).betas, sdegen.VPSDE(0.1, 20).discretize(1000).betas)
    # The general map beta_i = (beta_min + (i-1)/(N-1)(beta_max - beta_min)) T/N, here with T = 2.
    vp, N = sdegen.VPSDE(0.5, 7.0, T=2.0), 50
    i = torch.arange(1, N + 1, dtype=F64)
    expected = (0.5 + (i - 1) / (N - 1) * 6.5) * 2.0 / N
    ddpm = vp.discretize(N)
    torch.testing.assert_close(ddpm.betas, expected, rtol=1e-14, atol=0)
    assert ddpm.T == 2.0 and ddpm.n_steps == N


def test_schedule_tables_and_step_time_map():
    ddpm = DDPM.linear(200, 1e-3, 0.05)
    b = ddpm.betas
    torch.testing.assert_close(ddpm.alphas, 1 - b, rtol=0, atol=1e-16)
    torch.testing.assert_close(ddpm.alphas_cumprod, torch.cumprod(1 - b, 0), rtol=1e-13, atol=0)
    assert ddpm.alpha_bar[0] == 1 and torch.equal(ddpm.alpha_bar[1:], ddpm.alphas_cumprod)
    ab_prev = ddpm.alpha_bar[:-1]
    torch.testing.assert_close(ddpm.posterior_variance, b * (1 - ab_prev) / (1 - ddpm.alphas_cumprod),
                               rtol=1e-12, atol=0)
    assert ddpm.posterior_variance[0] == 0                                     # last step is noiseless
    snr = ddpm.snr(torch.arange(0, 201))
    assert math.isinf(float(snr[0])) and torch.all(snr[1:-1] > snr[2:])        # SNR decreasing in i
    # Step <-> time: t_i = iT/N and back by rounding; sub-half-step times map to step 1.
    ddpm = DDPM.linear(40, T=2.0)
    i = torch.arange(0, 41)
    t = ddpm.step_to_time(i)
    torch.testing.assert_close(t, i.to(F64) * 0.05)
    assert torch.equal(ddpm.time_to_step(t[1:]), i[1:])
    assert torch.equal(ddpm.time_to_step(torch.tensor([0.0, 0.049, 0.051, 1.974, 2.0])),
                       torch.tensor([1, 1, 1, 39, 40]))


def test_cosine_schedule():
    N, s = 100, 0.008
    ddpm = DDPM.cosine(N, s)
    u = torch.arange(N + 1, dtype=F64) / N
    f = torch.cos((u + s) / (1 + s) * math.pi / 2).square()
    ab = f / f[0]
    # beta is clipped at 0.999 only at the very end (where f -> 0); elsewhere abar_i = f(i)/f(0).
    torch.testing.assert_close(ddpm.alphas_cumprod[:-1], ab[1:-1], rtol=1e-12, atol=0)
    assert float(ddpm.betas.max()) <= 0.999


def test_from_alphas_cumprod_roundtrip():
    ddpm = DDPM.linear(30, 1e-3, 0.2)
    again = DDPM.from_alphas_cumprod(ddpm.alphas_cumprod)
    torch.testing.assert_close(again.betas, ddpm.betas, rtol=1e-12, atol=0)


def test_ddpm_is_immutable_and_final():
    ddpm = DDPM.linear(10)
    with pytest.raises(AttributeError, match="immutable"):
        ddpm.variance = "beta"
    b = ddpm.betas
    b[0] = 0.5                                     # a returned copy: the chain is unchanged
    assert ddpm.betas[0] == 1e-4
    with pytest.raises(TypeError, match="final"):
        class Sub(DDPM):                           # noqa: F841
            pass
    # copy, deepcopy and pickle rebuild an equal chain
    for twin in (copy.copy(ddpm), copy.deepcopy(ddpm), pickle.loads(pickle.dumps(ddpm))):
        assert torch.equal(twin.betas, ddpm.betas) and twin.T == ddpm.T and twin.variance == ddpm.variance


@pytest.mark.parametrize("call, exc, text", [
    (lambda: DDPM([0.1, 1.0]), ValueError, "betas"),
    (lambda: DDPM([]), ValueError, "betas"),
    (lambda: DDPM([0.1], variance="learned"), ValueError, "variance"),
    (lambda: DDPM.linear(0), ValueError, "n_steps"),
    (lambda: sdegen.VPSDE(0.1, 20).discretize(10), ValueError, "n_steps"),
    (lambda: DDPM.from_vp(sdegen.SubVPSDE(), 100), TypeError, "vp"),
    (lambda: DDPM.linear(10).q_sample(torch.zeros(2, 3), 11, torch.zeros(2, 3)), ValueError, "i must lie"),
    (lambda: DDPM.linear(10).q_sample(torch.zeros(2, 3), 0.5, torch.zeros(2, 3)), TypeError, "i must"),
    (lambda: DDPM.linear(10).q_posterior(torch.zeros(2, 3), torch.zeros(2, 3), 0), ValueError, "i must lie"),
    (lambda: DDPM.linear(10).q_sample(torch.zeros(2, 3), 1, torch.zeros(2, 4)), ValueError, "noise"),
    (lambda: DDPM.linear(10).sample(lambda x, i: x[:, :1], (2, 3)), ValueError, "eps_model"),
    (lambda: DDPM.linear(10).ddim_sample(lambda x, i: x, (2, 3), steps=11), ValueError, "steps"),
    (lambda: DDPM.linear(10).ddim_sample(lambda x, i: x, (2, 3), steps=2, eta=-1), ValueError, "eta"),
    (lambda: DDPM.linear(10).vlb(lambda x, i: x, torch.zeros(2, 3), decoder="logistic"), ValueError, "decoder"),
    (lambda: DDPM.linear(10).vlb(lambda x, i: x, torch.full((2, 3), 2.0), decoder="discretized"),
     ValueError, "discretized"),
    (lambda: DDPM.linear(10).sample(lambda x, i: x, (2,)), ValueError, "shape"),
])
def test_bad_input(call, exc, text):
    with pytest.raises(exc, match=text):
        call()


def test_q_sample_moments():
    r"""$x_i \mid x_0 \sim \mathcal N(\sqrt{\bar\alpha_i}x_0, (1-\bar\alpha_i)I)$: 20,000 draws per step; mean SE
    $\sqrt{(1-\bar\alpha)/n}$, variance SE $\sqrt{2/n}(1-\bar\alpha)$ (Gaussian), 5 SE allowed. Also i = 0 returns x0."""
    ddpm = DDPM.linear(100, 1e-3, 0.05)
    n = 20000
    x0 = torch.full((n, 1), 1.5, dtype=F64)
    for i in (1, 10, 100):
        x = ddpm.q_sample(x0, i, torch.randn(n, 1, generator=gen(i), dtype=F64))
        ab = float(ddpm.alpha_bar[i])
        assert abs(float(x.mean()) - math.sqrt(ab) * 1.5) < 5 * math.sqrt((1 - ab) / n)
        assert abs(float(x.var()) - (1 - ab)) < 5 * math.sqrt(2 / n) * (1 - ab)
    assert torch.equal(ddpm.q_sample(x0[:3], 0, torch.ones(3, 1, dtype=F64)), x0[:3])


# ---------------------------------------------------------------------- posterior and KL
def test_q_posterior_is_bayes_rule():
    r"""$q(x_{i-1}\mid x_i, x_0) \propto q(x_i \mid x_{i-1})\,q(x_{i-1}\mid x_0)$: Gaussian product (precisions add),
    and, independently, quadrature of the normalized product on a fine 1-D grid."""
    ddpm = DDPM.linear(100, 1e-3, 0.05)
    ab, a, b = ddpm.alpha_bar, torch.cat([torch.ones(1, dtype=F64), ddpm.alphas]), torch.cat(
        [torch.zeros(1, dtype=F64), ddpm.betas])
    x0 = torch.tensor([[0.7], [-1.3], [0.2]], dtype=F64)
    xi = torch.tensor([[0.1], [0.4], [-2.0]], dtype=F64)
    for i in (2, 10, 50, 100):
        mean, var = ddpm.q_posterior(x0, xi, i)
        # prior q(x_{i-1}|x0) = N(sqrt(ab_{i-1}) x0, 1 - ab_{i-1}); likelihood in x_{i-1}: N(x_i; sqrt(a_i) x_{i-1}, b_i)
        prec = 1 / (1 - ab[i - 1]) + a[i] / b[i]
        m = (ab[i - 1].sqrt() * x0 / (1 - ab[i - 1]) + a[i].sqrt() * xi / b[i]) / prec
        torch.testing.assert_close(mean, m, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(var, (1 / prec).expand(3), rtol=1e-12, atol=0)
        # Quadrature: +-16 std around the product's mode; trapezoid error is far below 1e-9 here.
        for k in range(3):
            u = torch.linspace(float(m[k]) - 16 / prec.sqrt(), float(m[k]) + 16 / prec.sqrt(), 4001, dtype=F64)
            logp = (-0.5 * (u - ab[i - 1].sqrt() * x0[k]).square() / (1 - ab[i - 1])
                    - 0.5 * (xi[k] - a[i].sqrt() * u).square() / b[i])
            w = (logp - logp.max()).exp()
            z = torch.trapezoid(w, u)
            qm = torch.trapezoid(w * u, u) / z
            qv = torch.trapezoid(w * (u - qm).square(), u) / z
            assert abs(float(qm - mean[k, 0])) < 1e-9 * max(1.0, abs(float(qm)))
            assert abs(float(qv / var[k]) - 1) < 1e-8


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_kl_term_equals_weighted_eps_error_and_snr_form(variance, generator):
    r"""$L_{i-1}$ three ways: the Gaussian KL of posterior and model, $\lambda_i\|\epsilon-\hat\epsilon\|^2 + c_i$ and
    $\tfrac{r_i}{2}(\mathrm{SNR}_{i-1}-\mathrm{SNR}_i)\|x_0-\hat x_0\|^2 + c_i$, for a model that is NOT exact."""
    ddpm = DDPM.linear(50, 1e-3, 0.1, variance=variance)
    x0 = torch.randn(8, 3, generator=generator, dtype=F64)
    noise = torch.randn(8, 3, generator=generator, dtype=F64)
    W = torch.randn(3, 3, generator=generator, dtype=F64) * 0.3

    def eps_model(x, i):
        return torch.tanh(x @ W) + 0.01 * i[:, None]

    i = torch.tensor([2, 3, 5, 10, 20, 30, 49, 50])
    kl = ddpm.vlb_term(eps_model, x0, i, noise, form="kl")
    # The same KL by hand from the public pieces.
    x_i = ddpm.q_sample(x0, i, noise)
    mq, vq = ddpm.q_posterior(x0, x_i, i)
    mp, vp_ = ddpm.p_mean_variance(eps_model, x_i, i)
    by_hand = gaussian_kl(mq, vq[:, None], mp, vp_[:, None]).sum(1)
    torch.testing.assert_close(kl, by_hand, rtol=1e-12, atol=1e-14)
    for form in ("eps", "snr"):
        torch.testing.assert_close(ddpm.vlb_term(eps_model, x0, i, noise, form=form), kl, rtol=1e-9, atol=1e-12)
    # The eps weight of Ho et al. (eq. 12) for sigma^2 = beta_tilde equals (SNR_{i-1} - SNR_i)(1-ab_i)/(2 ab_i)... i.e.
    # lambda_i ||eps - eps_hat||^2 = 1/2 (SNR_{i-1}-SNR_i) ||x0 - x0_hat||^2 since x0 - x0_hat = sqrt((1-ab)/ab)(eps_hat - eps).
    if variance == "posterior":
        ab = ddpm.alpha_bar[i]
        torch.testing.assert_close(ddpm.eps_weight(i), 0.5 * (ddpm.snr(i - 1) - ddpm.snr(i)) * (1 - ab) / ab,
                                   rtol=1e-10, atol=0)


# ---------------------------------------------------------------------- the VLB
def test_vlb_monte_carlo_matches_closed_form():
    """``vlb`` (one x_i draw per term and sample) against the closed-form expectation, N = 10 and 100.

    Standard error: the per-sample std of ``total`` is O(1) nat; with B = 2000 the mean's SE is
    measured from the samples and the assertion allows 5 SE."""
    B, d = 2000, 2
    x0 = torch.full((B, d), 0.9, dtype=F64)
    for N, vp in ((10, sdegen.VPSDE(0.1, 8.0)), (100, sdegen.VPSDE(0.1, 20.0))):
        ddpm = DDPM.from_vp(vp, N, variance="beta")
        res = ddpm.vlb(gaussian_eps(ddpm), x0, generator=gen(N))
        exact = float(_analytic_vlb(ddpm, x0[:1], d)[0])
        se = float(res.total.std()) / math.sqrt(B)
        assert abs(float(res.total.mean()) - exact) < 5 * se, (N, float(res.total.mean()), exact, se)
        assert res.terms.shape == (B, N)
        # Term by term (N comparisons at 5 SE: a false alarm has probability < 1e-4 in all).
        LT, exact_terms = _analytic_vlb(ddpm, x0[:1], d, terms=True)
        torch.testing.assert_close(res.prior, LT.expand(B), rtol=1e-10, atol=1e-12)
        term_se = res.terms.std(0) / math.sqrt(B)
        assert ((res.terms.mean(0) - exact_terms[0]).abs() < 5 * term_se + 1e-12).all()
        torch.testing.assert_close(res.total, res.prior + res.terms.sum(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res.terms[:, 0], res.decoder)
        torch.testing.assert_close(res.bits_per_dim, res.total / (d * math.log(2)))
        # The sampled-terms estimate is unbiased for the same quantity (its SE is larger: K=4 of 99 terms).
        est = ddpm.vlb(gaussian_eps(ddpm), x0, generator=gen(N + 1), n_terms=4)
        assert est.terms is None
        se2 = float(est.total.std()) / math.sqrt(B)
        assert abs(float(est.total.mean()) - exact) < 5 * se2


def test_vlb_gap_shrinks_with_n():
    r"""With the exact eps of Gaussian data the bound, averaged over the data, is >= the data's entropy
    $\mathbb E[-\log p(x)]$ (pointwise it bounds $-\log p_\theta(x)$, which may be below $-\log p(x)$ in the
    tails) and, for sigma^2 = beta, tends to it like 1/N (N = 10, 100, 1000: gap * N roughly constant).
    With sigma^2 = beta_tilde the gap stays above a positive constant (see DDPM.vlb). All numbers are
    closed-form expectations."""
    d = 2
    entropy = 0.5 * d * math.log(2 * math.pi * math.e * S2)
    vps = {10: sdegen.VPSDE(0.1, 8.0), 100: sdegen.VPSDE(0.1, 20.0), 1000: sdegen.VPSDE(0.1, 20.0)}
    gaps = {}
    for var in ("beta", "posterior"):
        for N, vp in vps.items():
            gaps[var, N] = float(_analytic_vlb(DDPM.from_vp(vp, N, variance=var), None, d, expected=True)[0]) - entropy
    assert all(g > 0 for g in gaps.values()), gaps
    assert gaps["beta", 1000] < gaps["beta", 100] < gaps["beta", 10], gaps
    # 1/N: N * gap at N = 100 and 1000 (same SDE) agree within 10%; the gap at N = 1000 is below 0.01 nat.
    assert abs((1000 * gaps["beta", 1000]) / (100 * gaps["beta", 100]) - 1) < 0.1, gaps
    assert gaps["beta", 1000] < 0.01
    assert gaps["posterior", 1000] > 0.3
    # Pointwise at typical points the closed form and -log p agree to the same order.
    x0 = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=F64)
    pointwise = _analytic_vlb(DDPM.from_vp(vps[1000], 1000, variance="beta"), x0, d) - _nll(x0)
    assert (pointwise.abs() < 0.01).all(), pointwise


def test_vlb_monte_carlo_n1000_is_close():
    """The MC bound at N = 1000 (exact eps) within 5 SE of -log p(x); the true gap (0.002 nat) is far below the SE."""
    B = 1000
    x0 = torch.full((B, 2), 0.3, dtype=F64)
    ddpm = sdegen.VPSDE(0.1, 20).discretize(1000)
    ddpm = DDPM(ddpm.betas, variance="beta")
    res = ddpm.vlb(gaussian_eps(ddpm), x0, generator=gen(7))
    se = float(res.total.std()) / math.sqrt(B)
    assert abs(float(res.total.mean() - _nll(x0[:1])[0])) < 5 * se


@pytest.mark.parametrize("sde", [sdegen.VPSDE(0.1, 20.0), sdegen.SubVPSDE(0.1, 20.0)], ids=["vp", "subvp"])
def test_continuous_vlb_matches_the_limit(sde):
    r"""The continuous-time estimator with the exact score equals -log p(x) (the N -> infinity limit of the
    DDPM bound with sigma^2 = beta, shown above); up to the prior mismatch p_T != N(0, I) (< 1e-4 nat here).

    SE: per-sample std of the stratified estimator is about 4 nats; B = 8000 gives SE ~ 0.05; 5 SE allowed."""
    gm = sdegen.named_mixture("gaussian")
    B = 8000
    x0 = gm.sample(B, generator=gen(3))
    res = continuous_vlb(sde, gm.score_fn(sde), x0, generator=gen(4), n_t=16)
    gap = res.total - _nll(x0)
    se = float(gap.std()) / math.sqrt(B)
    assert abs(float(gap.mean())) < 5 * se, (float(gap.mean()), se)
    torch.testing.assert_close(res.total, res.prior + res.diffusion + res.decoder)


def test_continuous_vlb_is_the_limit_of_the_ddpm_bound_for_an_inexact_model():
    r"""For a mis-specified model (the exact eps of N(0.2, 0.6^2 I) on data N(0.5, 0.5^2 I)) the bound no longer
    equals -log p; the DDPM bound (sigma^2 = beta, closed form) at N = 1000 and 4000, extrapolated to
    N = infinity by Richardson (error O(1/N)), agrees with the continuous estimator within 5 SE."""
    vp = sdegen.VPSDE(0.1, 20.0)
    wrong = sdegen.GaussianMixture(torch.full((1, 2), 0.2, dtype=F64), stds=0.6)
    x0 = torch.tensor([[0.9, 0.1]], dtype=F64)
    L = {N: float(_analytic_vlb(DDPM.from_vp(vp, N, variance="beta"), x0, 2, 0.2, 0.36)[0]) for N in (1000, 4000)}
    limit = (4 * L[4000] - L[1000]) / 3
    assert limit - float(_nll(x0)[0]) > 0.05          # a visibly loose bound: the test has power
    B = 3000
    res = continuous_vlb(vp, wrong.score_fn(vp), x0.expand(B, 2).clone(), generator=gen(5), n_t=16)
    se = float(res.total.std()) / math.sqrt(B)
    assert abs(float(res.total.mean()) - limit) < 5 * se, (float(res.total.mean()), limit, se)


def test_vlb_discretized_decoder_runs_on_8bit_data():
    ddpm = DDPM.linear(20, 1e-3, 0.2, variance="beta")
    x0 = (torch.randint(0, 256, (16, 3, 2, 2), generator=gen(0)).to(F64) / 127.5 - 1)
    res = ddpm.vlb(lambda x, i: torch.zeros_like(x), x0, generator=gen(1), decoder="discretized")
    assert res.total.shape == (16,) and torch.isfinite(res.total).all()
    # A discrete NLL is non-negative: every term, and the decoder -log P(bin), is >= 0.
    assert (res.decoder >= 0).all() and (res.terms >= 0).all() and (res.prior >= 0).all()


def test_simple_loss_with_exact_eps():
    r"""$\mathbb E\|\epsilon - \epsilon^*(x_i, i)\|^2/d = \mathbb E_i[1 - (1-\bar\alpha_i)/v_i]$ (the irreducible
    part); with a zero model it is $\mathbb E\|\epsilon\|^2/d = 1$. SE from the per-sample values, 5 SE."""
    ddpm = DDPM.linear(100, 1e-3, 0.1)
    gm = sdegen.named_mixture("gaussian")
    x0 = gm.sample(20000, generator=gen(0))
    per = ddpm.loss(gaussian_eps(ddpm), x0, generator=gen(1), reduction="none")
    ab = ddpm.alphas_cumprod
    expected = float((1 - (1 - ab) / (ab * S2 + 1 - ab)).mean())
    assert abs(float(per.mean()) - expected) < 5 * float(per.std()) / math.sqrt(per.numel())
    zero = ddpm.loss(lambda x, i: torch.zeros_like(x), x0, generator=gen(1))
    assert abs(float(zero) - 1) < 5 / math.sqrt(20000)      # per sample chi^2_2 / 2: mean 1, std 1


# ---------------------------------------------------------------------- score view and sampling
@pytest.mark.parametrize("n", [25, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unchecked_grid_score_equals_score_fn(dtype, n):
    """The sampling runs' score view (no per-call checks, the step by bucketize) gives score_fn's numbers
    bit for bit at every chain time, in the state's dtype (and at t = 0, which maps to step 1)."""
    ddpm = DDPM.linear(n, 1e-4, 0.02, T=2.0)
    eps = gaussian_eps(ddpm)
    x = torch.randn(n + 1, 3, generator=gen(0), dtype=dtype)
    t = torch.cat([ddpm.step_to_time(torch.arange(1, n + 1)), torch.tensor([0.0], dtype=torch.float64)]).to(dtype)
    assert torch.equal(ddpm._grid_score(eps, x)(x, t), ddpm.score_fn(eps)(x, t))


def test_score_and_eps_wrappers_are_inverse():
    ddpm = DDPM.linear(25, 1e-3, 0.2, T=2.0)
    gm = sdegen.named_mixture("8gaussians")
    vp = sdegen.VPSDE(0.1, 20.0, T=2.0)
    score = gm.score_fn(vp)
    x = gm.sample(10, generator=gen(0))
    i = torch.arange(1, 26)[torch.randint(0, 25, (10,), generator=gen(1))]
    t = ddpm.step_to_time(i)
    # score_fn(eps_model_from_score(s)) == s at the grid times
    torch.testing.assert_close(ddpm.score_fn(ddpm.eps_model_from_score(score))(x, t), score(x, t), rtol=1e-12, atol=1e-12)
    # eps_model_from_score(score_fn(e)) == e at every step
    eps = gaussian_eps(ddpm)
    torch.testing.assert_close(ddpm.eps_model_from_score(ddpm.score_fn(eps))(x, i), eps(x, i), rtol=1e-12, atol=1e-12)
    # score = -eps / sqrt(1 - abar_i), with i = round(t N / T) (here off-grid times)
    t_off = t - 0.3 * 2.0 / 25          # below each grid time: inside [0, T], rounds back to i
    s = ddpm.score_fn(eps)(x, t_off)
    torch.testing.assert_close(s, -eps(x, i) / (1 - ddpm.alpha_bar[i]).sqrt()[:, None])


def test_ancestral_sampler_reproducible_and_dtype(generator):
    ddpm = DDPM.linear(30, 1e-3, 0.2)
    eps = gaussian_eps(ddpm)
    a = ddpm.sample(eps, (7, 2), generator=gen(5), dtype=F64)
    b = ddpm.sample(eps, (7, 2), generator=gen(5), dtype=F64)
    assert torch.equal(a, b) and a.dtype == F64
    c = ddpm.sample(eps, (7, 2), generator=gen(5), dtype=torch.float32)
    assert c.dtype == torch.float32
    torch.testing.assert_close(c, a.float(), rtol=1e-4, atol=1e-4)
    # x_T given: no prior draw, the per-step draws come first.
    x_T = torch.randn(7, 2, generator=gen(5), dtype=F64)
    g = gen(5)
    torch.randn(7, 2, generator=g, dtype=F64)
    torch.testing.assert_close(ddpm.sample(eps, (7, 2), generator=g, x_T=x_T), a)
    d = ddpm.ddim_sample(eps, (7, 2), steps=10, generator=gen(5), dtype=torch.float32)
    assert d.dtype == torch.float32 and d.shape == (7, 2)


def _reference_chain(ddpm, eps_model, x, pairs, eta, variance, generator):
    r"""Ho et al. 2020, Alg. 2 / Song et al. 2021 (DDIM), eq. 12, written out from the paper on the float64
    tables: from step i to j, $x_j = \sqrt{\bar\alpha_j}\hat x_0 + \sqrt{1-\bar\alpha_j-\sigma^2}\hat\epsilon + \sqrt v z$,
    $\sigma^2 = \eta^2\tilde\beta_{ij}$, $v = \sigma^2$ (posterior) or $\eta^2\beta_{ij}$ ("beta"); one draw per step."""
    ab = ddpm.alpha_bar
    for i, j in pairs:
        eps_hat = eps_model(x, torch.full((x.shape[0],), i, dtype=torch.long))
        x0_hat = (x - (1 - ab[i]).sqrt() * eps_hat) / ab[i].sqrt()
        beta_ij = 1 - ab[i] / ab[j]
        sigma2 = eta ** 2 * (1 - ab[j]) / (1 - ab[i]) * beta_ij
        v = sigma2 if variance == "posterior" else eta ** 2 * beta_ij
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = ab[j].sqrt() * x0_hat + (1 - ab[j] - sigma2).sqrt() * eps_hat + v.sqrt() * z
    return x


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_samplers_in_the_loop_equal_the_papers_recursions(variance):
    """DDPM.sample and DDPM.ddim_sample now run in sdegen.sample's loop (issue 15): they still are the papers'
    recursions, draw for draw, for both reverse variances (float64; per-step round-off ~1e-16, 30 steps)."""
    ddpm = DDPM.linear(30, 1e-3, 0.2, variance=variance)
    eps = gaussian_eps(ddpm)
    x_T = torch.randn(16, 2, generator=gen(1), dtype=F64)
    full = [(i, i - 1) for i in range(30, 0, -1)]
    ref = _reference_chain(ddpm, eps, x_T, full, 1.0, variance, gen(2))
    torch.testing.assert_close(ddpm.sample(eps, None, x_T=x_T, generator=gen(2)), ref, rtol=1e-12, atol=1e-12)
    taus = ddpm.ddim_steps(7)
    pairs = list(zip(taus[:0:-1], taus[-2::-1]))
    ref = _reference_chain(ddpm, eps, x_T, pairs, 0.5, "posterior", gen(3))
    torch.testing.assert_close(ddpm.ddim_sample(eps, None, steps=7, eta=0.5, x_T=x_T, generator=gen(3)), ref,
                               rtol=1e-12, atol=1e-12)


def test_samplers_report_a_non_finite_model_through_the_loop():
    """The loop's checks hold for the DDPM samplers too: a model that returns NaN is named, not returned."""
    ddpm = DDPM.linear(10, 1e-3, 0.2)

    def bad(x, i):
        return torch.where(i[:, None] < 5, torch.full_like(x, float("nan")), torch.zeros_like(x))

    for run in (lambda: ddpm.sample(bad, (4, 2), generator=gen(0)),
                lambda: ddpm.ddim_sample(bad, (4, 2), steps=10, generator=gen(0))):
        with pytest.raises(sdegen.NonFiniteError, match="non-finite at step 6"):
            run()


def test_ddim_eta1_full_steps_is_ancestral():
    r"""DDIM with $\eta = 1$ on all N steps has $\sigma^2 = \tilde\beta_i$ and the mean $\mu_\theta$: the ancestral
    sampler, draw for draw (both draw x_N, then one normal per step)."""
    ddpm = DDPM.linear(40, 1e-3, 0.2)
    eps = gaussian_eps(ddpm)
    a = ddpm.sample(eps, (64, 2), generator=gen(9), dtype=F64)
    b = ddpm.ddim_sample(eps, (64, 2), steps=40, eta=1.0, generator=gen(9), dtype=F64)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ddim_eta0_is_euler_in_scaled_variables(generator):
    r"""STYLE.md: DDIM ($\eta = 0$) is Euler's method for $d\bar x/d\sigma = \hat\epsilon$ with $\bar x = x/\sqrt{\bar\alpha}$ and
    $\sigma = \sqrt{(1-\bar\alpha)/\bar\alpha}$, on the grid :meth:`DDPM.ddim_steps`; any eps-model."""
    ddpm = DDPM.linear(60, 1e-3, 0.1)
    W = torch.randn(2, 2, generator=generator, dtype=F64)

    def eps_model(x, i):
        return torch.sin(x @ W) * (1 + i[:, None] / 60)

    x_T = torch.randn(16, 2, generator=generator, dtype=F64)
    ab = ddpm.alpha_bar
    taus = ddpm.ddim_steps(7)
    assert taus[0] == 0 and taus[-1] == 60 and len(taus) == 8
    x = x_T.clone()
    for k in range(7, 0, -1):
        tau, prev = taus[k], taus[k - 1]
        sig, sig_prev = ((1 - ab[tau]) / ab[tau]).sqrt(), ((1 - ab[prev]) / ab[prev]).sqrt()
        xbar = x / ab[tau].sqrt() + (sig_prev - sig) * eps_model(x, torch.full((16,), tau))
        x = xbar * ab[prev].sqrt()
    torch.testing.assert_close(ddpm.ddim_sample(eps_model, None, steps=7, x_T=x_T), x, rtol=1e-12, atol=1e-12)


def _exact_chain(vp, N):
    """The chain with abar_i = m(t_i)^2 of ``vp`` (no O(1/N) schedule gap)."""
    t = torch.arange(1, N + 1, dtype=F64) * (vp.T / N)
    m, _ = vp.marginal(t)
    return DDPM.from_alphas_cumprod(m.square(), T=vp.T)


def test_ddim_converges_to_the_probability_flow_ode():
    r"""For Gaussian data the probability-flow ODE keeps $(x_t - m\mu)/\sqrt{m^2 s^2 + s_t^2}$ constant, so the exact
    solution from $x_T$ is $x_0 = \mu + s\,(x_T - m_T\mu)/\sqrt{m_T^2 s^2 + s_T^2}$. DDIM ($\eta = 0$) on the exact
    chain is Euler's method in $(x/m, \sigma)$: the error halves with the step (fitted order 1 +- 0.25)."""
    vp, N = sdegen.VPSDE(0.1, 20.0), 1024
    ddpm = _exact_chain(vp, N)
    gm = sdegen.named_mixture("gaussian")
    eps = ddpm.eps_model_from_score(gm.score_fn(vp))
    x_T = torch.randn(64, 2, generator=gen(0), dtype=F64)
    mT, sT = (v[0] for v in vp.marginal(torch.tensor([vp.T], dtype=F64)))
    exact = MU + math.sqrt(S2) * (x_T - mT * MU) / torch.sqrt(mT**2 * S2 + sT**2)
    steps = [8, 16, 32, 64, 128]
    errs = [float((ddpm.ddim_sample(eps, None, steps=S, x_T=x_T) - exact).abs().max()) for S in steps]
    assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:])), errs
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(float(slope) - 1.0) < 0.25, (errs, float(slope))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_reproduces_the_data_distribution(eta):
    r"""DDIM with the exact score of the anisotropic 2-D mixture, 200 steps: mean and directional variances of
    10,000 samples match the mixture's (z-tests, |z| < 5; SE of a mean sqrt(var/n), of a variance the
    empirical std of squared deviations / sqrt(n); the discretization bias at 100 steps is far below them)."""
    vp = sdegen.VPSDE(0.1, 20.0)
    ddpm = _exact_chain(vp, 1000)
    gm = sdegen.named_mixture("anisotropic")
    n = 10000
    x = ddpm.ddim_sample(ddpm.eps_model_from_score(gm.score_fn(vp)), (n, 2), steps=100, eta=eta,
                         generator=gen(11), dtype=F64)
    mean, cov = gm.mean(), gm.covariance()
    z_mean = (x.mean(0) - mean) / (cov.diagonal() / n).sqrt()
    assert (z_mean.abs() < 5).all(), z_mean
    # Variance along three directions; SE from the empirical std of the squared deviations (kurtosis-aware).
    for u in (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.7071, 0.7071])):
        u = u.to(F64)
        p = (x - mean) @ u
        var_exact = float(u @ cov @ u)
        se = float(p.square().std()) / math.sqrt(n)
        assert abs(float(p.square().mean()) - var_exact) < 5 * se


def test_chain_vs_sde_gap_is_first_order():
    r"""The chain's schedule differs from the SDE's by O(1/N): $\max_i|\log\bar\alpha_i - \log m(t_i)^2|\cdot N$ is the
    same for N = 10^3, 10^4, 10^5 (within 5%); so do the moments of ancestral samples drawn with the SDE's
    exact score (``eps_model_from_score``), N = 10^3 and 10^4.

    Moments for data $\mathcal N(\mu, s^2)$ in 1-D: each step is $x_{i-1} = A_i x_i + c_i + \sigma_i z$, so mean and
    variance follow $M \leftarrow AM + c$, $V \leftarrow A^2 V + \sigma_i^2$ exactly; $A_i, c_i$ are read off
    ``p_mean_variance``. The recursion starts from the exact $p_T$ (not $\mathcal N(0, 1)$), which removes the
    prior-mismatch floor (about 6e-6 in the mean) and leaves the discretization error alone. With
    $\sigma_i^2 = \beta_i$ both moments are $c/N$ (N * error constant within 2%); with $\tilde\beta_i$ the first
    steps are under-dispersed by about $\beta_i/i$ each, which adds $-\beta_\min\log N/N$ to the variance
    (N * error drifts by ~0.3 per decade, within 15%)."""
    vp = sdegen.VPSDE(0.1, 20.0)
    gm = sdegen.GaussianMixture(torch.tensor([[MU]], dtype=F64), stds=math.sqrt(S2))
    sched = {}
    for N in (1000, 10000, 100000):
        t = torch.arange(1, N + 1, dtype=F64) / N
        sched[N] = N * float((vp.discretize(N).alphas_cumprod.log() + vp.int_beta(t)).abs().max())
    assert abs(sched[10000] / sched[1000] - 1) < 0.05 and abs(sched[100000] / sched[10000] - 1) < 0.05, sched
    mT, sT = (float(v) for v in vp.marginal(torch.tensor([vp.T], dtype=F64)))
    for variance, tol in (("beta", (0.02, 0.02)), ("posterior", (0.02, 0.15))):
        mom = {}
        for N in (1000, 10000):
            ddpm = DDPM.from_vp(vp, N, variance=variance)
            eps = ddpm.eps_model_from_score(gm.score_fn(vp))
            # All steps in one batched call: rows (x = 0, step i) and (x = 1, step i).
            i = torch.arange(1, N + 1).repeat(2)
            x = torch.cat([torch.zeros(N, 1, dtype=F64), torch.ones(N, 1, dtype=F64)])
            mean, var = ddpm.p_mean_variance(eps, x, i)
            c, A, var = mean[:N, 0].tolist(), (mean[N:, 0] - mean[:N, 0]).tolist(), var[:N].tolist()
            M, V = mT * MU, mT**2 * S2 + sT**2
            for k in range(N - 1, -1, -1):             # steps N .. 1
                M, V = A[k] * M + c[k], A[k] * A[k] * V + var[k]
            mom[N] = (N * (M - MU), N * (V - S2))
        for k in range(2):
            assert abs(mom[10000][k] / mom[1000][k] - 1) < tol[k], (variance, mom)
            assert abs(mom[1000][k]) > 0.01        # a real first-order error, not zero


@pytest.mark.cuda
def test_samplers_on_cuda():
    ddpm = DDPM.linear(50, 1e-3, 0.2)
    eps = gaussian_eps(ddpm)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = ddpm.sample(eps, (128, 2), generator=g, dtype=F64)
    assert x.device.type == "cuda" and x.dtype == F64
    g = torch.Generator(device="cuda").manual_seed(0)
    y = ddpm.ddim_sample(eps, (128, 2), steps=50, eta=1.0, generator=g, dtype=F64)
    torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    x0 = torch.rand(64, 2, device="cuda", dtype=F64)
    res = ddpm.vlb(eps, x0, generator=torch.Generator(device="cuda").manual_seed(1))
    assert res.total.device.type == "cuda" and torch.isfinite(res.total).all()
    loss = ddpm.loss(eps, x0, generator=torch.Generator(device="cuda").manual_seed(2))
    assert loss.device.type == "cuda"
    vp = sdegen.VPSDE()
    gm = sdegen.named_mixture("gaussian", device="cuda")
    cont = continuous_vlb(vp, gm.score_fn(vp), x0, generator=torch.Generator(device="cuda").manual_seed(3))
    assert cont.total.device.type == "cuda" and torch.isfinite(cont.total).all()


# ---------------------------------------------------------------------- input validation (issue 14, item 10)
@pytest.mark.parametrize("t, text", [
    (-0.1, r"t must lie in \[0.0, 1.0\]"),          # was clamped to step 1 silently
    (1.5, r"t must lie in \[0.0, 1.0\]"),           # was clamped to step N silently
    (float("nan"), r"t must lie in \[0.0, 1.0\], got values in \[nan"),   # crashed in the rounding
])
def test_score_fn_refuses_times_outside_0_T(t, text):
    ddpm = DDPM.linear(10, 1e-3, 0.2)
    score = ddpm.score_fn(lambda x, i: torch.zeros_like(x))
    x = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError, match=text):
        score(x, torch.full((3,), t, dtype=F64))
    # One bad entry in a batch is enough.
    tt = torch.tensor([0.5, t, 0.5], dtype=F64)
    with pytest.raises(ValueError, match="t must lie in"):
        score(x, tt)
    # The ends themselves are fine: t = 0 and t = T map to steps 1 and N.
    assert score(x, torch.tensor([0.0, 1.0, 0.5], dtype=F64)).shape == (3, 2)


def test_vlb_refuses_nan_data():
    ddpm = DDPM.linear(10, 1e-3, 0.2)
    x0 = torch.zeros(4, 2, dtype=F64)
    x0[2, 1] = float("nan")
    with pytest.raises(ValueError, match="x0 contains NaN"):
        ddpm.vlb(lambda x, i: torch.zeros_like(x), x0)
    with pytest.raises(ValueError, match=r"x0 must be batch-first with shape \(B, \*D\)"):
        ddpm.vlb(lambda x, i: torch.zeros_like(x), torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("sampler", ["sample", "ddim_sample"])
def test_one_dimensional_or_nan_x_T_is_refused(sampler):
    ddpm = DDPM.linear(10, 1e-3, 0.2)
    run = getattr(ddpm, sampler)
    kw = {"steps": 5} if sampler == "ddim_sample" else {}
    with pytest.raises(ValueError, match=r"x_T must be batch-first with shape \(B, \*D\).*got shape \(6,\)"):
        run(lambda x, i: torch.zeros_like(x), None, x_T=torch.zeros(6, dtype=F64), **kw)
    bad = torch.zeros(3, 2, dtype=F64)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="x_T contains NaN or inf"):
        run(lambda x, i: torch.zeros_like(x), None, x_T=bad, **kw)


@pytest.mark.parametrize("call", ["sample", "ddim_sample", "score_fn", "vlb", "loss"])
def test_eps_model_with_another_dtype_is_refused(call):
    # A float64 output for a float32 state used to turn the whole result into float64; the rule is
    # "results keep the requested dtype or the call fails clearly".
    ddpm = DDPM.linear(10, 1e-3, 0.2)

    def eps64(x, i):
        return torch.zeros(x.shape, dtype=torch.float64)

    x = torch.zeros(3, 2, dtype=torch.float32)
    calls = {
        "sample": lambda: ddpm.sample(eps64, (3, 2), generator=gen(0), dtype=torch.float32),
        "ddim_sample": lambda: ddpm.ddim_sample(eps64, (3, 2), steps=5, generator=gen(0), dtype=torch.float32),
        "score_fn": lambda: ddpm.score_fn(eps64)(x, torch.full((3,), 0.5)),
        "vlb": lambda: ddpm.vlb(eps64, x, generator=gen(0)),
        "loss": lambda: ddpm.loss(eps64, x, generator=gen(0)),
    }
    with pytest.raises(TypeError, match=r"eps_model\(x, i\) must return the dtype of x \(torch.float32\), "
                                        r"got torch.float64"):
        calls[call]()
    # The same model in float64 keeps float64.
    assert ddpm.sample(eps64, (3, 2), generator=gen(0), dtype=torch.float64).dtype == torch.float64


def test_ddim_eta_zero_draws_nothing_but_the_start():
    # DDIM with eta = 0 is deterministic: after the prior draw x_T, the chain must leave the random
    # stream untouched (the loop draws no increments for a solver whose noise coefficients are all 0),
    # while eta > 0 draws one increment per step.
    ddpm = sdegen.DDPM.linear(50)
    model = lambda x, i: 0.1 * x  # noqa: E731
    torch.manual_seed(0)
    torch.randn(4, 2)
    after_prior = torch.rand(1)
    torch.manual_seed(0)
    ddpm.ddim_sample(model, (4, 2), steps=10, eta=0.0)
    assert torch.equal(torch.rand(1), after_prior)
    torch.manual_seed(0)
    ddpm.ddim_sample(model, (4, 2), steps=10, eta=0.5)
    assert not torch.equal(torch.rand(1), after_prior)
