"""PerSampleNoise: the counter-based hash, batch invariance, and the statistics of the draws.

Tolerances: for n i.i.d. N(0, 1) draws the sample mean has standard error 1/sqrt(n), the sample
variance sqrt(2/n), a sample correlation 1/sqrt(n); we allow 5 standard errors (two-sided
false-alarm rate 6e-7 per check, and the seeds are fixed, so a pass is deterministic).
"""

import math

import pytest
import torch
from scipy import stats

from sdegen._rng import PerSampleNoise, _cos_sin_2pi, _log_unit, _mix, _signed, _sqrt, splitmix64

Z = 5.0


def test_tensor_hash_matches_python_reference_mod_2_64():
    # The tensor hash relies on int64 products wrapping modulo 2**64; compare with exact integers.
    gen = torch.Generator().manual_seed(0)
    vals = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15]
    vals += [int(v) for v in torch.randint(-2**63, 2**63 - 1, (2000,), generator=gen, dtype=torch.int64)]
    got = _mix(torch.tensor([_signed(v) for v in vals], dtype=torch.int64))
    ref = torch.tensor([_signed(splitmix64(v)) for v in vals], dtype=torch.int64)
    assert torch.equal(got, ref)


def test_log_and_trig_kernels_match_libm_to_a_few_ulps():
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(200_000, generator=gen, dtype=torch.float64).clamp_min(2.0**-53)
    u = torch.cat([u, torch.tensor([2.0**-53, 0.5, 1.0 - 2.0**-53, 1.0], dtype=torch.float64)])
    assert (_log_unit(u) - u.log()).abs().max() <= 8 * torch.finfo(torch.float64).eps * 40  # |log u| <= 37
    v = torch.rand(200_000, generator=gen, dtype=torch.float64)
    c, s = _cos_sin_2pi(v)
    assert (c - torch.cos(2 * math.pi * v)).abs().max() < 4e-15
    assert (s - torch.sin(2 * math.pi * v)).abs().max() < 4e-15
    # sqrt on the range of -2 log u, against Python's correctly rounded math.sqrt: within 1 ulp
    y = torch.cat([torch.rand(20_000, generator=gen, dtype=torch.float64) * 74,
                   torch.tensor([2.0**-52, 1e-9, 1.0, 2.0, 73.9], dtype=torch.float64)])
    ref = torch.tensor([math.sqrt(a) for a in y.tolist()], dtype=torch.float64)
    assert ((_sqrt(y) - ref).abs() / ref).max() <= torch.finfo(torch.float64).eps
    assert _sqrt(torch.zeros(3, dtype=torch.float64)).eq(0).all()


@pytest.mark.parametrize("shape_d", [(5,), (3, 4, 4), (1,)])
def test_sample_is_identical_in_batches_of_1_7_and_1000(shape_d):
    seeds = list(range(1000, 2000))
    big = PerSampleNoise(seeds, (1000, *shape_d), dtype=torch.float64)
    ref_prior, ref_step = big.prior(), big(17)
    for k in (0, 3, 999):
        one = PerSampleNoise([seeds[k]], (1, *shape_d), dtype=torch.float64)
        assert torch.equal(one.prior()[0], ref_prior[k]) and torch.equal(one(17)[0], ref_step[k])
    # a batch of 7 with the sample at another position, among unrelated seeds
    mates = [5, 77, seeds[500], 2**64 - 1, 0, 31337, seeds[3]]
    seven = PerSampleNoise(mates, (7, *shape_d), dtype=torch.float64)
    assert torch.equal(seven(17)[2], ref_step[500]) and torch.equal(seven.prior()[6], ref_prior[3])


def test_thread_count_does_not_change_draws():
    noise = PerSampleNoise.from_offset(0, 300, (300, 2, 8, 8), dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = noise(3)
        torch.set_num_threads(2)
        b = noise(3)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b)


def test_from_offset_subbatch_and_dtype_consistency():
    noise = PerSampleNoise.from_offset(40, 6, (6, 3), dtype=torch.float64)
    assert noise.seeds == tuple(range(40, 46))
    assert torch.equal(noise[2:4](5), noise(5)[2:4])
    assert torch.equal(noise[[5, 0]].prior(), noise.prior()[[5, 0]])
    # float32 noise is the float64 noise rounded, so precision changes nothing else
    assert torch.equal(noise(5, dtype=torch.float32), noise(5).to(torch.float32))
    # pure function: calling twice gives the same tensor; streams differ
    assert torch.equal(noise(5), noise(5))
    assert not torch.equal(noise(5), noise(6))
    assert not torch.equal(noise(5), noise(5, sub=1))
    assert not torch.equal(noise(0), noise.prior())
    assert not torch.equal(noise.draw(0), noise(0))


def test_marginal_statistics_are_standard_normal():
    noise = PerSampleNoise.from_offset(0, 400, (400, 501), dtype=torch.float64)  # odd D: unpaired tail
    z = noise(0).reshape(-1)
    n = z.numel()
    assert abs(float(z.mean())) < Z / math.sqrt(n)
    assert abs(float(z.var()) - 1) < Z * math.sqrt(2 / n)
    # fourth moment 3, variance of z^4 is 105 - 9 = 96
    assert abs(float(z.pow(4).mean()) - 3) < Z * math.sqrt(96 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    # the cos and sin halves of the Box-Muller pairs are each normal too
    assert stats.kstest(z[0::2].numpy(), "norm").pvalue > 1e-4
    assert stats.kstest(z[1::2].numpy(), "norm").pvalue > 1e-4


def test_independence_across_steps_samples_and_pairs():
    noise = PerSampleNoise.from_offset(123, 2000, (2000, 64), dtype=torch.float64)
    a, b, p = noise(0), noise(1), noise.prior()
    n = a.numel()

    def corr(x, y):
        x, y = x.reshape(-1), y.reshape(-1)
        return float(((x - x.mean()) * (y - y.mean())).mean() / (x.std() * y.std()))

    tol = Z / math.sqrt(n)
    assert abs(corr(a, b)) < tol            # consecutive steps, same sample
    assert abs(corr(a, p)) < tol            # prior vs step 0
    assert abs(corr(a[1:], a[:-1])) < Z / math.sqrt(n - 64)   # adjacent seeds k, k+1
    assert abs(corr(a[:, 0::2], a[:, 1::2])) < Z / math.sqrt(n / 2)   # the two halves of a pair
    # squares too: Box-Muller pairs share the radius, so dependence would show in z^2
    assert abs(corr(a[:, 0::2] ** 2, a[:, 1::2] ** 2)) < Z * math.sqrt(2) / math.sqrt(n / 2)


def test_increments_sum_like_brownian_motion():
    # sum of 16 step draws per element is N(0, 16): variance of the sum / 16 within 5 SE of 1
    noise = PerSampleNoise.from_offset(7, 500, (500, 40), dtype=torch.float64)
    s = sum(noise(i) for i in range(16)) / 4.0
    n = s.numel()
    assert abs(float(s.var()) - 1) < Z * math.sqrt(2 / n)


@pytest.mark.cuda
def test_cuda_draws_equal_cpu_draws_bitwise():
    noise = PerSampleNoise.from_offset(0, 64, (64, 3, 8, 8), dtype=torch.float64)
    cuda = PerSampleNoise.from_offset(0, 64, (64, 3, 8, 8), dtype=torch.float64, device="cuda")
    assert cuda(4).device.type == "cuda"
    assert torch.equal(cuda(4).cpu(), noise(4))
    assert torch.equal(cuda.prior().cpu(), noise.prior())
    assert torch.equal(cuda(4, dtype=torch.float32).cpu(), noise(4, dtype=torch.float32))
