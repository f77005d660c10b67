r"""Every sampler draws the right distribution with the exact oracle score, and the check has power.

The check (``distribution_check``) compares ``n`` samples with the exact mixture:

* mean: one-sample z-test per coordinate, $z_j = (\bar x_j - \mu_j)/\sqrt{\Sigma_{jj}/n}$;
* covariance: per entry $(j, k)$ the mean of $p = (x_j - \mu_j)(x_k - \mu_k)$ against the exact
  $\Sigma_{jk}$, with the standard error estimated from the sample, $\mathrm{sd}(p)/\sqrt n$
  (the CLT for a sample mean; the bias from using the exact mean is zero);
* shape: two-sample Kolmogorov–Smirnov tests on 8 fixed random 1-D projections against ``n`` exact
  mixture draws, each at $\alpha = 10^{-4}$.

All $|z| < 5$ (two-sided $p \approx 6\cdot 10^{-7}$ each) and every KS $p > 10^{-4}$: with about 20
tests, a correct sampler fails with probability below $10^{-3}$ even before fixing the seeds (they are
fixed, so the outcome is deterministic). With $n = 10^4$ the covariance test resolves errors of about
$5\,\mathrm{sd}(p)/100 \approx 0.05\,\Sigma_{jj}$, and the score scaled by 1.1 (a 10 % error) moves the
variances by more than that: ``test_check_has_power`` asserts the check fails then.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import sdegen
from sdegen.sampling import sample

N_SAMPLES = 10_000
Z_MAX = 5.0
KS_ALPHA = 1e-4


def distribution_check(x: torch.Tensor, gm: sdegen.GaussianMixture, *, seed: int = 0, n_proj: int = 8) -> dict:
    """Return the z-scores and KS p-values of ``x`` against ``gm`` and whether all pass."""
    x = x.to(torch.float64).reshape(x.shape[0], -1)
    n, d = x.shape
    mu = gm.mean().to(torch.float64)
    cov = gm.covariance().to(torch.float64)
    z_mean = (x.mean(0) - mu) / (cov.diagonal() / n).sqrt()
    c = x - mu
    prods = c[:, :, None] * c[:, None, :]                              # (n, d, d)
    se = prods.std(0) / math.sqrt(n)
    iu = torch.triu_indices(d, d)
    z_cov = ((prods.mean(0) - cov) / se)[iu[0], iu[1]]
    g = torch.Generator().manual_seed(seed)
    ref = gm.sample(n, generator=g).to(torch.float64)
    dirs = torch.randn(n_proj, d, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    ks_p = [stats.ks_2samp((x @ u).numpy(), (ref @ u).numpy()).pvalue for u in dirs]
    ok = bool(z_mean.abs().max() < Z_MAX and z_cov.abs().max() < Z_MAX and min(ks_p) > KS_ALPHA and
              torch.isfinite(x).all())
    return {"ok": ok, "z_mean": z_mean.abs().max().item(), "z_cov": z_cov.abs().max().item(), "ks_p": min(ks_p)}


SDES = {
    "vp": lambda: sdegen.VPSDE(),
    "subvp": lambda: sdegen.SubVPSDE(),
    "ve": lambda: sdegen.VESDE(sigma_min=0.01, sigma_max=10.0),
}


def run_method(sde_name: str, method: str, steps, mixture: str = "anisotropic", scale: float = 1.0,
               n: int = N_SAMPLES, seed: int = 7, **opts):
    sde = SDES[sde_name]()
    gm = sdegen.named_mixture(mixture)
    exact = gm.score_fn(sde)
    score = exact if scale == 1.0 else (lambda x, t: scale * exact(x, t))
    res = sample(sde, score, (n, gm.dim), method=method, steps=steps, dtype=torch.float64,
                 generator=torch.Generator().manual_seed(seed), **opts)
    return res, gm


# (method, steps, options). Steps are chosen so the discretization bias is well below the
# resolution of the check (~0.05 of a variance, see the module docstring).
CASES = {
    "euler_maruyama": ("euler_maruyama", 1000, {}),
    "reverse_diffusion": ("reverse_diffusion", 1000, {}),
    "ancestral": ("ancestral", 1000, {}),
    "pc_annealed": ("pc", 500, {"corrector": "annealed_langevin", "snr": 0.1}),
    "pc_none": ("pc", 1000, {"corrector": None}),
    "ode_euler": ("ode_euler", 1000, {}),
    "ode_heun": ("ode_heun", 100, {}),
    "rk45": ("rk45", None, {"rtol": 1e-5, "atol": 1e-5}),
    "torchdiffeq": ("torchdiffeq", None, {}),
    "scipy": ("scipy", None, {}),
    "torchsde": ("torchsde", 1000, {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sde_name", list(SDES))
def test_samples_right_distribution(sde_name, case):
    """Every method, every SDE kind, on the anisotropic two-component mixture (full covariances)."""
    method, steps, opts = CASES[case]
    res, gm = run_method(sde_name, method, steps, **opts)
    check = distribution_check(res.samples, gm)
    assert check["ok"], check


@pytest.mark.parametrize("sde_name,case", [("vp", "ode_heun"), ("subvp", "ancestral"), ("ve", "pc_annealed")])
def test_samples_right_distribution_cheap(sde_name, case):
    """One cheap representative per SDE kind in the default suite: the same check on N(0.5, 0.5^2 I),
    whose exact score costs a fraction of the mixture's."""
    method, steps, opts = CASES[case]
    res, gm = run_method(sde_name, method, steps, mixture="gaussian", **opts)
    check = distribution_check(res.samples, gm)
    assert check["ok"], check


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", list(SDES))
def test_langevin_corrector_right_distribution_16d(sde_name):
    """The default Langevin corrector (the SNR rule at the expected score norm: one step per time, see
    tests/solvers/test_correctors.py for 2-D to 64-D) on the 16-D mixture. The unadjusted
    Langevin step has an O(step) stationary bias, which snr = 0.05 keeps below the check's resolution.
    """
    res, gm = run_method(sde_name, "pc", 500, mixture="mixture16", n=N_SAMPLES, corrector="langevin", snr=0.05)
    check = distribution_check(res.samples, gm)
    assert check["ok"], check


@pytest.mark.parametrize("sde_name,case,mixture", [
    ("vp", "ode_heun", "gaussian"),
    pytest.param("ve", "euler_maruyama", "anisotropic", marks=pytest.mark.slow),
    pytest.param("subvp", "ancestral", "anisotropic", marks=pytest.mark.slow),
])
def test_check_has_power(sde_name, case, mixture):
    """The same check fails when the exact score is scaled by 1.1 (a 10 % score error)."""
    method, steps, opts = CASES[case]
    res, gm = run_method(sde_name, method, steps, mixture=mixture, scale=1.1, **opts)
    check = distribution_check(res.samples, gm)
    assert not check["ok"], check


def test_check_accepts_exact_samples():
    """Calibration: exact mixture draws pass (the false-alarm side of the check)."""
    gm = sdegen.named_mixture("anisotropic")
    x = gm.sample(N_SAMPLES, generator=torch.Generator().manual_seed(99))
    check = distribution_check(x, gm)
    assert check["ok"], check
