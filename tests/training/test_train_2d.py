"""End to end: a short CPU training run on a 2-D mixture gives samples close to the data (slow)."""

import math

import pytest
import torch

import sdegen
from sdegen.data import mmd2
from sdegen.nn import MLP

N = 1000


@pytest.mark.slow
def test_mlp_on_8gaussians_samples_match_the_data():
    gm = sdegen.named_mixture("8gaussians", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    data = gm.sample(20000, generator=gen)
    torch.manual_seed(0)
    model = sdegen.ScoreModel(MLP(2, hidden=128, depth=3), sdegen.VPSDE(), "eps")
    res = sdegen.train(model, data, steps=1500, batch_size=512, lr=2e-3, warmup=100, ema=0.995, progress=False)
    fresh = gm.sample(N, generator=gen)
    prior = torch.randn(N, 2, generator=gen)
    h = 0.25                                     # the scale of the components (std 0.2)
    ceiling = mmd2(prior, fresh, bandwidth=h)    # ~0.066: the untrained (prior) distance
    means = gm.means
    for opts in (dict(method="rk45", rtol=1e-4, atol=1e-4),
                 dict(method="pc", steps=300, corrector="annealed_langevin", snr=0.16)):
        x = sdegen.sample(res.model.sde, res.model, (N, 2), generator=torch.Generator().manual_seed(1), **opts).samples
        assert mmd2(x, fresh, bandwidth=h) < 0.05 * ceiling, opts
        dist, mode = torch.cdist(x, means).min(1)
        # Data: P(|x - mu| < 3 std) = 1 - exp(-4.5) = 0.989 in 2-D. 1,500 steps leave the modes a little
        # blurred (RK45 measured 0.89 here), so allow down to 0.85.
        assert float((dist < 0.6).float().mean()) > 0.85, opts
        # Each of the 8 equal modes: share 1/8 with SE sqrt(1/8 * 7/8 / N) ~ 0.0105; allow 5 SE.
        share = torch.bincount(mode, minlength=8).float() / N
        assert float((share - 1 / 8).abs().max()) < 5 * math.sqrt(7 / 64 / N), (opts, share)
