"""Inpainting and colourization against the exact conditional of a Gaussian mixture.

For x ~ sum_k w_k N(mu_k, S_k) and known coordinates K fixed to y, the conditional of the unknown
coordinates U is again a mixture, with
    mean_k = mu_U + S_UK S_KK^{-1} (y - mu_K),   cov_k = S_UU - S_UK S_KK^{-1} S_KU,
    w_k' proportional to w_k N(y; mu_K, S_KK)
(Bishop 2006, eq. 2.81-2.82 per component, Bayes for the weights). Samples are compared with it by
a Kolmogorov-Smirnov test on one unknown coordinate and by moment z-tests.
"""

import math

import pytest
import torch

import sdegen
from sdegen.conditional import colorize, gray_transform, inpaint

F64 = torch.float64


def exact_conditional(gm, known_idx, y):
    """The conditional mixture of the unknown coordinates given x[known_idx] = y: (weights, means, covs)."""
    d = gm.dim
    K = torch.as_tensor(known_idx)
    U = torch.tensor([i for i in range(d) if i not in set(K.tolist())])
    covs, means = gm.covs, gm.means
    S_KK = covs[:, K][:, :, K]
    S_UK = covs[:, U][:, :, K]
    S_UU = covs[:, U][:, :, U]
    diff = y[None, :] - means[:, K]                                   # (C, |K|)
    sol = torch.linalg.solve(S_KK, diff[..., None])[..., 0]
    cond_means = means[:, U] + (S_UK @ sol[..., None])[..., 0]
    cond_covs = S_UU - S_UK @ torch.linalg.solve(S_KK, S_UK.transpose(1, 2))
    logn = -0.5 * (diff * sol).sum(1) - 0.5 * torch.logdet(S_KK)
    w = torch.softmax(gm.weights.log() + logn, 0)
    return w, cond_means, cond_covs


def mixture_cdf_1d(x, w, mean, var):
    return (w * 0.5 * (1 + torch.erf((x[:, None] - mean) / (2 * var).sqrt()))).sum(1)


def ks_stat(samples, w, mean, var):
    x = samples.sort().values
    n = x.numel()
    F = mixture_cdf_1d(x, w, mean, var)
    i = torch.arange(1, n + 1, dtype=F64)
    return float(torch.maximum(i / n - F, F - (i - 1) / n).max())


def ks_crit(n, alpha=1e-3):
    # Asymptotic Kolmogorov critical value sqrt(-log(alpha/2)/2)/sqrt(n) (Smirnov); 1.95/sqrt(n) at 1e-3.
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(n)


def _anisotropic_setup(n):
    gm = sdegen.named_mixture("anisotropic")
    y = torch.tensor([0.3], dtype=F64)          # a bimodal conditional: weights about 0.25 / 0.75
    x_known = torch.zeros(n, 2, dtype=F64)
    x_known[:, 0] = y
    mask = torch.tensor([[True, False]])
    w, mu, cov = exact_conditional(gm, [0], y)
    return gm, x_known, mask, w, mu[:, 0], cov[:, 0, 0]


SDES = {"vp": sdegen.VPSDE(), "subvp": sdegen.SubVPSDE(), "ve": sdegen.VESDE(0.01, 10.0)}


def test_exact_conditional_helper_by_rejection(generator):
    # Independent check of the reference: samples of the joint with x_0 in a thin slab around y.
    gm, _, _, w, mu, var = _anisotropic_setup(1)
    x = gm.sample(400000, generator=generator)
    sel = x[(x[:, 0] - 0.3).abs() < 0.01, 1]
    assert sel.numel() > 500
    assert ks_stat(sel, w, mu, var) < ks_crit(sel.numel()) + 0.01   # + slab-width bias


def test_smc_matches_exact_conditional():
    n = 300
    gm, x_known, mask, w, mu, var = _anisotropic_setup(n)
    sde = SDES["vp"]
    res = inpaint(sde, gm.score_fn(sde), x_known, mask, method="smc", steps=80, particles=24,
                  generator=torch.Generator().manual_seed(3))
    x = res.samples
    assert torch.equal(x[:, 0], x_known[:, 0])
    assert res.nfe == 81 and res.stats["resampling_steps"] > 0
    # KS at level 1e-3 with n iid outputs (independent particle groups), plus 0.04 for SMC's O(1/P)
    # and the ancestral kernel's O(1/steps) bias (measured about 0.03 at P=12, 150 steps).
    assert ks_stat(x[:, 1], w, mu, var) < ks_crit(n) + 0.04


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SDES))
def test_smc_matches_exact_conditional_large(name):
    # Measured SMC bias (KS distance, VE, 150 steps): 0.104 with 12 particles, 0.033 with 48; hence 64.
    n = 10000
    gm, x_known, mask, w, mu, var = _anisotropic_setup(n)
    sde = SDES[name]
    res = inpaint(sde, gm.score_fn(sde), x_known, mask, method="smc", steps=300, particles=64,
                  generator=torch.Generator().manual_seed(4))
    x = res.samples[:, 1]
    assert ks_stat(x, w, mu, var) < ks_crit(n) + 0.02
    mean = float((w * mu).sum())
    second = float((w * (var + mu.square())).sum())
    sd = math.sqrt(second - mean**2)
    assert abs(float(x.mean()) - mean) < 5 * sd / math.sqrt(n) + 0.02


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["replacement", "masked_ode", "smc"])
def test_inpaint_on_cuda(method):
    gm, x_known, mask, w, mu, var = _anisotropic_setup(400)
    sde = sdegen.VPSDE()
    g = torch.Generator(device="cuda").manual_seed(0)
    res = inpaint(sde, gm.to("cuda").score_fn(sde), x_known.cuda().float(), mask.cuda(), method=method, steps=60,
                  generator=g)
    assert res.samples.device.type == "cuda" and res.samples.dtype == torch.float32
    assert bool(torch.isfinite(res.samples).all())
    assert torch.equal(res.samples[:, 0], x_known[:, 0].cuda().float())


def _grid_product_mixture():
    # Equal weights on the grid {-1, 1}^2 with isotropic std 0.3: p(x) = p_1(x_1) p_2(x_2), so the
    # conditional of x_2 given x_1 is the 1-D marginal 0.5 N(-1, 0.09) + 0.5 N(1, 0.09).
    means = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], dtype=F64)
    return sdegen.GaussianMixture(means, stds=0.3, dtype=F64)


@pytest.mark.parametrize("name,method,opts", [
    ("vp", "replacement", {"steps": 100}),
    ("vp", "replacement", {"steps": 100, "predictor": "ancestral"}),
    ("vp", "masked_ode", {"steps": 40}),
    ("subvp", "replacement", {"steps": 100, "predictor": "euler_maruyama"}),
    ("ve", "replacement", {"steps": 100}),
])
def test_replacement_exact_for_independent_coordinates(name, method, opts):
    """Where x_U and x_K are independent the replacement approximations are exact (the score of x_U
    does not depend on x_K), so these check the mechanics: noise, masks, re-noising, denoising."""
    gm = _grid_product_mixture()
    sde = SDES[name]
    n = 800
    x_known = torch.full((n, 2), 0.7, dtype=F64)
    res = inpaint(sde, gm.score_fn(sde), x_known, torch.tensor([[1, 0]]), method=method,
                  generator=torch.Generator().manual_seed(1), **opts)
    assert torch.equal(res.samples[:, 0], x_known[:, 0])
    w = torch.tensor([0.5, 0.5], dtype=F64)
    mu = torch.tensor([-1.0, 1.0], dtype=F64)
    var = torch.tensor([0.09, 0.09], dtype=F64)
    # KS at level 1e-3 plus 0.03 for the O(1/steps) discretization bias.
    assert ks_stat(res.samples[:, 1], w, mu, var) < ks_crit(n) + 0.03
    denoise = opts.get("denoise", method == "replacement")
    assert res.nfe == opts["steps"] * (2 if method == "masked_ode" else 1) + int(denoise)


@pytest.mark.slow
def test_replacement_bias_is_real():
    """The documented limitation: on a correlated mixture, replacement and the masked ODE miss the exact
    conditional by far more than sampling error, while SMC (same budget per particle) does not."""
    n = 10000
    gm, x_known, mask, w, mu, var = _anisotropic_setup(n)
    sde = sdegen.VPSDE()
    crit = ks_crit(n)
    stats = {}
    for method, opts in (("replacement", {"steps": 500}), ("masked_ode", {"steps": 200})):
        res = inpaint(sde, gm.score_fn(sde), x_known, mask, method=method, generator=torch.Generator().manual_seed(2),
                      **opts)
        stats[method] = ks_stat(res.samples[:, 1], w, mu, var)
    assert min(stats.values()) > 3 * crit, stats


def test_colorize_matches_exact_conditional():
    # 3 "colour channels" of one pixel: a random full-covariance mixture in R^3. Observing the grey
    # level g = mean(x) fixes (Qx)_0 = sqrt(3) g; the exact conditional is that of the rotated mixture.
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 3, generator=g, dtype=F64)
    A = torch.randn(3, 3, 3, generator=g, dtype=F64)
    covs = 0.1 * A @ A.transpose(1, 2) + 0.05 * torch.eye(3, dtype=F64)
    gm = sdegen.GaussianMixture(means, covs=covs, weights=[0.2, 0.3, 0.5])
    Q = gray_transform(3)
    rotated = sdegen.GaussianMixture(means @ Q.T, covs=Q @ covs @ Q.T, weights=[0.2, 0.3, 0.5])
    gray_value = float(gm.mean().mean())
    w, mu, cov = exact_conditional(rotated, [0], torch.tensor([math.sqrt(3) * gray_value], dtype=F64))
    n = 300
    sde = sdegen.VPSDE()
    res = colorize(sde, gm.score_fn(sde), torch.full((n, 1), gray_value, dtype=F64), method="smc", steps=80,
                   particles=16, generator=torch.Generator().manual_seed(5))
    x = res.samples
    assert x.shape == (n, 3)
    torch.testing.assert_close(x.mean(1), torch.full((n,), gray_value, dtype=F64))
    xr = (x @ Q.T)[:, 1:]                     # the inpainted rotated coordinates
    mean = (w[:, None] * mu).sum(0)
    cov_total = (w[:, None, None] * (cov + mu[:, :, None] * mu[:, None, :])).sum(0) - torch.outer(mean, mean)
    sd = cov_total.diagonal().sqrt()
    # Mean z-test (SE = sd/sqrt(n)) per rotated coordinate, plus 0.05 for SMC's finite-P bias.
    assert float(((xr.mean(0) - mean).abs() - 5 * sd / math.sqrt(n)).max()) < 0.05
    for j in range(2):
        assert ks_stat(xr[:, j], w, mu[:, j], cov[:, j, j]) < ks_crit(n) + 0.04


def test_inpaint_image_shapes_and_transform():
    # (B, C, H, W) data with a per-pixel mask; an isotropic Gaussian N(0.5, 0.25 I) keeps every pixel
    # independent, so unknown pixels are N(0.5, 0.25) whatever the mask.
    gm = sdegen.GaussianMixture(torch.full((1, 12), 0.5, dtype=torch.float32), stds=0.5)
    sde = sdegen.VPSDE()
    score = gm.score_fn(sde)
    x_known = torch.zeros(400, 3, 2, 2)
    mask = torch.zeros(1, 3, 2, 2)
    mask[..., 0, :] = 1
    res = inpaint(sde, score, x_known, mask, method="replacement", steps=50,
                  generator=torch.Generator().manual_seed(0))
    x = res.samples
    assert x.shape == x_known.shape and x.dtype == torch.float32
    assert torch.equal(x[..., 0, :], x_known[..., 0, :])
    unk = x[..., 1, :].reshape(-1)
    # 2400 values: mean SE 0.5/sqrt(2400) = 0.010; variance SE 0.25*sqrt(2/2400) = 0.0072.
    assert abs(float(unk.mean()) - 0.5) < 0.06 and abs(float(unk.var()) - 0.25) < 0.04
    col = colorize(sde, score, torch.full((4, 2, 2), 0.5), steps=10, generator=torch.Generator().manual_seed(0))
    assert col.samples.shape == (4, 3, 2, 2)
    torch.testing.assert_close(col.samples.mean(1), torch.full((4, 2, 2), 0.5))


def test_inpaint_reproducible_and_model_kwargs():
    gm = _grid_product_mixture()
    sde = sdegen.VPSDE()
    seen = []

    def score(x, t, label=None):
        seen.append(label)
        return gm.score(x, t, sde)

    x_known = torch.zeros(8, 2, dtype=F64)
    for method in ("replacement", "masked_ode", "smc"):
        a = inpaint(sde, score, x_known, [[1, 0]], method=method, steps=5, generator=torch.Generator().manual_seed(9),
                    model_kwargs={"label": "L"})
        b = inpaint(sde, score, x_known, [[1, 0]], method=method, steps=5, generator=torch.Generator().manual_seed(9),
                    model_kwargs={"label": "L"})
        assert torch.equal(a.samples, b.samples)
    assert set(seen) == {"L"}


def test_inpaint_errors():
    gm = _grid_product_mixture()
    sde = sdegen.VPSDE()
    score = gm.score_fn(sde)
    x = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="unknown method"):
        inpaint(sde, score, x, [[1, 0]], method="repaint")
    with pytest.raises(TypeError, match="unknown option"):
        inpaint(sde, score, x, [[1, 0]], method="masked_ode", corrector="langevin")
    with pytest.raises(ValueError, match="unknown predictor"):
        inpaint(sde, score, x, [[1, 0]], predictor="heun", steps=2)
    with pytest.raises(ValueError, match="mask"):
        inpaint(sde, score, x, [[1, 0, 1]])
    with pytest.raises(ValueError, match="0/1"):
        inpaint(sde, score, x, [[0.5, 0]])
    with pytest.raises(ValueError, match="orthogonal"):
        inpaint(sde, score, x, [[1, 0]], transform=torch.ones(2, 2))
    with pytest.raises(TypeError, match="AffineSDE"):
        inpaint(sdegen.CustomSDE(lambda x, t: -x, lambda t: 1.0), score, x, [[1, 0]])
    with pytest.raises(ValueError, match="eps"):
        inpaint(sde, score, x, [[1, 0]], eps=0.0)
