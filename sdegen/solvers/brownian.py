r"""The Brownian path: the one source of the increments $\Delta W$ a stochastic solver consumes.

Solvers never draw noise. The loop asks a path for the increment of step $i$ over $(t_i, t_{i+1})$,
$\Delta W_i = \sqrt{|t_{i+1} - t_i|}\,z_i$ with $z_i \sim \mathcal N(0, I)$, so a test can hand the loop
one path and its refinements (the coarse increment is the sum of the fine ones,
[`BrownianPath.from_increments`][sdegen.solvers.brownian.BrownianPath.from_increments]) to measure strong
order. Adaptive SDE solvers keep the increments of rejected steps and split them by the Brownian
bridge ([`BrownianBridgeStack`][sdegen.solvers.brownian.BrownianBridgeStack]), so the path stays one
Brownian motion whatever the accepted step sequence.

Time convention: forward time from 0 (data) to ``T``; samplers step downwards, $t_{i+1} < t_i$.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .._utils import append_dims

__all__ = ["BrownianPath", "BrownianBridgeStack"]


class BrownianPath:
    r"""Increments $\Delta W_i$ of one Brownian path on a fixed grid (final class).

    The unit draws $z_i$ come from one of: ``generator`` (``torch.randn`` shaped like ``x``, one per
    step, in step order); ``noise[i]`` (a ``(n, *x.shape)`` tensor of unit draws); ``noise(i)`` (a
    callable, e.g. per-sample seeded noise independent of the batch-mates); or given increments
    (``from_increments``, already scaled).

    Args:
        times: the ``(n+1,)`` host float grid (a list of floats, decreasing).
        x: the ``(B, *D)`` state (shape, device and dtype of the draws).
        generator: source of the draws when ``noise`` is ``None``.
        noise: unit draws, as a tensor ``(n, *x.shape)`` or a callable ``noise(i)``.
    """

    __slots__ = ("_scales", "_shape", "_device", "_dtype", "_generator", "_noise", "_increments")

    def __init__(self, times: list[float], x: Tensor, *, generator: torch.Generator | None = None,
                 noise: Tensor | Callable[[int], Tensor] | None = None):
        n = len(times) - 1
        if isinstance(noise, Tensor) and (noise.shape[0] != n or noise.shape[1:] != x.shape):
            raise ValueError(f"noise must have shape ({n}, {', '.join(map(str, x.shape))}), got {tuple(noise.shape)}")
        # The noise scales are built once (host floats): no per-step host arithmetic beyond a list index.
        self._scales = [math.sqrt(abs(times[i + 1] - times[i])) for i in range(n)]
        self._shape, self._device, self._dtype = x.shape, x.device, x.dtype
        self._generator, self._noise, self._increments = generator, noise, None

    @classmethod
    def from_increments(cls, increments: Tensor, factor: int = 1) -> "BrownianPath":
        r"""A path given by its increments on a fine grid, read on a grid ``factor`` times coarser.

        Step $i$ of the coarse grid gets $\sum_{j=0}^{k-1} \Delta W_{ik + j}$ ($k$ = ``factor``): the same
        Brownian motion sampled at every $k$-th fine point, as a strong-order test needs.

        Args:
            increments: ``(n_fine, *x.shape)`` increments $\Delta W$ (variance $|\Delta t|$ each).
            factor: fine steps per coarse step; must divide ``n_fine``.
        """
        n_fine = increments.shape[0]
        if not isinstance(factor, int) or factor < 1 or n_fine % factor:
            raise ValueError(f"factor must be a positive int dividing {n_fine}, got {factor!r}")
        self = cls.__new__(cls)
        self._scales = None
        self._shape, self._device, self._dtype = increments.shape[1:], increments.device, increments.dtype
        self._generator, self._noise = None, None
        self._increments = increments.reshape(n_fine // factor, factor, *increments.shape[1:]).sum(1)
        return self

    def steps(self) -> int | None:
        """Number of steps the path covers (``None`` when drawn on demand)."""
        return None if self._increments is None else self._increments.shape[0]

    def dw(self, i: int) -> Tensor:
        r"""$\Delta W_i$ over step $i$, shaped like ``x``."""
        if self._increments is not None:
            return self._increments[i]
        noise = self._noise
        if noise is None:
            z = torch.randn(self._shape, generator=self._generator, device=self._device, dtype=self._dtype)
        else:
            z = noise(i) if callable(noise) else noise[i]
        return z * self._scales[i]


class BrownianBridgeStack:
    r"""Per-sample stacks of future Brownian increments $(\Delta t, \Delta W)$ left by rejected steps.

    A rejected attempt's increment is pushed back; the next, shorter attempt takes its part by the
    Brownian bridge $\Delta W_{h'} \mid \Delta W_h \sim \mathcal N(\tfrac{h'}{h}\Delta W_h, \tfrac{h'(h-h')}{h} I)$
    (Rackauckas & Nie 2017, "RSwM1"), the rest staying on the stack.

    Args:
        x: the ``(B, *D)`` state (batch size, shape, device and dtype of the increments).
        depth: initial stack depth (grown on demand).
    """

    def __init__(self, x: Tensor, depth: int = 4):
        self.dt = x.new_zeros(x.shape[0], depth)
        self.dw = x.new_zeros(x.shape[0], depth, *x.shape[1:])
        self.depth = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        # Host-side flag: while no step was ever rejected (the common case) ``take`` is a fresh draw.
        self.nonempty = False

    def take(self, idx: Tensor, h: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        r"""Increments for an attempted step of size ``h`` (``(b,)``) for the samples ``idx``, using
        the unit draws ``z``: fresh $\sqrt h z$ on an empty stack, the whole top entry if $h$ covers it
        (the step is shortened to it), else its bridge part (the rest stays). Returns ``(h, dW)``."""
        if not self.nonempty:
            # Nothing pending (the common case): the fresh draw, without the gathers and scatters below
            # (bitwise what they would give: frac = 0 and bridge_sd = sqrt(h)).
            return h, z * append_dims(h.sqrt(), z.ndim)
        d = self.depth[idx]
        has = d > 0
        top = (d - 1).clamp_min(0)
        top_dt = torch.where(has, self.dt[idx, top], torch.ones_like(h))
        top_dw = self.dw[idx, top]
        full = has & (h >= top_dt)
        split = has & ~full
        h = torch.where(full, top_dt, h)
        nd = z.ndim
        frac = append_dims(torch.where(split, h / top_dt, torch.zeros_like(h)), nd)
        bridge_sd = append_dims(torch.where(split, (h * (top_dt - h) / top_dt).clamp_min(0), h).sqrt(), nd)
        # Empty stack: frac = 0 and bridge_sd = sqrt(h), so this is the fresh draw sqrt(h) z.
        dw = torch.where(append_dims(full, nd), top_dw, frac * top_dw + bridge_sd * z)
        self.dt[idx, top] = torch.where(split, top_dt - h, self.dt[idx, top])
        self.dw[idx, top] = torch.where(append_dims(split, nd), top_dw - dw, top_dw)
        self.depth[idx] = d - full.long()
        self.nonempty = bool(self.depth.any())
        return h, dw

    def push(self, idx: Tensor, mask: Tensor, h: Tensor, dw: Tensor) -> None:
        """Put the rejected attempts ``(h, dw)`` of ``idx[mask]`` back on top of their stacks."""
        idx, h, dw = idx[mask], h[mask], dw[mask]
        if idx.numel() == 0:
            return
        d = self.depth[idx]
        if int(d.max()) >= self.dt.shape[1]:
            self.dt = torch.cat([self.dt, torch.zeros_like(self.dt)], 1)
            self.dw = torch.cat([self.dw, torch.zeros_like(self.dw)], 1)
        self.dt[idx, d] = h
        self.dw[idx, d] = dw
        self.depth[idx] = d + 1
        self.nonempty = True
