r"""Gaussian closed forms (``sdegen.gaussian``): KL, log-density, the discretized likelihood, the standard normal draw.

Moved from ``tests/test_ddpm.py`` with the functions (issue 15, item 8); references are
``torch.distributions`` and ``torch.special.ndtr``.
"""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdegen.gaussian import (discretized_gaussian_log_likelihood, draw_device, gaussian_kl, gaussian_log_likelihood,
                             standard_normal)

F64 = torch.float64


def test_gaussian_kl_matches_torch_and_is_nonnegative(generator):
    n = 1000
    m1, m2 = torch.randn(n, generator=generator, dtype=F64), torch.randn(n, generator=generator, dtype=F64)
    v1 = torch.rand(n, generator=generator, dtype=F64) * 3 + 0.01
    v2 = torch.rand(n, generator=generator, dtype=F64) * 3 + 0.01
    ours = gaussian_kl(m1, v1, m2, v2)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, v1.sqrt()),
                                            torch.distributions.Normal(m2, v2.sqrt()))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    assert (ours > 0).all()
    # Zero only for equal Gaussians: exactly 0 when equal, positive for a tiny change of either.
    assert torch.equal(gaussian_kl(m1, v1, m1, v1), torch.zeros(n, dtype=F64))
    assert (gaussian_kl(m1, v1, m1 + 1e-3, v1) > 0).all()
    assert (gaussian_kl(m1, v1, m1, v1 * 1.01) > 0).all()
    # Broadcasting: a (B, D) mean against a (B, 1) variance.
    out = gaussian_kl(torch.zeros(4, 3), torch.ones(4, 1), torch.ones(4, 3), torch.full((4, 1), 2.0))
    assert out.shape == (4, 3)


@settings(max_examples=300, deadline=None)
@given(m1=st.floats(-1e3, 1e3), m2=st.floats(-1e3, 1e3), v1=st.floats(1e-6, 1e6), v2=st.floats(1e-6, 1e6))
def test_gaussian_kl_property(m1, m2, v1, v2):
    """KL >= 0 for any parameters (up to float64 rounding of the closed form), and 0 exactly at equality."""
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    kl = float(gaussian_kl(t(m1), t(v1), t(m2), t(v2)))
    ref = float(torch.distributions.kl_divergence(torch.distributions.Normal(t(m1), t(v1).sqrt()),
                                                  torch.distributions.Normal(t(m2), t(v2).sqrt())))
    # Rounding: each of the terms (log ratio, ratio, squared difference / var2) is exact to ~1e-16 relative.
    scale = 1 + abs(math.log(v2 / v1)) + v1 / v2 + (m1 - m2) ** 2 / v2
    assert kl >= -1e-14 * scale
    assert abs(kl - ref) <= 1e-12 * scale
    assert float(gaussian_kl(t(m1), t(v1), t(m1), t(v1))) == 0.0


def test_discretized_decoder_is_a_probability():
    """The 256 bin masses of the discretized Gaussian sum to 1, match ndtr differences, stay finite in the tails."""
    x = torch.linspace(-1, 1, 256, dtype=F64)
    for mean, var in ((0.13, 0.01), (-0.9, 1e-4), (0.999, 0.3), (5.0, 1e-3)):
        logp = discretized_gaussian_log_likelihood(x, torch.tensor(mean, dtype=F64), torch.tensor(var, dtype=F64))
        assert torch.isfinite(logp).all()
        assert abs(float(torch.logsumexp(logp, 0))) < 1e-10
    h = 1 / 255
    mid = x[100:110]
    ref = torch.special.ndtr((mid + h - 0.13) / 0.1) - torch.special.ndtr((mid - h - 0.13) / 0.1)
    logp = discretized_gaussian_log_likelihood(mid, torch.tensor(0.13, dtype=F64), torch.tensor(0.01, dtype=F64))
    torch.testing.assert_close(logp.exp(), ref, rtol=1e-10, atol=1e-300)


def test_gaussian_log_likelihood_matches_torch(generator):
    x, mean = torch.randn(500, 3, generator=generator, dtype=F64), torch.randn(500, 3, generator=generator, dtype=F64)
    var = torch.rand(500, 1, generator=generator, dtype=F64) * 4 + 1e-3          # broadcast over D
    ref = torch.distributions.Normal(mean, var.sqrt()).log_prob(x)
    torch.testing.assert_close(gaussian_log_likelihood(x, mean, var), ref, rtol=1e-12, atol=1e-12)


def test_standard_normal_is_one_randn_on_the_generators_device():
    like = torch.zeros(4, 3, dtype=F64)
    a = standard_normal(like, torch.Generator().manual_seed(3))
    b = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert torch.equal(a, b) and a.dtype == F64
    assert draw_device(None, like) == like.device
    assert draw_device(torch.Generator(device="cpu"), like).type == "cpu"
