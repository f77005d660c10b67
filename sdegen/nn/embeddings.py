r"""Time and label embeddings shared by [`MLP`][sdegen.nn.MLP] and [`UNet`][sdegen.nn.UNet].

The networks see a scalar "time input" per sample, shape ``(B,)``. [`sdegen.ScoreModel`][sdegen.parameterization.ScoreModel] passes
$t/T \in [0, 1]$ for the score/eps/x0/v parameterizations and EDM's $c_\text{noise} = \tfrac14\log\sigma$
for the EDM one, so an embedding must resolve values of order $10^{-3}$ to $1$.

This module imports torch only (STYLE.md: ``nn`` never imports ``sdes``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinusoidalEmbedding", "FourierEmbedding", "LabelEmbedding", "make_time_embedding", "TIME_EMBEDDINGS",
           "condition"]


class SinusoidalEmbedding(nn.Module):
    r"""Transformer-style sinusoidal embedding of a scalar (Vaswani et al. 2017, §3.5; DDPM, Ho et al. 2020, App. B).

    $$e(\tau) = [\sin(\omega_1 c\tau), \dots, \sin(\omega_{k}c\tau), \cos(\omega_1 c\tau), \dots, \cos(\omega_{k}c\tau)],
      \quad \omega_j = P^{-(j-1)/k},\ k = \text{dim}/2,$$

    with ``scale`` $c$ (default 1000, so that $\tau = t/T \in [0, 1]$ spans the range DDPM's integer
    steps did) and ``max_period`` $P$.

    Args:
        dim: output size (even).
        scale: multiplier $c$ applied to the input.
        max_period: $P$, the longest period in units of $c\tau$.

    Shapes: ``(B,) -> (B, dim)``.
    """

    def __init__(self, dim: int, *, scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even int >= 2, got {dim!r}")
        self.dim, self.scale = dim, float(scale)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", freqs.to(torch.get_default_dtype()), persistent=False)

    def forward(self, tau: Tensor) -> Tensor:
        arg = (self.scale * tau)[:, None] * self.freqs.to(tau.dtype)[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class FourierEmbedding(nn.Module):
    r"""Random Fourier features of a scalar (Tancik et al. 2020; used by Song et al. 2021, NCSN++).

    $$e(\tau) = [\sin(2\pi b\tau), \cos(2\pi b\tau)],\qquad b_j \sim \mathcal N(0, \text{scale}^2)$$

    The frequencies are drawn once from ``seed`` (so a saved config rebuilds the same embedding) and
    stored as a buffer that is not trained.

    Args:
        dim: output size (even).
        scale: standard deviation of the frequencies.
        seed: seed of the frequency draw.

    Shapes: ``(B,) -> (B, dim)``.
    """

    def __init__(self, dim: int, *, scale: float = 16.0, seed: int = 0):
        super().__init__()
        if not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even int >= 2, got {dim!r}")
        self.dim = dim
        gen = torch.Generator().manual_seed(int(seed))
        b = torch.randn(dim // 2, generator=gen, dtype=torch.float64) * float(scale)
        self.register_buffer("freqs", b.to(torch.get_default_dtype()), persistent=True)

    def forward(self, tau: Tensor) -> Tensor:
        arg = 2 * math.pi * tau[:, None] * self.freqs.to(tau.dtype)[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=1)


TIME_EMBEDDINGS = ("sinusoidal", "fourier")


def make_time_embedding(kind: str, dim: int) -> nn.Module:
    """Build the time embedding named ``kind`` (one of `TIME_EMBEDDINGS`)."""
    if kind == "sinusoidal":
        return SinusoidalEmbedding(dim)
    if kind == "fourier":
        return FourierEmbedding(dim)
    raise ValueError(f"time_embedding must be one of {', '.join(TIME_EMBEDDINGS)}; got {kind!r}")


class LabelEmbedding(nn.Module):
    r"""Class-label embedding with an extra *null* label for classifier-free guidance (Ho & Salimans 2022).

    Labels are integers in ``[0, num_classes)``; the index ``num_classes`` (`null_label`) means
    "no label". ``y=None`` embeds the null label for the whole batch, a Python int is broadcast.

    Args:
        num_classes: number of real classes.
        dim: embedding size.

    Shapes: ``y``: ``(B,)`` integer tensor, an int or ``None`` -> ``(B, dim)``.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        """The label index that means "unconditional"."""
        return self.num_classes

    def forward(self, y, batch: int, device: torch.device) -> Tensor:
        if y is None:
            y = self.null_label
        if isinstance(y, int) and not isinstance(y, bool):
            y = torch.full((batch,), y, dtype=torch.long, device=device)
        if not isinstance(y, Tensor) or y.dtype not in (torch.int32, torch.int64, torch.uint8):
            raise TypeError(f"y must be None, an int or an integer tensor of shape ({batch},), got {y!r}")
        if y.ndim == 0:
            y = y.expand(batch)
        if y.shape != (batch,):
            raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")
        if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null label), "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
        return self.embed(y.to(device=device, dtype=torch.long))


def condition(time_embed: nn.Module, label_embed: LabelEmbedding | None, t: Tensor, y, x: Tensor, cls: str) -> Tensor:
    r"""The conditioning vector $e(\tau) + e(y)$ of a network, ``(B, emb_dim)``; labels on an unconditional net are an error."""
    emb = time_embed(t.to(x.dtype))
    if label_embed is not None:
        return emb + label_embed(y, x.shape[0], x.device)
    if y is not None:
        raise ValueError(f"{cls}: got labels y but the net was built with num_classes=None")
    return emb
