r"""The exact oracle: Gaussian mixtures pushed through affine SDEs.

If $x_0 \sim \sum_k w_k \mathcal N(\mu_k, \Sigma_k)$ and $x_t \mid x_0 \sim \mathcal N(m(t) x_0, s(t)^2 I)$,
then exactly

$$p_t = \sum_k w_k\, \mathcal N\big(m(t)\mu_k,\ m(t)^2 \Sigma_k + s(t)^2 I\big),$$

so $\log p_t$ and $\nabla_x \log p_t = \sum_k r_k(x)\,\big(m^2\Sigma_k + s^2 I\big)^{-1}(m\mu_k - x)$, with
responsibilities $r_k = \mathrm{softmax}_k(\log w_k + \log \mathcal N_k(x))$, are known in closed form.

Numerics: each $\Sigma_k = U_k \Lambda_k U_k^\top$ is eigendecomposed once (float64). The perturbed
covariance shares the eigenvectors, $m^2\Sigma_k + s^2 I = U_k(m^2\Lambda_k + s^2)U_k^\top$, so densities
and scores for a batch of different $t$ cost one projection onto $U_k$ and no matrix inverse;
mixing uses log-sum-exp. Parameters are cast to the input's device and dtype on first use.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ._utils import check_floating
from .sdes import AffineSDE

__all__ = ["GaussianMixture", "named_mixture", "MIXTURE_NAMES"]


class GaussianMixture:
    r"""Mixture of $K$ Gaussians in $\mathbb R^d$ with full, diagonal or isotropic covariances.

    Args:
        means (Tensor): ``(K, d)`` component means (a ``(d,)`` tensor means one component).
        covs (Tensor | None): ``(K, d, d)`` symmetric positive-definite covariances, or
        stds (float | Tensor | None): a float (shared isotropic std), ``(K,)`` (isotropic per component) or ``(K, d)``
            (diagonal). Give ``covs`` or ``stds``, not both; neither means identity covariances.
        weights (Tensor | None): ``(K,)`` non-negative, summing to 1 (default uniform).
        device (torch.device | str | None): where the parameters live (default: that of ``means``).
        dtype (torch.dtype | None): their precision (default: that of ``means``; float64 recommended).

    Raises:
        ValueError: bad shapes, non-positive stds, weights not a probability vector, or a
            covariance that is not symmetric positive definite (the message names the component).
        TypeError: non-tensor-like arguments.
    """

    def __init__(self, means, covs=None, stds=None, weights=None, *, device=None, dtype=None):
        given = torch.as_tensor(means)
        dtype = dtype or (given.dtype if given.is_floating_point() else torch.get_default_dtype())
        means = _exact(means)
        device = device or means.device
        means = means.to(device=device, dtype=dtype)
        if means.ndim == 1:
            means = means[None]
        if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        if not torch.isfinite(means).all():
            raise ValueError("means must be finite")
        K, d = means.shape
        if covs is not None and stds is not None:
            raise ValueError("give covs or stds, not both")
        if covs is not None:
            covs = _exact(covs).to(device=device, dtype=dtype)
            if covs.ndim == 2:
                covs = covs.expand(K, d, d)
            if covs.shape != (K, d, d):
                raise ValueError(f"covs must have shape ({K}, {d}, {d}), got {tuple(covs.shape)}")
            if not torch.allclose(covs, covs.transpose(-1, -2), rtol=1e-6, atol=1e-10):
                raise ValueError("covs must be symmetric")
            lam, U = torch.linalg.eigh(covs.to(torch.float64))
            for k in range(K):
                if not (lam[k] > 0).all():
                    raise ValueError(f"covs[{k}] is not positive definite (smallest eigenvalue {float(lam[k].min()):.3g})")
            self._lam, self._U = lam.to(dtype), U.to(dtype)
        else:
            if stds is None:
                stds = 1.0
            if isinstance(stds, (bool, str)) or (isinstance(stds, torch.Tensor) and stds.dtype == torch.bool):
                raise TypeError(f"stds must be a float or a real tensor, got {stds!r}")
            stds = _exact(stds).to(device=device, dtype=dtype)
            if stds.ndim == 0:
                stds = stds.expand(K, d)
            elif stds.ndim == 1 and stds.shape[0] == K:
                stds = stds[:, None].expand(K, d)
            if stds.shape != (K, d):
                raise ValueError(f"stds must be a float, ({K},) or ({K}, {d}), got {tuple(stds.shape)}")
            if not (torch.isfinite(stds).all() and (stds > 0).all()):
                raise ValueError("stds must be finite and positive")
            self._lam, self._U = stds.square().contiguous(), None
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=dtype, device=device)
        weights = _exact(weights).to(device=device, dtype=dtype)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape ({K},), got {tuple(weights.shape)}")
        if (weights < 0).any() or not torch.isfinite(weights).all():
            raise ValueError("weights must be finite and non-negative")
        if abs(float(weights.sum()) - 1.0) > 1e-5:
            raise ValueError(f"weights must sum to 1, got sum {float(weights.sum()):.6g}")
        self._means = means
        self._weights = weights
        self._cache: dict = {}

    @classmethod
    def _from_parts(cls, means, lam, U, weights) -> "GaussianMixture":
        gm = cls.__new__(cls)
        gm._means, gm._lam, gm._U, gm._weights, gm._cache = means, lam, U, weights, {}
        return gm

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return self._means.shape[1]

    @property
    def n_components(self) -> int:
        return self._means.shape[0]

    @property
    def means(self) -> Tensor:
        """``(K, d)``."""
        return self._means

    @property
    def weights(self) -> Tensor:
        """``(K,)``."""
        return self._weights

    @property
    def covs(self) -> Tensor:
        r"""``(K, d, d)`` component covariances $U \Lambda U^\top$."""
        if self._U is None:
            return torch.diag_embed(self._lam)
        return self._U @ torch.diag_embed(self._lam) @ self._U.transpose(-1, -2)

    @property
    def device(self) -> torch.device:
        return self._means.device

    @property
    def dtype(self) -> torch.dtype:
        return self._means.dtype

    def mean(self) -> Tensor:
        r"""Mixture mean $\sum_k w_k \mu_k$, ``(d,)``."""
        return self._weights @ self._means

    def covariance(self) -> Tensor:
        r"""Mixture covariance $\sum_k w_k(\Sigma_k + \mu_k\mu_k^\top) - \mu\mu^\top$, ``(d, d)``."""
        mu = self.mean()
        second = (self._weights[:, None, None] * (self.covs + self._means[:, :, None] * self._means[:, None, :])).sum(0)
        return second - torch.outer(mu, mu)

    def to(self, device=None, dtype=None) -> "GaussianMixture":
        """A copy with parameters on ``device`` / in ``dtype``."""
        conv = lambda v: None if v is None else v.to(device=device or v.device, dtype=dtype or v.dtype)  # noqa: E731
        return GaussianMixture._from_parts(conv(self._means), conv(self._lam), conv(self._U), conv(self._weights))

    def _params(self, like: Tensor):
        key = (like.device, like.dtype)
        p = self._cache.get(key)
        if p is None:
            conv = lambda v: None if v is None else v.to(device=like.device, dtype=like.dtype)  # noqa: E731
            p = (conv(self._means), conv(self._lam), conv(self._U), conv(self._weights).log())
            self._cache[key] = p
        return p

    # ------------------------------------------------------------------ sampling and densities
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        r"""Draw ``n`` samples, ``(n, d)``, on the mixture's device and dtype."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        comp = torch.multinomial(self._weights.to(torch.float64), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, device=self.device, dtype=self.dtype)
        z = z * self._lam[comp].sqrt()
        if self._U is not None:
            z = torch.einsum("nij,nj->ni", self._U[comp], z)
        return self._means[comp] + z

    def _terms(self, x: Tensor, m: Tensor, s: Tensor):
        """Per-component log-densities ``(B, K)`` and projected residuals for N(m mu_k, m^2 Sigma_k + s^2 I)."""
        means, lam, U, logw = self._params(x)
        diff = x[:, None, :] - m[:, None, None] * means[None]                   # (B, K, d)
        z = diff if U is None else torch.einsum("bki,kij->bkj", diff, U)         # eigenbasis coords
        var = m[:, None, None].square() * lam[None] + s[:, None, None].square()  # (B, K, d)
        logn = -0.5 * ((z.square() / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return logn + logw, z, var, U

    def _flat(self, x: Tensor, name: str = "x") -> Tensor:
        check_floating(x, name)
        if x.ndim < 2 or x[0].numel() != self.dim:
            raise ValueError(f"{name} must have shape (B, {self.dim}) (or (B, *D) with prod(D) = {self.dim}), "
                             f"got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim)

    def log_prob(self, x: Tensor) -> Tensor:
        r"""$\log p(x)$ for ``x`` ``(B, d)``; returns ``(B,)``."""
        xf = self._flat(x)
        one = torch.ones(xf.shape[0], device=x.device, dtype=x.dtype)
        lp, *_ = self._terms(xf, one, torch.zeros_like(one))
        return torch.logsumexp(lp, dim=1)

    def perturbed(self, sde: AffineSDE, t: float) -> "GaussianMixture":
        r"""The exact marginal $p_t$ at a scalar time: means $m\mu_k$, covariances $m^2\Sigma_k + s^2 I$."""
        _check_affine(sde)
        tt = torch.tensor([float(t)], dtype=torch.float64)
        m, s = (v.to(self.dtype).to(self.device) for v in sde.marginal(tt))
        return GaussianMixture._from_parts(m * self._means, m.square() * self._lam + s.square(), self._U, self._weights)

    def _terms_t(self, x: Tensor, t, sde: AffineSDE):
        """`_terms` of the perturbed mixture $p_t$ under ``sde`` at times ``t`` (checked, flattened ``x``)."""
        _check_affine(sde)
        xf = self._flat(x)
        m, s = sde.marginal(sde.time(t, xf))
        return self._terms(xf, m, s)

    def log_prob_t(self, x: Tensor, t, sde: AffineSDE) -> Tensor:
        r"""Exact $\log p_t(x)$ under ``sde``; ``x`` ``(B, d)``, ``t`` ``(B,)`` or scalar; returns ``(B,)``."""
        lp, *_ = self._terms_t(x, t, sde)
        return torch.logsumexp(lp, dim=1)

    def score(self, x: Tensor, t, sde: AffineSDE) -> Tensor:
        r"""Exact $\nabla_x \log p_t(x)$, shaped like ``x``."""
        lp, z, var, U = self._terms_t(x, t, sde)
        r = torch.softmax(lp, dim=1)                                              # (B, K)
        g = -z / var                                                              # per-component score, eigenbasis
        if U is not None:
            g = torch.einsum("bkj,kij->bki", g, U)
        return (r[:, :, None] * g).sum(1).reshape(x.shape)

    def score_fn(self, sde: AffineSDE) -> Callable[..., Tensor]:
        r"""The exact score as a ``score_fn(x, t)`` for any batch of times (extra kwargs ignored)."""
        _check_affine(sde)

        def score_fn(x: Tensor, t: Tensor, **_: object) -> Tensor:
            return self.score(x, t, sde)

        return score_fn

    def __repr__(self) -> str:
        kind = "full" if self._U is not None else "diagonal"
        return f"GaussianMixture(K={self.n_components}, d={self.dim}, covariance={kind}, dtype={self.dtype})"


def _exact(value) -> Tensor:
    r"""A tensor of ``value`` without rounding: Python numbers and sequences become float64 (``torch.as_tensor``
    would round them through the default float32, e.g. ``0.2`` to ``0.2000000030``); tensors and NumPy
    arrays keep their own dtype."""
    if isinstance(value, Tensor):
        return value
    t = torch.as_tensor(value)
    if type(value).__module__ == "numpy" or t.dtype == torch.bool:
        return t
    return torch.as_tensor(value, dtype=torch.float64)


def _check_affine(sde) -> None:
    if not isinstance(sde, AffineSDE):
        raise TypeError(f"sde must be an sdegen.AffineSDE (the oracle needs a Gaussian kernel), got {type(sde).__name__}")


# ---------------------------------------------------------------------- ready-made mixtures
def _eight_gaussians(dtype, device):
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([ang.cos(), ang.sin()], 1)
    return GaussianMixture(means, stds=0.2, dtype=dtype, device=device)


def _anisotropic_pair(dtype, device):
    def rot(a, ev):
        c, s = math.cos(a), math.sin(a)
        R = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        return R @ torch.diag(torch.tensor(ev, dtype=torch.float64)) @ R.T
    covs = torch.stack([rot(math.pi / 6, [0.5, 0.01]), rot(-math.pi / 3, [0.3, 0.02])])
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=torch.float64)
    return GaussianMixture(means, covs=covs, weights=[0.3, 0.7], dtype=dtype, device=device)


def _random_mixture(d, K, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, d, generator=g, dtype=torch.float64) * (1.5 / math.sqrt(d) ** 0.5)
    A = torch.randn(K, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    covs = 0.1 * (A @ A.transpose(-1, -2)) + 0.02 * torch.eye(d, dtype=torch.float64)
    w = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixture(means, covs=covs, weights=w / w.sum(), dtype=dtype, device=device)


def _gaussian(dtype, device):
    return GaussianMixture(torch.full((1, 2), 0.5, dtype=torch.float64), stds=0.5, dtype=dtype, device=device)


_MIXTURES = {
    "8gaussians": _eight_gaussians,
    "anisotropic": _anisotropic_pair,
    "mixture16": lambda dtype, device: _random_mixture(16, 4, 16, dtype, device),
    "mixture64": lambda dtype, device: _random_mixture(64, 6, 64, dtype, device),
    "gaussian": _gaussian,
}
#: Names accepted by [`named_mixture`][sdegen.oracle.named_mixture].
MIXTURE_NAMES = tuple(_MIXTURES)


def named_mixture(name: str, *, dtype: torch.dtype = torch.float64, device=None) -> GaussianMixture:
    r"""A ready-made mixture for tests and benchmarks.

    - ``"8gaussians"``: 8 isotropic components (std 0.2) on a circle of radius 2 in 2-D.
    - ``"anisotropic"``: two rotated, strongly elongated 2-D components (eigenvalues 0.5/0.01 and
      0.3/0.02), weights 0.3/0.7.
    - ``"mixture16"``, ``"mixture64"``: 4 and 6 random full-covariance components in 16-D and 64-D
      (fixed seed; covariance eigenvalues between 0.02 and about 0.5).
    - ``"gaussian"``: a single $\mathcal N(0.5, 0.5^2 I)$ in 2-D (the variance-error benchmark;
      $\mathcal N(0, I)$ is useless there because every VP marginal is then $\mathcal N(0, I)$).
    """
    if name not in _MIXTURES:
        raise ValueError(f"unknown mixture {name!r}; choose one of {', '.join(MIXTURE_NAMES)}")
    return _MIXTURES[name](dtype, device)
