"""The Gaussian-mixture oracle: exact perturbed marginals, scores and log-densities."""

import math

import pytest
import torch

from sdegen import AffineSDE, GaussianMixture, SubVPSDE, VESDE, VPSDE, named_mixture
from sdegen.oracle import MIXTURE_NAMES

F64 = torch.float64
SDES = [VPSDE(), SubVPSDE(), VESDE(), AffineSDE(a=lambda t: -0.5 * (1 + t), g=lambda t: (1 + t).sqrt())]


@pytest.mark.parametrize("name", MIXTURE_NAMES)
@pytest.mark.parametrize("sde", SDES, ids=["vp", "subvp", "ve", "custom"])
def test_score_is_gradient_of_log_prob_t(name, sde):
    gm = named_mixture(name)
    gen = torch.Generator().manual_seed(0)
    n = 64
    t = torch.rand(n, dtype=F64, generator=gen) * 0.98 + 0.01
    m, s = sde.marginal(t)
    x = m[:, None] * gm.sample(n, generator=gen) + s[:, None] * torch.randn(n, gm.dim, dtype=F64, generator=gen)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(gm.log_prob_t(x, t, sde).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), t, sde), g, rtol=1e-5, atol=1e-8)


def test_log_prob_matches_torch_distributions():
    gm = named_mixture("anisotropic")
    x = gm.sample(100, generator=torch.Generator().manual_seed(1))
    comps = torch.distributions.MultivariateNormal(gm.means, covariance_matrix=gm.covs)
    ref = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(gm.weights), comps)
    torch.testing.assert_close(gm.log_prob(x), ref.log_prob(x))


@pytest.mark.parametrize("sde", SDES[:3], ids=["vp", "subvp", "ve"])
def test_perturbed_matches_log_prob_t(sde):
    gm = named_mixture("mixture16")
    x = gm.sample(50, generator=torch.Generator().manual_seed(2))
    pt = gm.perturbed(sde, 0.3)
    torch.testing.assert_close(pt.log_prob(x), gm.log_prob_t(x, 0.3, sde))
    m, s = sde.marginal(0.3)
    torch.testing.assert_close(pt.covs, m**2 * gm.covs + s**2 * torch.eye(16, dtype=F64))


@pytest.mark.parametrize("sde", SDES[:3], ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("t_end", [0.3, 1.0])
def test_forward_euler_maruyama_matches_perturbed_moments(sde, t_end):
    """Forward EM from mixture samples on a fine grid: mean and covariance within 4 standard errors.

    Standard errors come from the samples themselves (the mixture is not Gaussian): SE of a mean is
    std/sqrt(n); SE of a covariance entry is std((x_i - mu_i)(x_j - mu_j))/sqrt(n). EM's weak bias
    with 1000 steps (O(dt), e.g. +beta dt/4 ~ 0.5 % of the VP variance at beta=20) stays below 1 SE.
    """
    gm = named_mixture("anisotropic")
    n, steps = 20000, 1000
    gen = torch.Generator().manual_seed(7)
    x = gm.sample(n, generator=gen)
    dt = t_end / steps
    for k in range(steps):
        t = torch.full((n,), k * dt, dtype=F64)
        x = x + sde.drift(x, t) * dt + sde.diffusion(t)[:, None] * math.sqrt(dt) * torch.randn(x.shape, generator=gen, dtype=F64)
    exact = gm.perturbed(sde, t_end)
    mu, cov = exact.mean(), exact.covariance()
    z_mean = (x.mean(0) - mu) / (x.std(0) / math.sqrt(n))
    assert z_mean.abs().max() < 4, z_mean
    c = x - mu
    prod = c[:, :, None] * c[:, None, :]
    z_cov = (prod.mean(0) - cov) / (prod.std(0) / math.sqrt(n))
    assert z_cov.abs().max() < 4, z_cov


@pytest.mark.parametrize("sde", SDES[:3], ids=["vp", "subvp", "ve"])
def test_perturbed_at_T_close_to_prior(sde):
    """KL(p_T || prior) by Monte Carlo is small for the default parameters (< 0.01 nats in 2-D)."""
    gm = named_mixture("8gaussians")
    pT = gm.perturbed(sde, sde.T)
    x = pT.sample(20000, generator=torch.Generator().manual_seed(3))
    d = pT.log_prob(x) - sde.prior_log_prob(x)
    kl, se = float(d.mean()), float(d.std()) / math.sqrt(x.shape[0])
    assert kl + 4 * se < 0.01, (kl, se)
    assert kl > -4 * se - 1e-9  # a KL cannot be negative


def test_same_generator_same_draws():
    gm = named_mixture("mixture64")
    a = gm.sample(100, generator=torch.Generator().manual_seed(11))
    b = gm.sample(100, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    c = gm.sample(100, generator=torch.Generator().manual_seed(12))
    assert not torch.equal(a, c)


def test_sample_moments():
    gm = named_mixture("anisotropic")
    n = 40000
    x = gm.sample(n, generator=torch.Generator().manual_seed(4))
    z = (x.mean(0) - gm.mean()) / (x.std(0) / math.sqrt(n))
    assert z.abs().max() < 4


def test_float32_and_batched_times():
    gm = named_mixture("8gaussians", dtype=torch.float32)
    vp = VPSDE()
    x = gm.sample(10, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.01, 1, 10)
    s = gm.score(x, t, vp)
    assert s.dtype == torch.float32 and s.shape == x.shape
    gm64 = named_mixture("8gaussians")
    torch.testing.assert_close(s.double(), gm64.score(x.double(), t.double(), vp), rtol=1e-4, atol=1e-4)
    # image-shaped input with prod(D) = d is accepted and the score keeps the shape
    assert gm64.score(x.double().reshape(10, 1, 1, 2), t.double(), vp).shape == (10, 1, 1, 2)


def test_python_numbers_are_not_rounded_through_float32():
    # torch.as_tensor(0.2) is float32 (0.2000000030); a float64 mixture must hold the Python values
    # themselves: 8gaussians' component variance is 0.2 ** 2 exactly, not 0.0400000012.
    gm = named_mixture("8gaussians")
    assert gm.covs[0, 0, 0].item() == 0.2 ** 2
    gm = GaussianMixture(torch.zeros(2, 2, dtype=F64), stds=[0.1, 0.3], weights=[0.3, 0.7])
    assert gm.covs[:, 0, 0].tolist() == [0.1 ** 2, 0.3 ** 2]
    assert gm.weights.tolist() == [0.3, 0.7]
    gm = GaussianMixture([[0.1, 0.7]], covs=[[0.3, 0.1], [0.1, 0.3]], dtype=F64)
    assert gm.means.tolist() == [[0.1, 0.7]]
    assert torch.allclose(gm.covs[0], torch.tensor([[0.3, 0.1], [0.1, 0.3]], dtype=F64), rtol=0, atol=1e-15)
    # the mixture's dtype still follows the means (Python floats: torch's default) unless given
    assert GaussianMixture([[0.1, 0.7]], stds=0.2).dtype == torch.get_default_dtype()
    assert named_mixture("8gaussians", dtype=torch.float32).covs.dtype == torch.float32


def test_diag_iso_full_agree():
    means = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=F64)
    stds = torch.tensor([[0.5, 0.2], [1.0, 0.3]], dtype=F64)
    diag = GaussianMixture(means, stds=stds, weights=[0.4, 0.6])
    full = GaussianMixture(means, covs=torch.diag_embed(stds**2), weights=[0.4, 0.6])
    x = torch.randn(20, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.rand(20, dtype=F64, generator=torch.Generator().manual_seed(1))
    vp = VPSDE()
    torch.testing.assert_close(diag.log_prob_t(x, t, vp), full.log_prob_t(x, t, vp))
    torch.testing.assert_close(diag.score(x, t, vp), full.score(x, t, vp))
    iso = GaussianMixture(means, stds=torch.tensor([0.5, 1.0], dtype=F64))
    iso_full = GaussianMixture(means, covs=torch.stack([0.25 * torch.eye(2), torch.eye(2)]).double())
    torch.testing.assert_close(iso.log_prob(x), iso_full.log_prob(x))


def test_ill_conditioned_covariance_is_stable():
    """Eigenvalues 1e-8 and 1: log-density and score stay finite and match the Cholesky-based reference."""
    U = torch.tensor([[math.cos(0.3), -math.sin(0.3)], [math.sin(0.3), math.cos(0.3)]], dtype=F64)
    cov = U @ torch.diag(torch.tensor([1.0, 1e-8], dtype=F64)) @ U.T
    gm = GaussianMixture(torch.zeros(1, 2, dtype=F64), covs=(cov + cov.T)[None] / 2)
    x = gm.sample(100, generator=torch.Generator().manual_seed(0))
    ref = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=F64), covariance_matrix=(cov + cov.T) / 2)
    torch.testing.assert_close(gm.log_prob(x), ref.log_prob(x), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(gm.score(x, torch.full((100,), 0.001, dtype=F64), VPSDE())).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(means=torch.zeros(2, 2), weights=[0.5, 0.6]), "sum to 1"),
    (dict(means=torch.zeros(2, 2), weights=[1.5, -0.5]), "non-negative"),
    (dict(means=torch.zeros(2, 2), weights=[1.0]), "weights must have shape"),
    (dict(means=torch.zeros(1, 2), covs=torch.tensor([[[1.0, 2.0], [2.0, 1.0]]])), "positive definite"),
    (dict(means=torch.zeros(1, 2), covs=torch.tensor([[[1.0, 0.5], [0.0, 1.0]]])), "symmetric"),
    (dict(means=torch.zeros(1, 2), covs=torch.eye(3)[None]), "covs must have shape"),
    (dict(means=torch.zeros(1, 2), stds=-1.0), "stds"),
    (dict(means=torch.zeros(1, 2), stds=0.1, covs=torch.eye(2)[None]), "not both"),
    (dict(means=torch.zeros(2, 2, 2)), "means must have shape"),
])
def test_bad_mixture_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


def test_bad_evaluation_arguments():
    gm = named_mixture("8gaussians")
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        gm.log_prob(torch.zeros(4, 3, dtype=F64))
    with pytest.raises(TypeError, match="floating"):
        gm.log_prob(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="AffineSDE"):
        from sdegen import CustomSDE
        gm.score_fn(CustomSDE(lambda x, t: x, lambda t: 1.0))
    with pytest.raises(ValueError, match="t must lie"):
        gm.log_prob_t(torch.zeros(4, 2, dtype=F64), 2.0, VPSDE())
    with pytest.raises(ValueError, match="unknown mixture"):
        named_mixture("nope")


@pytest.mark.cuda
def test_cuda_oracle_matches_cpu():
    dev = torch.device("cuda")
    for name in MIXTURE_NAMES:
        gm = named_mixture(name)
        gmc = named_mixture(name, device=dev)
        x = gm.sample(32, generator=torch.Generator().manual_seed(0))
        t = torch.rand(32, dtype=F64, generator=torch.Generator().manual_seed(1))
        for sde in SDES[:3]:
            out = gmc.score(x.to(dev), t.to(dev), sde)
            assert out.device.type == "cuda"
            torch.testing.assert_close(out.cpu(), gm.score(x, t, sde))
            torch.testing.assert_close(gmc.log_prob_t(x.to(dev), t.to(dev), sde).cpu(), gm.log_prob_t(x, t, sde))
        assert gmc.sample(5, generator=torch.Generator(device=dev).manual_seed(0)).device.type == "cuda"
