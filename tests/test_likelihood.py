"""Exact likelihoods by the probability-flow ODE, checked against the Gaussian-mixture oracle."""

import math

import pytest
import torch

import sdegen
from sdegen import likelihood as lk
from sdegen.likelihood import bits_per_dim, decode, dequantize, encode, log_likelihood
from sdegen.solvers.base import CountingScore

F64 = torch.float64
SDES = {"vp": sdegen.VPSDE, "subvp": sdegen.SubVPSDE, "ve": sdegen.VESDE}


def exact_prior(gm, sde):
    return lambda z: gm.log_prob_t(z, sde.T, sde)


def data(gm, n, seed):
    return gm.sample(n, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("mixture", ["8gaussians", "mixture16"])
@pytest.mark.parametrize("name", list(SDES))
def test_exact_divergence_matches_true_log_density(mixture, name):
    # With the exact score and the exact p_T, only the ODE error remains; at rtol = atol = 1e-6 it
    # is ~1e-5 nats per dimension (measured), the requirement is 1e-3.
    sde, gm = SDES[name](), sdegen.named_mixture(mixture)
    eps = 1e-5
    x = data(gm, 6, seed=1)
    score = CountingScore(gm.score_fn(sde))  # an independent counter of the calls made
    res = log_likelihood(sde, score, x, rtol=1e-6, atol=1e-6, eps=eps, prior=exact_prior(gm, sde))
    truth = gm.log_prob_t(x, eps, sde)
    assert ((res.log_prob - truth).abs() / gm.dim).max() < 1e-3
    torch.testing.assert_close(res.log_prob, res.prior_log_prob + res.delta_log_prob)
    assert res.nfe == score.nfe == res.stats["nfe"]
    assert res.stats["vjp"] == gm.dim * res.nfe          # one VJP per dimension per evaluation
    assert res.log_prob.shape == (6,) and res.log_prob.dtype == F64
    assert not res.log_prob.requires_grad


def test_sde_prior_is_the_sdes_gaussian():
    sde, gm = sdegen.VESDE(), sdegen.named_mixture("8gaussians")
    x = data(gm, 4, seed=2)
    res = log_likelihood(sde, gm.score_fn(sde), x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res.prior_log_prob, sde.prior_log_prob(res.latent))
    # The Gaussian prior only approximates p_T: the exact prior changes the result by the
    # log-ratio of the two densities at x_T.
    exact = log_likelihood(sde, gm.score_fn(sde), x, rtol=1e-6, atol=1e-6, prior=exact_prior(gm, sde))
    torch.testing.assert_close(exact.log_prob - res.log_prob,
                               gm.log_prob_t(res.latent, sde.T, sde) - sde.prior_log_prob(res.latent),
                               rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- Gaussian data
def isotropic_gaussian(d, mean=0.5, std=0.5):
    return sdegen.GaussianMixture(torch.full((1, d), mean, dtype=F64), stds=std)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_gaussian_integral_term_closed_form(name):
    # Data N(mu, s0^2 I): p_t = N(m mu, v I), v(t) = m^2 s0^2 + std^2, and the ODE drift is
    # a x + g^2 (x - m mu) / (2 v), whose divergence d (a + g^2 / (2v)) = d v' / (2 v) does not
    # depend on x (v' = 2 a v + g^2). Hence the integral term is (d/2) log(v(T) / v(eps)).
    d, s0, eps = 5, 0.5, 1e-3
    sde, gm = SDES[name](), isotropic_gaussian(d, std=s0)
    x = data(gm, 3, seed=3)
    res = log_likelihood(sde, gm.score_fn(sde), x, rtol=1e-9, atol=1e-9, eps=eps, prior=exact_prior(gm, sde))

    def v(t):
        m, std = sde.marginal(torch.tensor([t], dtype=F64))
        return m.square() * s0**2 + std.square()

    closed = 0.5 * d * torch.log(v(sde.T) / v(eps))
    torch.testing.assert_close(res.delta_log_prob, closed.expand(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(res.log_prob, gm.log_prob_t(x, eps, sde), rtol=0, atol=1e-6)
    # Rademacher probes: z^T (c I) z = c d exactly, so Hutchinson has zero variance here.
    hut = log_likelihood(sde, gm.score_fn(sde), x, divergence="hutchinson", rtol=1e-9, atol=1e-9, eps=eps,
                         prior=exact_prior(gm, sde), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hut.delta_log_prob, res.delta_log_prob, rtol=0, atol=1e-7)


def test_any_sde_custom_ornstein_uhlenbeck():
    # dx = -x dt + sqrt(2) dw (a CustomSDE, not affine to sdegen) with data N(0, s0^2 I):
    # p_t = N(0, v(t) I), v = e^{-2t} s0^2 + 1 - e^{-2t}, score -x / v. The result must be log p_eps.
    s0, d, eps = 0.3, 3, 1e-3
    sde = sdegen.CustomSDE(drift=lambda x, t: -x, diffusion=lambda t: torch.full_like(t, math.sqrt(2.0)))

    def v(t):
        return torch.exp(-2 * t) * s0**2 + 1 - torch.exp(-2 * t)

    def log_normal(z, var):
        return -0.5 * (z.square().sum(1) / var + d * torch.log(2 * math.pi * var))

    score = lambda x, t: -x / v(t)[:, None]  # noqa: E731
    x = s0 * torch.randn(4, d, generator=torch.Generator().manual_seed(20), dtype=F64)
    T = torch.tensor(sde.T, dtype=F64)
    res = log_likelihood(sde, score, x, rtol=1e-8, atol=1e-8, eps=eps, prior=lambda z: log_normal(z, v(T)))
    torch.testing.assert_close(res.log_prob, log_normal(x, v(torch.tensor(eps, dtype=F64))), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- Hutchinson
@pytest.mark.parametrize("mixture,probe_dist", [("8gaussians", "rademacher"), ("mixture16", "gaussian")])
def test_hutchinson_is_unbiased(mixture, probe_dist):
    # n independent probes for the same point (the point repeated n times, one probe each). The
    # estimate of the integral term is z^T (int J dt) z with E = the exact trace integral: the mean
    # of n = 200 draws must lie within 4 standard errors (std / sqrt(n)) of the exact value. The ODE
    # error (~1e-5) is far below the standard error.
    sde, gm = sdegen.VPSDE(), sdegen.named_mixture(mixture)
    n = 200
    x0 = data(gm, 2, seed=4)
    exact = log_likelihood(sde, gm.score_fn(sde), x0, rtol=1e-6, atol=1e-6)
    x = x0.repeat_interleave(n, dim=0)
    hut = log_likelihood(sde, gm.score_fn(sde), x, divergence="hutchinson", probe_dist=probe_dist,
                         rtol=1e-6, atol=1e-6, generator=torch.Generator().manual_seed(5))
    est = hut.delta_log_prob.reshape(2, n)
    se = est.std(1) / math.sqrt(n)
    assert (se > 0).all()
    assert ((est.mean(1) - exact.delta_log_prob).abs() < 4 * se).all(), (est.mean(1), exact.delta_log_prob, se)
    # The encoding does not depend on the probes.
    torch.testing.assert_close(hut.latent.reshape(2, n, -1)[:, 0], exact.latent, rtol=0, atol=1e-4)


def test_more_probes_reduce_variance():
    # Averaging P independent probes divides the variance by P. With n = 100 draws the sample
    # variances have relative standard error sqrt(2/99) ~ 0.14, so their ratio for P = 4 lies in
    # 0.25 * exp(+-0.6) ~ [0.14, 0.46] at 3 sigma; we check [0.1, 0.6].
    sde, gm = sdegen.VPSDE(), sdegen.named_mixture("mixture16")
    x = data(gm, 1, seed=6).repeat(100, 1)
    var = []
    for probes in (1, 4):
        r = log_likelihood(sde, gm.score_fn(sde), x, divergence="hutchinson", probes=probes, probe_dist="gaussian",
                           rtol=1e-5, atol=1e-5, generator=torch.Generator().manual_seed(7))
        var.append(float(r.delta_log_prob.var()))
        assert r.stats["vjp"] == probes * r.nfe
    assert 0.1 < var[1] / var[0] < 0.6, var


# ---------------------------------------------------------------------------------------------- encode/decode
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_encode_decode_roundtrip(name):
    sde, gm = SDES[name](), sdegen.named_mixture("8gaussians")
    x = data(gm, 8, seed=8)
    score = gm.score_fn(sde)
    z = encode(sde, score, x, rtol=1e-7, atol=1e-7, eps=1e-3)
    # The latent of a 2-D point is O(prior std); the roundtrip error is a few tolerances.
    assert z.abs().max() > 5 * x.abs().max() if name == "ve" else True
    x_rec = decode(sde, score, z, rtol=1e-7, atol=1e-7, eps=1e-3)
    torch.testing.assert_close(x_rec, x, rtol=0, atol=1e-4)
    # Same latent as the likelihood computation's.
    res = log_likelihood(sde, score, x, rtol=1e-7, atol=1e-7, eps=1e-3)
    torch.testing.assert_close(res.latent, z, rtol=0, atol=1e-4 * sde.prior_std())


# ---------------------------------------------------------------------------------------------- options
def test_chunking_and_per_sample():
    # Per-sample step control makes each sample's result independent of its batch, so chunked and
    # unchunked runs agree to rounding; Hutchinson probes are drawn for the whole batch first.
    sde, gm = sdegen.VPSDE(), sdegen.named_mixture("8gaussians")
    x = data(gm, 7, seed=9)
    kw = dict(divergence="hutchinson", probes=2, rtol=1e-6, atol=1e-6, per_sample=True)
    full = log_likelihood(sde, gm.score_fn(sde), x, generator=torch.Generator().manual_seed(1), **kw)
    chunked = log_likelihood(sde, gm.score_fn(sde), x, batch_size=3, generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(chunked.log_prob, full.log_prob, rtol=0, atol=1e-10)
    assert chunked.stats["chunks"] == 3


@pytest.mark.parametrize("method", ["torchdiffeq", "scipy"])
def test_backend_methods_agree(method):
    sde, gm = sdegen.SubVPSDE(), sdegen.named_mixture("8gaussians")
    x = data(gm, 4, seed=10)
    ref = log_likelihood(sde, gm.score_fn(sde), x, rtol=1e-7, atol=1e-7)
    res = log_likelihood(sde, gm.score_fn(sde), x, rtol=1e-7, atol=1e-7, method=method)
    torch.testing.assert_close(res.log_prob, ref.log_prob, rtol=0, atol=1e-4)
    assert res.nfe > 0


def test_basis_chunks_and_vmap_fallback(monkeypatch):
    # The exact divergence must not depend on how the basis vectors are batched, nor on whether
    # vmap can batch the backward pass (a custom Function with data-dependent control flow in its
    # backward forces the one-vector-at-a-time path).
    sde, gm = sdegen.VPSDE(), sdegen.named_mixture("mixture16")
    x = data(gm, 3, seed=11)
    score = gm.score_fn(sde)
    ref = log_likelihood(sde, score, x, rtol=1e-6, atol=1e-6)

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return v.clone()

        @staticmethod
        def backward(ctx, grad):
            if float(grad.abs().max()) > 1e300:  # data-dependent: vmap cannot batch this
                raise AssertionError("unreachable")
            return grad

    monkeypatch.setattr(lk, "_MAX_VJP_ENTRIES", 3 * 16 * 5)   # 5 basis vectors per pass
    chunked = log_likelihood(sde, score, x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked.log_prob, ref.log_prob, rtol=0, atol=1e-10)
    looped = log_likelihood(sde, lambda v, t: score(Identity.apply(v), t), x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(looped.log_prob, ref.log_prob, rtol=0, atol=1e-10)


def test_float32_and_network_score():
    # A float32 run agrees with float64 to float32 ODE accuracy; a torch.nn score (parameters with
    # requires_grad) leaves no graph behind in the results.
    sde, gm = sdegen.VPSDE(), sdegen.named_mixture("8gaussians")
    x = data(gm, 4, seed=12)
    r64 = log_likelihood(sde, gm.score_fn(sde), x, rtol=1e-5, atol=1e-5, eps=1e-3)
    gm32 = gm.to(dtype=torch.float32)
    r32 = log_likelihood(sde, gm32.score_fn(sde), x.float(), rtol=1e-5, atol=1e-5, eps=1e-3)
    assert r32.log_prob.dtype == torch.float32
    torch.testing.assert_close(r32.log_prob.double(), r64.log_prob, rtol=0, atol=1e-3)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    r = log_likelihood(sde, lambda v, t: net(v) - v, x, rtol=1e-4, atol=1e-4, eps=1e-3)
    assert torch.isfinite(r.log_prob).all() and not r.log_prob.requires_grad and not r.latent.requires_grad


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs():
    sde, gm = sdegen.VPSDE(), sdegen.named_mixture("8gaussians")
    score = gm.score_fn(sde)
    x = data(gm, 2, seed=13)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        log_likelihood(sde, score, bad)
    with pytest.raises(ValueError, match="eps"):
        log_likelihood(sde, score, x, eps=1.0)
    with pytest.raises(ValueError, match="too small"):
        log_likelihood(sdegen.VESDE(), score, x.float(), eps=1e-9)
    with pytest.raises(ValueError, match="too small"):
        encode(sdegen.VPSDE(), score, x.float(), eps=1e-11)
    for kw, match in ((dict(divergence="trace"), "exact"), (dict(probe_dist="normal"), "rademacher"),
                      (dict(method="euler"), "rk45"), (dict(prior="standard"), "callable"),
                      (dict(probes=0), "probes"), (dict(batch_size=0), "batch_size"),
                      (dict(method="scipy", per_sample=True), "per_sample")):
        with pytest.raises((ValueError, TypeError), match=match):
            log_likelihood(sde, score, x, **kw)
    with pytest.raises(ValueError, match="prior"):
        log_likelihood(sde, score, x, prior=lambda z: z)


# ---------------------------------------------------------------------------------------------- bits/dim
@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_bits_per_dim_of_uniform_density_is_n_bits(data_range):
    # The uniform density on the data range puts mass 1/K on each of the K levels: exactly n_bits.
    lo, hi = data_range
    D = 12
    y = torch.rand(5, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * (hi - lo) + lo
    log_p = torch.full((5,), -D * math.log(hi - lo), dtype=F64)
    torch.testing.assert_close(bits_per_dim(log_p, y, data_range=data_range), torch.full((5,), 8.0, dtype=F64))
    torch.testing.assert_close(bits_per_dim(log_p, y, data_range=data_range, n_bits=5),
                               torch.full((5,), 5.0, dtype=F64))
    # Several dequantization draws: the mean of the log-densities.
    draws = torch.stack([log_p - 1.0, log_p + 1.0])
    torch.testing.assert_close(bits_per_dim(draws, y, data_range=data_range), torch.full((5,), 8.0, dtype=F64))


def test_bits_per_dim_checks_range_and_shape():
    y = torch.zeros(2, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"data_range \[0.0, 1.0\]"):
        bits_per_dim(torch.zeros(2, dtype=F64), y - 0.5, data_range=(0, 1))
    with pytest.raises(ValueError, match="log_prob"):
        bits_per_dim(torch.zeros(3, dtype=F64), y)
    with pytest.raises(ValueError, match="lo < hi"):
        bits_per_dim(torch.zeros(2, dtype=F64), y, data_range=(1, -1))


def test_dequantize_fills_each_level_bin():
    K = 256
    k = torch.randint(0, K, (64, 3, 4, 4), generator=torch.Generator().manual_seed(1))
    x = -1 + 2 * k.to(F64) / (K - 1)
    y = dequantize(x, generator=torch.Generator().manual_seed(2))
    # y lies in level k's bin [lo + k Δ, lo + (k + 1) Δ), Δ = 2 / 256.
    assert torch.equal(torch.floor((y + 1) / (2 / K)).long(), k)
    # u is uniform: its mean over 3072 entries is 0.5 +- 4 * sqrt(1/12 / 3072) = 0.5 +- 0.021.
    u = (y + 1) / (2 / K) - k
    assert abs(float(u.mean()) - 0.5) < 0.021
    with pytest.raises(ValueError, match="levels off"):
        dequantize(0.5 * x + 0.3 / K)  # inside the range, but between levels
    with pytest.raises(ValueError, match="data_range"):
        dequantize(x * 2)


# ---------------------------------------------------------------------------------------------- slow, CUDA
@pytest.mark.slow
@pytest.mark.parametrize("name", list(SDES))
def test_exact_divergence_64d(name):
    sde, gm = SDES[name](), sdegen.named_mixture("mixture64")
    x = data(gm, 8, seed=14)
    res = log_likelihood(sde, gm.score_fn(sde), x, rtol=1e-6, atol=1e-6, prior=exact_prior(gm, sde))
    assert ((res.log_prob - gm.log_prob_t(x, 1e-5, sde)).abs() / gm.dim).max() < 1e-3


@pytest.mark.slow
def test_trained_model_prefers_held_out_data():
    # A small eps-MLP trained on 8gaussians (VP): the ODE likelihood of held-out data must beat the
    # same points shifted by (1, 1) by a wide margin (true gap ~14 nats; measured ~4.5), and be
    # within 1 nat of the true mean log-density (measured ~0.6 off after 1500 steps). With 256
    # points the means have standard errors ~0.1 nat, far below both margins.
    gm = sdegen.named_mixture("8gaussians", dtype=torch.float32)
    sde = sdegen.VPSDE()
    data = gm.sample(20000, generator=torch.Generator().manual_seed(0))
    model = sdegen.ScoreModel(sdegen.nn.MLP(2, hidden=128, depth=3), sde, "eps")
    out = sdegen.train(model, data, steps=1500, batch_size=256, lr=2e-3, progress=False, seed=0)
    held = gm.sample(256, generator=torch.Generator().manual_seed(1))
    r_held = log_likelihood(sde, out.model, held, rtol=1e-4, atol=1e-4, eps=1e-3)
    r_shift = log_likelihood(sde, out.model, held + 1.0, rtol=1e-4, atol=1e-4, eps=1e-3)
    assert float(r_held.log_prob.mean()) > float(r_shift.log_prob.mean()) + 2.0
    assert abs(float(r_held.log_prob.mean()) - float(gm.log_prob(held).mean())) < 1.0


@pytest.mark.cuda
def test_cuda_matches_cpu():
    dev = torch.device("cuda")
    sde = sdegen.VPSDE()
    gm = sdegen.named_mixture("mixture16")
    gmc = sdegen.named_mixture("mixture16", device=dev)
    x = data(gm, 4, seed=15)
    cpu = log_likelihood(sde, gm.score_fn(sde), x, rtol=1e-6, atol=1e-6)
    for div in ("exact", "hutchinson"):
        res = log_likelihood(sde, gmc.score_fn(sde), x.to(dev), divergence=div, rtol=1e-6, atol=1e-6,
                             generator=torch.Generator(dev).manual_seed(0))
        assert res.log_prob.device.type == "cuda" and res.latent.device.type == "cuda"
        if div == "exact":
            torch.testing.assert_close(res.log_prob.cpu(), cpu.log_prob, rtol=0, atol=1e-6)
    z = encode(sde, gmc.score_fn(sde), x.to(dev), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(decode(sde, gmc.score_fn(sde), z, rtol=1e-7, atol=1e-7).cpu(), x, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------- autograd cut
def _cut_scores(sde, gm):
    """Scores that are numerically exact but cut from x's autograd graph, one per cause."""
    exact = gm.score_fn(sde)
    lin = torch.nn.Linear(2, 2, dtype=F64)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()

    def under_no_grad(x, t):
        with torch.no_grad():
            return exact(x, t)

    def from_detached(x, t):
        return exact(x.detach(), t)

    def through_numpy(x, t):
        return torch.from_numpy(exact(torch.from_numpy(x.detach().cpu().numpy()), t.detach()).numpy())

    def detached_through_parameters(x, t):
        # requires_grad=True through the (zero) layer's parameters, yet no path to x.
        return exact(x.detach(), t) + lin(x.detach())

    return {"no_grad": under_no_grad, "detach": from_detached, "numpy": through_numpy,
            "parameters": detached_through_parameters}


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
@pytest.mark.parametrize("cause", ["no_grad", "detach", "numpy", "parameters"])
def test_score_cut_from_autograd_is_refused(cause, divergence):
    # Each of these gave log p off by 10-12 nats without a word (issue 14, item 2): the divergence
    # of the drift then misses the score's Jacobian.
    sde, gm = sdegen.VPSDE(), sdegen.named_mixture("8gaussians")
    score = _cut_scores(sde, gm)[cause]
    x = data(gm, 4, seed=3)
    with pytest.raises(ValueError, match=r"does not depend on x through autograd.*torch\.no_grad\(\), "
                                         r"from x\.detach\(\), or through numpy"):
        log_likelihood(sde, score, x, divergence=divergence, generator=torch.Generator().manual_seed(0))


def test_score_cut_from_autograd_is_fine_for_encode():
    # encode integrates the score only (no divergence): the same detached score gives the latent of
    # the differentiable one, to the solver's tolerance.
    sde, gm = sdegen.VPSDE(), sdegen.named_mixture("8gaussians")
    x = data(gm, 4, seed=4)
    z_cut = encode(sde, _cut_scores(sde, gm)["no_grad"], x, rtol=1e-6, atol=1e-6)
    z = encode(sde, gm.score_fn(sde), x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z_cut, z, rtol=1e-10, atol=1e-10)


def test_differentiable_score_still_exact_after_the_check():
    # The check costs one VJP on the first evaluation and changes nothing: log p is the oracle's to
    # the ODE tolerance (~1e-5 nats per dimension at rtol = atol = 1e-6, requirement 1e-3).
    sde, gm = sdegen.SubVPSDE(), sdegen.named_mixture("8gaussians")
    x = data(gm, 5, seed=5)
    res = log_likelihood(sde, gm.score_fn(sde), x, rtol=1e-6, atol=1e-6, eps=1e-5, prior=exact_prior(gm, sde))
    assert ((res.log_prob - gm.log_prob_t(x, 1e-5, sde)).abs() / gm.dim).max() < 1e-3
