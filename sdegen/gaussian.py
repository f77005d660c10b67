r"""Closed forms for Gaussians: KL divergence, log-density and the discretized (8-bit) likelihood.

Elementwise functions of broadcastable tensors, in nats; sum over the data dimensions for
isotropic or diagonal Gaussians. The variational bounds ([`sdegen.vlb`][sdegen.vlb]) are built
from them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["gaussian_kl", "gaussian_log_likelihood", "discretized_gaussian_log_likelihood", "standard_normal",
           "draw_device"]

_LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> Tensor:
    r"""$\mathrm{KL}(\mathcal N(\mu_1, \sigma_1^2) \,\|\, \mathcal N(\mu_2, \sigma_2^2))$, elementwise, in nats.

    $$\mathrm{KL} = \log\frac{\sigma_2}{\sigma_1} + \frac{\sigma_1^2 + (\mu_1-\mu_2)^2}{2\sigma_2^2} - \frac12$$

    (Kingma & Welling 2014, App. B). Arguments broadcast against each other; variances must be
    positive. Sum over dimensions for the KL of isotropic or diagonal Gaussians.

    Args:
        mean1: mean of the first Gaussian.
        var1: variance of the first Gaussian (positive).
        mean2: mean of the second Gaussian.
        var2: variance of the second Gaussian (positive).

    Returns:
        The broadcast elementwise KL, $\ge 0$, zero only where the two Gaussians are equal.
    """
    mean1, var1, mean2, var2 = (torch.as_tensor(v) for v in (mean1, var1, mean2, var2))
    # log(var2/var1) written as a difference of logs keeps precision when the ratio is near 1.
    return 0.5 * (var2.log() - var1.log() + (var1 + (mean1 - mean2).square()) / var2 - 1.0)


def gaussian_log_likelihood(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    r"""$\log\mathcal N(x; \mu, \sigma^2) = -\tfrac12\big((x-\mu)^2/\sigma^2 + \log\sigma^2 + \log 2\pi\big)$, elementwise.

    Args:
        x: the point.
        mean: $\mu$, broadcastable against ``x``.
        var: $\sigma^2 > 0$, broadcastable against ``x``.

    Returns:
        The broadcast elementwise log-density in nats (a density: continuous data).
    """
    return -0.5 * ((x - mean).square() / var + var.log() + _LOG_2PI)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, var: Tensor, *, bins: int = 256) -> Tensor:
    r"""Log-probability of $x$ in $[-1, 1]$ quantized to ``bins`` levels under $\mathcal N(\mu, \sigma^2)$.

    $$\log p(x) = \log \int_{\delta_-(x)}^{\delta_+(x)} \mathcal N(u; \mu, \sigma^2)\,du, \qquad
      \delta_\pm(x) = \begin{cases} \pm\infty & x = \pm 1 \\ x \pm 1/(\text{bins}-1) & \text{else}\end{cases}$$

    (Ho et al. 2020, eq. 13). The bin mass is computed from ``log_ndtr`` on the side of the mean
    where it does not cancel, so it stays accurate for bins far in a tail. Elementwise, broadcasting.

    Args:
        x: data in $[-1, 1]$ on the grid of ``bins`` levels.
        mean: $\mu$, broadcastable against ``x``.
        var: $\sigma^2 > 0$, broadcastable against ``x``.
        bins: the number of quantization levels (256 for 8-bit data).

    Returns:
        The broadcast elementwise log-probability of each bin, $\le 0$.
    """
    half = 1.0 / (bins - 1)
    std = var.sqrt()
    lo = (x - half - mean) / std
    hi = (x + half - mean) / std
    edge_lo = x <= -1.0 + 1e-6
    edge_hi = x >= 1.0 - 1e-6
    lo = torch.where(edge_lo, torch.full_like(lo, -math.inf), lo)
    hi = torch.where(edge_hi, torch.full_like(hi, math.inf), hi)
    # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi): use the form whose two terms are both small.
    upper = (lo + hi) > 0
    a = torch.where(upper, -hi, lo)
    b = torch.where(upper, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    # log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))); a < b always.
    return log_b + torch.log((-torch.expm1((log_a - log_b).clamp_max(0.0))).clamp_min(1e-300))


def draw_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    """Where to draw: the generator's device (a CUDA generator cannot fill a CPU tensor), else ``like``'s."""
    return generator.device if generator is not None else like.device


def standard_normal(like: Tensor, generator: torch.Generator | None) -> Tensor:
    r"""A draw $z \sim \mathcal N(0, I)$ shaped like ``like``, with its dtype and device.

    One ``torch.randn`` on [`draw_device`][sdegen.gaussian.draw_device], moved to ``like``'s device.

    Args:
        like: ``(B, *D)``, gives shape, dtype and device.
        generator: source of the draw (``None``: the global generator).

    Returns:
        ``(B, *D)``.
    """
    return torch.randn(like.shape, generator=generator, device=draw_device(generator, like),
                       dtype=like.dtype).to(like.device)
