"""Beta schedules shared by the discrete-VP tests (imported as ``from schedules import ...``; tests/ is on the
path through its conftest.py)."""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def linear_betas(n, lo=1e-4, hi=0.02):
    """DDPM's linear schedule (Ho et al. 2020): ``n`` betas from ``lo`` to ``hi``, float64."""
    return torch.linspace(lo, hi, n, dtype=F64)


def cosine_betas(n, s=0.008):
    """Nichol & Dhariwal 2021, eq. 17: a schedule very unlike a linear beta(t), float64."""
    f = torch.cos((torch.arange(n + 1, dtype=F64) / n + s) / (1 + s) * math.pi / 2) ** 2
    ab = f / f[0]
    return (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
