r"""Data-prediction options for any score function: clipping and dynamic thresholding of $\hat x_0$.

Pixel-space models are often sampled with their data prediction held inside the data range. Here
that is a wrapper around a score function on an affine SDE, so every sdegen method can use it:

$$\hat x_0 = \frac{x + s(t)^2\,\hat s(x, t)}{m(t)}\ \text{(Tweedie)},\qquad
  \tilde x_0 = \phi(\hat x_0),\qquad \tilde s(x, t) = \frac{m(t)\,\tilde x_0 - x}{s(t)^2}.$$

[`ClipX0`][sdegen.x0_transforms.ClipX0]: $\phi(x_0) = \mathrm{clamp}(x_0, -c, c)$ (Ho et al. 2020's
sampler clips to $[-1, 1]$; ``diffusers``' ``clip_sample``). [`ThresholdX0`][sdegen.x0_transforms.ThresholdX0]:
dynamic thresholding, $r$ = the ``ratio`` quantile of $|\hat x_0|$ per sample, $c = \min(\max(r, 1), c_\max)$,
$\phi(x_0) = \mathrm{clamp}(x_0, -c, c)/c$ (Saharia et al. 2022, "Imagen", Sec. 2.3; ``diffusers``' ``thresholding``).

The ancestral (DDPM) step computed from $\tilde s$ is exactly the posterior mean with the clipped
$\tilde x_0$, because that mean is linear in the $(x_0, \text{score})$ pair Tweedie ties together.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._utils import append_dims
from .sdes import AffineSDE

__all__ = ["ClipX0", "ThresholdX0"]


def _check_sde(sde) -> AffineSDE:
    if not isinstance(sde, AffineSDE):
        raise TypeError(f"sde must be an sdegen.AffineSDE (Tweedie needs a Gaussian kernel), got {type(sde).__name__}")
    return sde


def _check_float(value, name: str, lo: float, hi: float = float("inf"), *, open_lo: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    v = float(value)
    if not ((v > lo if open_lo else v >= lo) and v <= hi):
        raise ValueError(f"{name} must lie in {'(' if open_lo else '['}{lo}, {hi}], got {value!r}")
    return v


class _X0Transform:
    """Base of the wrappers: score -> x0 -> phi(x0) -> score (picklable)."""

    def __init__(self, score_fn: Callable[..., Tensor], sde: AffineSDE):
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable score_fn(x, t), got {type(score_fn).__name__}")
        self.score_fn, self.sde = score_fn, _check_sde(sde)

    def transform(self, x0: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x: Tensor, t: Tensor, **model_kwargs) -> Tensor:
        score = self.score_fn(x, t, **model_kwargs)
        m, s = self.sde.marginal(t)
        m, s2 = append_dims(m, x.ndim), append_dims(s.square(), x.ndim)
        x0 = self.transform((x + s2 * score) / m)
        return (m * x0 - x) / s2


class ClipX0(_X0Transform):
    r"""The score whose data prediction is clipped to $[-c, c]$ (final class).

    Args:
        score_fn: ``score_fn(x, t, **model_kwargs)``.
        sde: the [`AffineSDE`][sdegen.AffineSDE] the score belongs to.
        limit: $c > 0$ (``diffusers``' ``clip_sample_range``, default 1).
    """

    def __init__(self, score_fn: Callable[..., Tensor], sde: AffineSDE, limit: float = 1.0):
        super().__init__(score_fn, sde)
        self.limit = _check_float(limit, "limit", 0.0)

    def transform(self, x0: Tensor) -> Tensor:
        return x0.clamp(-self.limit, self.limit)


class ThresholdX0(_X0Transform):
    r"""The score whose data prediction is dynamically thresholded (Imagen; final class).

    Per sample, $r$ = the ``ratio`` quantile of $|\hat x_0|$ over all its entries,
    $c = \min(\max(r, 1), c_\max)$, and $\tilde x_0 = \mathrm{clamp}(\hat x_0, -c, c)/c$.

    Args:
        score_fn: ``score_fn(x, t, **model_kwargs)``.
        sde: the [`AffineSDE`][sdegen.AffineSDE] the score belongs to.
        ratio: the quantile, in ``(0, 1]`` (``diffusers``' ``dynamic_thresholding_ratio``, 0.995).
        max_value: $c_\max \ge 1$ (``diffusers``' ``sample_max_value``).
    """

    def __init__(self, score_fn: Callable[..., Tensor], sde: AffineSDE, ratio: float = 0.995,
                 max_value: float = 1.0):
        super().__init__(score_fn, sde)
        self.ratio = _check_float(ratio, "ratio", 0.0, 1.0)
        self.max_value = _check_float(max_value, "max_value", 1.0, open_lo=False)

    def transform(self, x0: Tensor) -> Tensor:
        flat = x0.reshape(x0.shape[0], -1)
        c = torch.quantile(flat.abs(), self.ratio, dim=1).clamp(1.0, self.max_value).unsqueeze(1)
        return (torch.maximum(torch.minimum(flat, c), -c) / c).reshape(x0.shape)
