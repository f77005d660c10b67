r"""DDPM and the VP SDE are one model seen two ways (issue 4 must-shows).

- The DDPM ancestral sampler and ``sdegen.sample(vp, ddpm.score_fn(eps), method="ancestral", steps=N)``
  give the same samples from the same generator (N = 10 and 1000), in both directions of wrapping.
- DDIM with $\eta = 0$ converges to the probability-flow ODE solution that ``sdegen.sample`` computes
  with RK45 from the same $x_T$.

"Float tolerance": both samplers compute the same affine map per step in a different association
order (the SDE side multiplies precomputed float64 coefficients by the score, the DDPM side by
$\epsilon$), so per-step relative differences are O(1e-16) in float64 and O(1e-7) in float32,
accumulated over N steps with gains of at most $1/\sqrt{\bar\alpha_N}$.
"""

import math

import numpy as np
import pytest
import torch

import sdegen
from sdegen.ddpm import DDPM

F64 = torch.float64


def gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


class TinyEpsNet(torch.nn.Module):
    """A fixed random eps-network eps(x, i): not the exact eps, so the test does not rely on any structure."""

    def __init__(self, dim, n_steps, seed=0):
        super().__init__()
        torch.manual_seed(seed)        # parameters only; tests use explicit generators for sampling
        self.n_steps = n_steps
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, dim))

    def forward(self, x, i):
        assert i.dtype == torch.long and i.shape == (x.shape[0],)
        h = torch.cat([x, (i.to(x.dtype) / self.n_steps)[:, None]], 1)
        return self.net(h.to(self.net[0].weight.dtype)).to(x.dtype)


@pytest.mark.parametrize("N, beta_max", [(10, 8.0), (1000, 20.0)])
@pytest.mark.parametrize("model", ["net", "oracle"])
def test_ddpm_ancestral_equals_sde_ancestral(N, beta_max, model):
    # N = 10 needs beta_max * T / N < 1 (every beta_i < 1), hence VPSDE(0.1, 8) there.
    vp = sdegen.VPSDE(0.1, beta_max)
    ddpm = vp.discretize(N)
    gm = sdegen.named_mixture("8gaussians")
    if model == "net":
        eps = TinyEpsNet(2, N).double()
    else:
        eps = ddpm.eps_model_from_score(gm.score_fn(vp))
    B = 256
    with torch.no_grad():
        a = ddpm.sample(eps, (B, 2), generator=gen(7), dtype=F64)
        res = sdegen.sample(vp, ddpm.score_fn(eps), (B, 2), method="ancestral", steps=N, generator=gen(7), dtype=F64)
    assert res.nfe == N
    torch.testing.assert_close(res.samples, a, rtol=1e-9, atol=1e-10)


def test_continuous_score_through_the_ddpm_sampler():
    """The other direction: a continuous score model used as a DDPM eps-model reproduces the SDE sampler."""
    vp, N = sdegen.VPSDE(0.1, 20.0), 200
    ddpm = vp.discretize(N)
    score = sdegen.named_mixture("anisotropic").score_fn(vp)
    a = ddpm.sample(ddpm.eps_model_from_score(score), (128, 2), generator=gen(3), dtype=F64)
    b = sdegen.sample(vp, score, (128, 2), method="ancestral", steps=N, generator=gen(3), dtype=F64).samples
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_equivalence_in_float32():
    vp, N = sdegen.VPSDE(0.1, 20.0), 100
    ddpm = vp.discretize(N)
    eps = TinyEpsNet(2, N)
    with torch.no_grad():
        a = ddpm.sample(eps, (64, 2), generator=gen(1), dtype=torch.float32)
        b = sdegen.sample(vp, ddpm.score_fn(eps), (64, 2), method="ancestral", steps=N, generator=gen(1),
                          dtype=torch.float32).samples
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ddim_converges_to_the_rk45_probability_flow():
    r"""DDIM ($\eta = 0$) on the chain whose $\bar\alpha_i = m(t_i)^2$ exactly, with the oracle score of the 8-Gaussian
    mixture, approaches ``sdegen.sample(..., method="rk45", rtol=atol=1e-9, x_T=...)`` from the same $x_T$:
    errors shrink with the number of steps at order about 1 (Euler in $(x/m, \sigma)$). The ODE runs to
    eps = 1e-6 instead of 0; the flow moves x by O(1e-6) over [0, 1e-6], far below the errors compared."""
    vp, N = sdegen.VPSDE(0.1, 20.0), 1024
    t = torch.arange(1, N + 1, dtype=F64) / N
    ddpm = DDPM.from_alphas_cumprod(vp.marginal(t)[0].square())
    score = sdegen.named_mixture("8gaussians").score_fn(vp)
    eps = ddpm.eps_model_from_score(score)
    x_T = torch.randn(64, 2, generator=gen(2), dtype=F64)
    ref = sdegen.sample(vp, score, None, method="rk45", x_T=x_T, eps=1e-6, rtol=1e-9, atol=1e-9).samples
    steps = [16, 32, 64, 128, 256]
    errs = [float((ddpm.ddim_sample(eps, None, steps=S, x_T=x_T) - ref).norm(dim=1).mean()) for S in steps]
    assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:])), errs
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert 0.75 < slope < 1.5, (errs, slope)
    assert errs[-1] < 0.05


@pytest.mark.cuda
def test_ddpm_ancestral_equals_sde_ancestral_on_cuda():
    vp, N = sdegen.VPSDE(0.1, 20.0), 1000
    ddpm = vp.discretize(N)
    eps = TinyEpsNet(2, N).double().cuda()
    with torch.no_grad():
        a = ddpm.sample(eps, (256, 2), generator=gen(7, "cuda"), dtype=F64)
        b = sdegen.sample(vp, ddpm.score_fn(eps), (256, 2), method="ancestral", steps=N,
                          generator=gen(7, "cuda"), dtype=F64).samples
    assert a.device.type == "cuda"
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
