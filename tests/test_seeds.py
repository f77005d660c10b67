"""``sample(..., seeds=...)``: a sample does not depend on its batch-mates (issue 10)."""

import pytest
import torch

import sdegen
from sdegen import PerSampleNoise

FIXED = ["euler_maruyama", "reverse_diffusion", "ancestral", "pc", "heun_karras"]


@pytest.mark.parametrize("method", FIXED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_k_is_identical_in_batches_of_1_7_and_1000(method, dtype):
    sde = sdegen.VPSDE()
    score = sdegen.named_mixture("8gaussians", dtype=dtype).score_fn(sde)
    big = sdegen.sample(sde, score, (1000, 2), method=method, steps=30, seeds=list(range(5000, 6000)), dtype=dtype)
    mid = sdegen.sample(sde, score, (7, 2), method=method, steps=30, seeds=5000 + 3, dtype=dtype)  # offset form
    one = sdegen.sample(sde, score, (1, 2), method=method, steps=30, seeds=[5000 + 5], dtype=dtype)
    assert big.samples.dtype == dtype
    assert torch.equal(big.samples[3:10], mid.samples)
    assert torch.equal(big.samples[5], one.samples[0])


def test_seed_forms_agree_and_differ_from_other_seeds():
    sde = sdegen.VESDE()
    score = sdegen.named_mixture("anisotropic").score_fn(sde)
    kw = dict(method="euler_maruyama", steps=20, dtype=torch.float64)
    a = sdegen.sample(sde, score, (4, 2), seeds=[1, 2, 3, 4], **kw).samples
    b = sdegen.sample(sde, score, (4, 2), seeds=1, **kw).samples
    c = sdegen.sample(sde, score, (4, 2), seeds=PerSampleNoise([1, 2, 3, 4]), **kw).samples
    d = sdegen.sample(sde, score, (4, 2), seeds=[9, 2, 3, 4], **kw).samples
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a[0], d[0]) and torch.equal(a[1:], d[1:])


@pytest.mark.parametrize("bad,err", [([1, 2], ValueError), ("7", TypeError), (1.5, TypeError)])
def test_bad_seeds(bad, err):
    sde = sdegen.VPSDE()
    with pytest.raises(err, match="seeds"):
        sdegen.sample(sde, lambda x, t: -x, (3, 2), method="euler_maruyama", steps=5, seeds=bad)
