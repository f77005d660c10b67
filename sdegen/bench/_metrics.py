r"""Two-sample distances for benchmarks: sliced Wasserstein-2 and the energy distance.

Both compare samples ``x`` ``(n, d)`` and ``y`` ``(m, d)`` (flattened beyond the batch dimension) and are
zero in expectation only asymptotically: every figure that uses them should also draw the noise
floor, the same distance between two independent exact samples of the same sizes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sliced_wasserstein", "energy_distance", "noise_floor"]


def _flat(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError(f"{name} must be a (n, *D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    return x.reshape(x.shape[0], -1).to(torch.float64)


def sliced_wasserstein(x: Tensor, y: Tensor, *, n_proj: int = 256, seed: int = 0) -> float:
    r"""Sliced Wasserstein-2 distance $\big(\mathbb E_\theta W_2^2(\theta^\top x, \theta^\top y)\big)^{1/2}$.

    Directions $\theta$ uniform on the sphere (``n_proj`` of them, from ``seed``, so two calls with the
    same seed use the same directions). Each 1-D $W_2^2$ is the mean squared difference of matched
    quantiles; unequal sizes are matched on ``min(n, m)`` evenly spaced quantile levels
    (Bonneel et al. 2015, "Sliced and Radon Wasserstein barycenters", eq. 3).

    Args:
        x: ``(n, *D)``.
        y: ``(m, *D)`` with the same ``D``.
        n_proj: number of random directions.
        seed: seed of the directions.

    Returns:
        the distance (a float, in the data's units).
    """
    x, y = _flat(x, "x"), _flat(y, "y").to(x.device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64).to(x.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values
    k = min(px.shape[0], py.shape[0])
    if px.shape[0] != k or py.shape[0] != k:
        levels = (torch.arange(k, dtype=torch.float64, device=x.device) + 0.5) / k

        def q(p: Tensor) -> Tensor:
            return p[(levels * p.shape[0]).long().clamp_max(p.shape[0] - 1)]

        px, py = q(px), q(py)
    return float((px - py).square().mean().sqrt())


def energy_distance(x: Tensor, y: Tensor, *, max_n: int = 4000) -> float:
    r"""Energy distance $\big(2\,\mathbb E\|X - Y\| - \mathbb E\|X - X'\| - \mathbb E\|Y - Y'\|\big)^{1/2}$.

    The V-statistic on at most ``max_n`` points of each sample (the first ones: pass shuffled
    samples), computed in blocks so memory stays $O(\text{block} \cdot n)$ (Székely & Rizzo 2013,
    "Energy statistics", eq. 2). The square root makes it a metric in the data's units.
    """
    x, y = _flat(x, "x")[:max_n], _flat(y, "y")[:max_n].to(x.device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")

    def mean_dist(a: Tensor, b: Tensor) -> float:
        total = 0.0
        for i in range(0, a.shape[0], 1024):
            total += float(torch.cdist(a[i:i + 1024], b).sum())
        return total / (a.shape[0] * b.shape[0])

    e2 = 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)
    return math.sqrt(max(e2, 0.0))


def noise_floor(sampler, n: int, metric, *, seeds=(10_001, 10_002)) -> float:
    r"""The metric between two independent exact samples of size ``n``: ``metric(sampler(n, g1), sampler(n, g2))``.

    ``sampler(n, generator)`` draws exact samples (e.g. ``lambda n, g: gm.sample(n, generator=g)``)."""
    g1, g2 = (torch.Generator().manual_seed(s) for s in seeds)
    return metric(sampler(n, g1), sampler(n, g2))
