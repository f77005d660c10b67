r"""Built-in data sets: 2-D toy distributions and scikit-learn's handwritten digits.

2-D sets (all ``(n, 2)``, roughly within $[-3, 3]^2$, drawn from an optional ``generator``):

- ``"moons"``: two interleaved half circles with Gaussian noise;
- ``"swiss_roll"``: the 2-D spiral $r(\theta)(\cos\theta, \sin\theta)$, $\theta \in [1.5\pi, 4.5\pi]$;
- ``"checkerboard"``: uniform on the 8 dark squares of a 4×4 board on $[-2, 2]^2$;
- every mixture of [`sdegen.named_mixture`][sdegen.named_mixture] with ``d = 2`` (``"8gaussians"``, ``"anisotropic"``,
  ``"gaussian"``), sampled exactly from the oracle.

Digits: the 1,797 8×8 grey-scale images of `sklearn.datasets.load_digits` (values 0..16, shipped
inside scikit-learn, no download), scaled to $[-1, 1]$ as $x/8 - 1$, shaped ``(N, 1, 8, 8)``, with a
fixed stratified train/test split.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .oracle import MIXTURE_NAMES, named_mixture

__all__ = ["two_moons", "swiss_roll", "checkerboard", "toy_2d", "TOY_2D", "digits", "mmd2", "median_bandwidth"]


def _check_n(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return n


def two_moons(n: int, *, noise: float = 0.1, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32) -> Tensor:
    r"""Two interleaving half circles: upper $(\cos u, \sin u)$ and lower $(1 - \cos u, \tfrac12 - \sin u)$,
    $u \sim \mathcal U[0, \pi]$, each with probability ½, plus $\mathcal N(0, \text{noise}^2)$, then
    centred and scaled by 2 so the set spans about $[-3, 3]\times[-1.5, 1.5]$. Returns ``(n, 2)``."""
    n = _check_n(n)
    u = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
    lower = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
    x = torch.where(lower, 1 - u.cos(), u.cos())
    y = torch.where(lower, 0.5 - u.sin(), u.sin())
    pts = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (2 * (pts - torch.tensor([0.5, 0.25], dtype=torch.float64))).to(dtype)


def swiss_roll(n: int, *, noise: float = 0.25, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    r"""2-D swiss roll: $\theta \sim \mathcal U[1.5\pi, 4.5\pi]$, point $\theta(\cos\theta, \sin\theta)/5$
    plus $\mathcal N(0, (\text{noise}/5)^2)$ (radius up to about 2.8). Returns ``(n, 2)``."""
    n = _check_n(n)
    theta = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
    pts = theta[:, None] * torch.stack([theta.cos(), theta.sin()], 1)
    pts = pts + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (pts / 5).to(dtype)


def checkerboard(n: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    r"""Uniform on the squares $(i, j)$ with $i + j$ even of a 4×4 board of unit squares on $[-2, 2]^2$.
    Returns ``(n, 2)``."""
    n = _check_n(n)
    col = torch.randint(4, (n,), generator=generator)
    # Each column has 2 dark rows: rows with (row + col) even.
    row = 2 * torch.randint(2, (n,), generator=generator) + (col % 2)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    pts = torch.stack([col, row], 1).to(torch.float64) + u - 2
    return pts.to(dtype)


def _mixture_2d(name: str):
    def draw(n: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        return named_mixture(name).sample(_check_n(n), generator=generator).to(dtype)

    return draw


TOY_2D = {"moons": two_moons, "swiss_roll": swiss_roll, "checkerboard": checkerboard,
          **{name: _mixture_2d(name) for name in MIXTURE_NAMES if named_mixture(name).dim == 2}}


def toy_2d(name: str, n: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` points of the 2-D set ``name`` (one of `TOY_2D`): ``(n, 2)``."""
    if name not in TOY_2D:
        raise ValueError(f"unknown 2-D data set {name!r}; choose one of {', '.join(TOY_2D)}")
    return TOY_2D[name](n, generator=generator, dtype=dtype)


def digits(split: str = "train", *, test_fraction: float = 0.2, seed: int = 0,
           dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    r"""scikit-learn's 8×8 handwritten digits, scaled to $[-1, 1]$, with a fixed stratified split.

    Within each class the images are permuted by ``seed`` and the first
    ``round(test_fraction * n_class)`` go to the test split, so the split is the same on every machine.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        test_fraction: share of each class held out for ``"test"``, in ``(0, 1)``.
        seed: seed of the split permutation.
        dtype: dtype of the images.

    Returns:
        ``(x, y)``: images ``(N, 1, 8, 8)`` in $[-1, 1]$ and labels ``(N,)`` (int64, 0..9).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits  # optional heavy import, only here

    raw = load_digits()
    x = torch.as_tensor(raw.images, dtype=torch.float64) / 8.0 - 1.0
    y = torch.as_tensor(raw.target, dtype=torch.int64)
    if split == "all":
        return x[:, None].to(dtype), y
    gen = torch.Generator().manual_seed(int(seed))
    test_idx = []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        test_idx.append(idx[: round(test_fraction * idx.numel())])
    is_test = torch.zeros(y.shape[0], dtype=torch.bool)
    is_test[torch.cat(test_idx)] = True
    keep = is_test if split == "test" else ~is_test
    return x[keep][:, None].to(dtype), y[keep]


def median_bandwidth(x: Tensor) -> float:
    """The median pairwise Euclidean distance within ``x`` ``(n, *D)`` (the usual kernel-width heuristic)."""
    xf = x.reshape(x.shape[0], -1).to(torch.float64)
    d = torch.cdist(xf, xf)
    return float(d[torch.triu_indices(len(xf), len(xf), 1).unbind()].median())


def mmd2(x: Tensor, y: Tensor, *, bandwidth: float | None = None) -> float:
    r"""Unbiased squared maximum mean discrepancy with a Gaussian kernel (Gretton et al. 2012, eq. 3).

    $$\widehat{\mathrm{MMD}}^2 = \frac{1}{n(n-1)}\sum_{i\ne j}k(x_i,x_j) + \frac{1}{m(m-1)}\sum_{i\ne j}k(y_i,y_j)
      - \frac{2}{nm}\sum_{i,j}k(x_i,y_j),\qquad k(a,b) = e^{-\|a-b\|^2/(2h^2)},$$

    a two-sample distance between the sets ``x`` ``(n, *D)`` and ``y`` ``(m, *D)`` (flattened), zero in
    expectation when they come from the same distribution. ``bandwidth`` $h$ defaults to
    [`median_bandwidth`][sdegen.data.median_bandwidth] of ``y``; compare values only at the same $h$. Computed in float64.
    """
    xf = x.reshape(x.shape[0], -1).to(torch.float64)
    yf = y.reshape(y.shape[0], -1).to(device=xf.device, dtype=torch.float64)
    if xf.shape[1] != yf.shape[1] or len(xf) < 2 or len(yf) < 2:
        raise ValueError(f"x and y need >= 2 rows of the same size, got {tuple(x.shape)} and {tuple(y.shape)}")
    h = median_bandwidth(yf) if bandwidth is None else float(bandwidth)

    def k(a, b):
        return torch.exp(-torch.cdist(a, b).square() / (2 * h * h))

    n, m = len(xf), len(yf)
    kxx = (k(xf, xf).sum() - n) / (n * (n - 1))
    kyy = (k(yf, yf).sum() - m) / (m * (m - 1))
    return float(kxx + kyy - 2 * k(xf, yf).mean())
