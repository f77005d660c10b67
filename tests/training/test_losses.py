r"""DSM losses against closed forms on Gaussian data.

Data $x_0 \sim \mathcal N(\mu, \sigma_0^2 I)$ (the oracle's "gaussian": $\mu = 0.5$, $\sigma_0 = 0.5$, d = 2).
Then $p_t = \mathcal N(m\mu, v I)$ with $v = m^2\sigma_0^2 + s^2$, the exact score is
$S^* = -(x - m\mu)/v$, and with $x = m x_0 + s\epsilon$, $x_0 = \mu + \sigma_0 z$:

$$\hat\epsilon - \epsilon = -s S^* - \epsilon = \frac{s m \sigma_0 z - m^2\sigma_0^2 \epsilon}{v},\qquad
  \mathbb E\|\hat\epsilon - \epsilon\|^2 / d = \frac{m^2\sigma_0^2 (s^2 + m^2\sigma_0^2)}{v^2} = \frac{m^2\sigma_0^2}{v}.$$

So the expected loss at the exact score is $\mathbb E_t[w(t)\,m^2\sigma_0^2/v]$ with $w = 1$ (standard) or
$g^2/s^2$ (likelihood), $t \sim \mathcal U[\epsilon_t, T]$ (computed here by adaptive quadrature). Adding
$h$ to the score raises the expected standard loss by exactly $\mathbb E_t[s^2\,\mathbb E\|h\|^2/d]$ (the
cross term vanishes because $\mathbb E[S^* + \epsilon/s \mid x_t] = 0$).
"""

import math

import pytest
import torch
from scipy.integrate import quad

import sdegen
from sdegen.training import dsm_loss, sample_time, smld_loss, ddpm_loss
from sdegen.parameterization import ScoreModel, PARAMETERIZATIONS

F64 = torch.float64
MU, SIGMA0, D = 0.5, 0.5, 2
N = 100_000


class _ExactScore(torch.nn.Module):
    """The exact score of N(mu, sigma0^2 I) under ``sde``, optionally perturbed: (1 + scale) S* + shift."""

    def __init__(self, sde, shift=0.0, scale=0.0):
        super().__init__()
        self.sde, self.shift, self.scale = sde, shift, scale

    def forward(self, x, t_in):
        m, s = self.sde.marginal(t_in * self.sde.T)
        v = (m.square() * SIGMA0**2 + s.square())[:, None]
        return -(1 + self.scale) * (x - m[:, None] * MU) / v + self.shift


def _data(seed=0):
    return sdegen.named_mixture("gaussian").sample(N, generator=torch.Generator().manual_seed(seed))


def _expect(sde, f, eps):
    """E_t f(t) for t ~ U[eps, T], by adaptive quadrature in float64 (points spread on a log grid)."""
    def g(t):
        return float(f(torch.tensor([t], dtype=F64)))

    brk = [eps * 10**k for k in range(1, 6) if eps * 10**k < sde.T]
    val, err = quad(g, eps, sde.T, points=brk or None, limit=400, epsabs=1e-12, epsrel=1e-10)
    return val / (sde.T - eps)


def _ratio(sde, t):
    m, s = sde.marginal(t)
    return m.square() * SIGMA0**2 / (m.square() * SIGMA0**2 + s.square())


def _mc(model, x0, seed, **kw):
    per = dsm_loss(model, x0, generator=torch.Generator().manual_seed(seed), per_sample=True, **kw)
    return float(per.mean()), float(per.std()) / math.sqrt(per.numel()), per


@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.VESDE(sigma_min=0.01, sigma_max=10.0), sdegen.SubVPSDE()],
                         ids=["vp", "ve", "subvp"])
def test_standard_loss_matches_analytic_value(sde):
    model = ScoreModel(_ExactScore(sde), sde, "score")
    mean, se, _ = _mc(model, _data(), 1, eps=1e-5)
    expected = _expect(sde, lambda t: _ratio(sde, t), 1e-5)
    # Per-sample losses are bounded chi-square-like variables: the CLT applies; 4 SE is a 6e-5 false-alarm rate.
    assert se < 0.01 * expected
    assert abs(mean - expected) < 4 * se, (mean, expected, se)


def test_likelihood_and_importance_weightings_match_analytic_value():
    sde = sdegen.VPSDE()
    model = ScoreModel(_ExactScore(sde), sde, "score")

    def weighted(t):
        _, s = sde.marginal(t)
        return sde.diffusion(t).square() / s.square() * _ratio(sde, t)

    # Uniform t with the g^2/s^2 ~ 1/t weight has a heavy tail near 0; eps = 1e-2 keeps its variance finite
    # and well estimated, so the 4-SE bound is meaningful.
    mean, se, _ = _mc(model, _data(), 2, weighting="likelihood", eps=1e-2)
    expected = _expect(sde, weighted, 1e-2)
    assert se < 0.02 * expected
    assert abs(mean - expected) < 4 * se, (mean, expected, se)
    # Importance sampling reaches eps = 1e-5 with a bounded weight Z/(T - eps): same expectation, small SE.
    mean_is, se_is, _ = _mc(model, _data(), 3, weighting="importance", eps=1e-5)
    expected_is = _expect(sde, weighted, 1e-5)
    assert se_is < 0.01 * expected_is
    assert abs(mean_is - expected_is) < 4 * se_is, (mean_is, expected_is, se_is)


@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.VESDE()], ids=["vp", "ve"])
def test_importance_times_are_uniform_in_log_sigma(sde):
    eps = 1e-5
    t, factor = sample_time(sde, N, weighting="importance", eps=eps, generator=torch.Generator().manual_seed(4),
                            dtype=F64)
    assert float(t.min()) >= eps and float(t.max()) <= sde.T
    lo, hi = (2 * sde.sigma(torch.tensor([e], dtype=F64)).log() for e in (eps, sde.T))
    u = (2 * sde.sigma(t).log() - lo) / (hi - lo)
    # u ~ U[0, 1]: mean 1/2 with SE sqrt(1/12/N) ~ 9e-4; second moment 1/3 with SE ~ sqrt(4/45/N) ~ 9.4e-4.
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / N)
    assert abs(float(u.square().mean()) - 1 / 3) < 4 * math.sqrt(4 / 45 / N)
    torch.testing.assert_close(factor, torch.full_like(factor, float(hi - lo) / (sde.T - eps)))


@pytest.mark.parametrize("shift,scale", [(-0.2, 0.0), (0.0, 0.1)])
def test_exact_score_minimises_the_loss(shift, scale):
    sde = sdegen.VPSDE()
    x0 = _data(5)
    exact = ScoreModel(_ExactScore(sde), sde, "score")
    perturbed = ScoreModel(_ExactScore(sde, shift=shift, scale=scale), sde, "score")
    # Common random numbers: the same t and noise for both, so the difference has a small variance.
    _, _, l_exact = _mc(exact, x0, 6)
    _, _, l_pert = _mc(perturbed, x0, 6)
    diff = l_pert - l_exact
    # Expected increase: E_t[s^2 (shift^2 + scale^2 E||S*||^2/d)] with E||S*||^2/d = 1/v.
    def increase(t):
        m, s = sde.marginal(t)
        return s.square() * (shift**2 + scale**2 / (m.square() * SIGMA0**2 + s.square()))

    expected = _expect(sde, increase, 1e-5)
    se = float(diff.std()) / math.sqrt(N)
    assert float(l_pert.mean()) > float(l_exact.mean())
    assert abs(float(diff.mean()) - expected) < 4 * se + 1e-12, (float(diff.mean()), expected, se)


class _InParam(torch.nn.Module):
    """The exact score re-expressed in another parameterization (non-EDM inputs: x and t / T)."""

    def __init__(self, sde):
        super().__init__()
        self.exact, self.sde, self.model = _ExactScore(sde), sde, None

    def forward(self, x, t_in):
        return self.model.raw_from_score(x, t_in * self.sde.T, self.exact(x, t_in))


def test_loss_is_the_same_in_every_parameterization():
    # The loss is computed from eps_hat, so a perfect model gives one value however it is parameterized.
    sde = sdegen.VPSDE()
    x0 = _data(10)[:5000]
    values = []
    for p in [q for q in PARAMETERIZATIONS if q != "edm"]:
        net = _InParam(sde)
        net.model = ScoreModel(net, sde, p)
        values.append(float(dsm_loss(net.model, x0, generator=torch.Generator().manual_seed(11))))
    assert max(values) - min(values) < 1e-9 * max(values), values


def test_smld_loss_matches_analytic_value():
    sde = sdegen.VESDE(sigma_min=0.01, sigma_max=10.0)
    model = ScoreModel(_ExactScore(sde), sde, "score")
    gen = torch.Generator().manual_seed(7)
    x0 = _data(8)
    # smld_loss returns the batch mean; recompute per sample through its definition for the SE.
    value = float(smld_loss(model, x0, n_levels=10, generator=gen))
    ends = torch.tensor([1e-5, sde.T], dtype=F64)
    levels = torch.exp(torch.linspace(*sde.sigma(ends).log().tolist(), 10, dtype=F64))
    expected = 0.5 * float(_ratio(sde, sde.t_from_sigma(levels)).mean())
    # Per-sample terms lie in [0, ~10] with variance below 1: SE < 1/sqrt(N) ~ 3e-3.
    assert abs(value - expected) < 4 / math.sqrt(N), (value, expected)


def test_ddpm_loss_uses_the_chain():
    sde = sdegen.VPSDE()
    model = ScoreModel(_ExactScore(sde), sde, "score")
    value = float(ddpm_loss(model, _data(9)[:20000], n_steps=100, generator=torch.Generator().manual_seed(9)))
    # The continuous-time optimum at t_i is near-optimal for the chain (O(1/N) mismatch of the noise
    # levels): the value must be close to the uniform-t analytic loss over [T/N, T].
    expected = _expect(sde, lambda t: _ratio(sde, t), 1e-2)
    assert abs(value - expected) < 0.05, (value, expected)
    with pytest.raises(TypeError, match="VPSDE"):
        ddpm_loss(ScoreModel(_ExactScore(sdegen.VESDE()), sdegen.VESDE(), "score"), _data()[:4])


def test_bad_arguments():
    sde = sdegen.VPSDE()
    model = ScoreModel(_ExactScore(sde), sde, "score")
    with pytest.raises(ValueError, match="weighting must be one of standard, likelihood, importance"):
        dsm_loss(model, _data()[:4], weighting="uniform")
    with pytest.raises(ValueError, match="eps must be below T"):
        dsm_loss(model, _data()[:4], eps=2.0)
    with pytest.raises(TypeError, match="ScoreModel"):
        dsm_loss(lambda x, t: x, _data()[:4])
