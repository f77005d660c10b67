"""Built-in data sets and the MMD two-sample distance."""

import math

import pytest
import torch

from sdegen import named_mixture
from sdegen.data import TOY_2D, checkerboard, digits, mmd2, toy_2d, two_moons


@pytest.mark.parametrize("name", list(TOY_2D))
def test_toy_sets_shape_dtype_and_determinism(name):
    a = toy_2d(name, 500, generator=torch.Generator().manual_seed(0))
    b = toy_2d(name, 500, generator=torch.Generator().manual_seed(0))
    assert a.shape == (500, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert float(a.abs().max()) < 6


def test_checkerboard_is_on_dark_squares():
    x = checkerboard(4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cell = (x + 2).floor().long()
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    # 8 squares, each with probability 1/8: counts 500 +- sqrt(4000 * 1/8 * 7/8) ~ 21; allow 5 SE.
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16)
    dark = counts[counts > 0]
    assert len(dark) == 8 and (dark - 500).abs().max() < 5 * math.sqrt(4000 / 8 * 7 / 8)


def test_two_moons_radius():
    # Without noise every point lies on one of two unit half circles (scaled by 2).
    x = two_moons(1000, noise=0.0, generator=torch.Generator().manual_seed(2), dtype=torch.float64) / 2
    x = x + torch.tensor([0.5, 0.25], dtype=torch.float64)
    r_upper = x.norm(dim=1)
    r_lower = (x - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1)
    assert torch.minimum((r_upper - 1).abs(), (r_lower - 1).abs()).max() < 1e-12


def test_mixture_sets_come_from_the_oracle():
    x = toy_2d("8gaussians", 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = named_mixture("8gaussians").sample(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, y)
    with pytest.raises(ValueError, match="unknown 2-D data set 'spiral'; choose one of moons"):
        toy_2d("spiral", 10)


def test_digits_split():
    x_tr, y_tr = digits("train")
    x_te, y_te = digits("test")
    x_all, y_all = digits("all")
    assert x_all.shape == (1797, 1, 8, 8) and len(x_tr) + len(x_te) == 1797
    assert float(x_all.min()) == -1.0 and float(x_all.max()) == 1.0
    # Stratified: every class gets round(0.2 * n_c) test images.
    for c in range(10):
        assert int((y_te == c).sum()) == round(0.2 * int((y_all == c).sum()))
    # Disjoint, and the same split on every call.
    flat = lambda x: {tuple(r.tolist()) for r in x.reshape(len(x), -1)}  # noqa: E731
    assert len(flat(x_tr) & flat(x_te)) <= 2          # sklearn digits holds a couple of exact duplicates
    assert torch.equal(digits("test")[0], x_te)
    assert not torch.equal(digits("test", seed=1)[0], x_te)
    with pytest.raises(ValueError, match="split must be"):
        digits("valid")


def test_mmd2_null_and_alternative():
    gen = torch.Generator().manual_seed(4)
    n = 400
    same = [mmd2(torch.randn(n, 2, generator=gen, dtype=torch.float64), torch.randn(n, 2, generator=gen, dtype=torch.float64),
                 bandwidth=1.0) for _ in range(10)]
    # Unbiased: mean zero under the null; each draw's sd is O(1/n), so the mean of 10 is well within 4/n.
    assert abs(sum(same) / len(same)) < 4 / n
    shifted = mmd2(torch.randn(1000, 2, generator=gen, dtype=torch.float64) + 1.0,
                   torch.randn(1000, 2, generator=gen, dtype=torch.float64), bandwidth=1.0)
    # Population value for a shift delta = (1, 1), bandwidth h = 1, d = 2, unit covariances:
    # E k(X, X') = (h^2 / (h^2 + 2))^{d/2} = 1/3 and E k(X, Y) = (1/3) exp(-|delta|^2 / (2 (h^2 + 2))),
    # so MMD^2 = (2/3)(1 - exp(-1/3)) ~ 0.189. The estimator's sd at n = 1000 is about 0.013 (measured over
    # repeated draws); allow 4 sd.
    expected = 2 / 3 * (1 - math.exp(-1 / 3))
    assert abs(shifted - expected) < 0.052
