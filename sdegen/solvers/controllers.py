r"""Step-size controllers: the fixed grid and the PI controller, usable by any solver with an error estimate.

A controller turns a step's error norm into the next step size. Adaptive solvers
([`rk45_integrate`][sdegen.solvers.rk45.rk45_integrate], [`adaptive_sde_integrate`][sdegen.solvers.adaptive_sde.adaptive_sde_integrate])
measure the error (a Python float in batched mode, a ``(B,)`` tensor per sample) and ask
[`PIController.factor`][sdegen.solvers.controllers.PIController.factor] for the step ratio; fixed-grid solvers
are driven by [`FixedGrid`][sdegen.solvers.controllers.FixedGrid], which holds the times once (host
floats for messages and noise scales, ``(B,)`` device vectors for the steps).

Time convention: forward time runs from 0 (data) to ``T``; samplers step from ``T`` down to ``eps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PIController", "FixedGrid"]


@dataclass(frozen=True)
class PIController:
    r"""Step-size controller $h_{n+1} = h_n \cdot \mathrm{clip}(\text{safety}\,\|e_n\|^{-\alpha}\|e_{n-1}\|^{\beta})$.

    With ``beta = 0`` it is the classical I controller $(\text{safety}/\|e\|)^{1/q}$ (Hairer–Nørsett–
    Wanner eq. II.4.13); ``beta = 0.04`` is the PI setting of Hairer's ``dopri5`` code (Hairer–Wanner
    II, Sec. IV.2). After a rejected step the factor is capped at ``reject_max`` (default 1: no growth
    right after a failure; the adaptive SDE solver of Jolicoeur-Martineau et al. 2021 caps at its
    safety factor). Works on Python floats (batched mode) and on ``(B,)`` tensors (per-sample mode) alike.

    Attributes:
        safety: safety factor (< 1).
        min_factor: lower bound on the step ratio.
        max_factor: upper bound on the step ratio.
        beta: PI exponent on the previous error (0: I controller).
        reject_max: upper bound on the step ratio after a rejected step.
        hold_after_reject: the first accepted step after a rejection does not grow the step (ratio at
            most 1), as in Hairer's ``dopri5`` (``REJECT`` flag) and scipy's ``RK45``: the step that just
            failed was too large, so growing right after the retry invites another rejection.
    """

    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    beta: float = 0.04
    reject_max: float = 1.0
    hold_after_reject: bool = True

    def __post_init__(self):
        if not 0 < self.safety <= 1:
            raise ValueError(f"safety must lie in (0, 1], got {self.safety!r}")
        if not 0 < self.min_factor < 1 < self.max_factor:
            raise ValueError(f"need 0 < min_factor < 1 < max_factor, got {self.min_factor!r}, {self.max_factor!r}")
        if not 0 <= self.beta < 0.2:
            raise ValueError(f"beta must lie in [0, 0.2), got {self.beta!r}")
        if not isinstance(self.hold_after_reject, bool):
            raise TypeError(f"hold_after_reject must be a bool, got {self.hold_after_reject!r}")
        if not self.min_factor <= self.reject_max <= 1:
            raise ValueError(f"reject_max must lie in [min_factor, 1], got {self.reject_max!r}")

    def factor(self, err, prev_err, q: int, accepted, *, alpha: float | None = None, after_reject=False):
        r"""Step ratio from the error norm ``err`` (float or ``(B,)``), ``q`` = error order + 1.

        Args:
            err (float | Tensor): this step's error norm (a float, or a ``(B,)`` tensor per sample).
            prev_err (float | Tensor): the previous accepted step's error norm (same kind; unused when ``beta = 0``).
            q: error order + 1; the exponent is $\alpha = 1/q - 0.75\beta$.
            accepted (bool | Tensor): whether the step was accepted (bool, or ``(B,)`` bool tensor).
            alpha: the exponent $\alpha$ itself, overriding ``q`` (a solver with a tuned exponent).
            after_reject (bool | Tensor): whether the previous attempt (of this sample) was rejected; with
                ``hold_after_reject`` an accepted step's ratio is then capped at 1.
        """
        if alpha is None:
            alpha = 1.0 / q - 0.75 * self.beta
        if isinstance(err, Tensor):
            # err = 0 (an exactly integrated step) gives the largest allowed growth.
            fac = self.safety * err.clamp_min(1e-10).pow(-alpha)
            if self.beta:
                fac = fac * prev_err.clamp_min(1e-4).pow(self.beta)
            fac = torch.where(torch.isfinite(fac), fac, torch.full_like(fac, self.min_factor))
            fac = fac.clamp(self.min_factor, self.max_factor)
            capped = ~accepted
            if self.hold_after_reject and isinstance(after_reject, Tensor):
                capped = capped | after_reject
                return torch.where(capped, fac.clamp_max(torch.where(accepted, 1.0, self.reject_max)), fac)
            return torch.where(capped, fac.clamp_max(self.reject_max), fac)
        if not math.isfinite(err):
            return self.min_factor
        fac = self.safety * max(err, 1e-10) ** (-alpha) * max(prev_err, 1e-4) ** self.beta
        top = (1.0 if self.hold_after_reject and after_reject else self.max_factor) if accepted else self.reject_max
        return min(max(fac, self.min_factor), top)


class FixedGrid:
    r"""The fixed-grid controller: the decreasing times $t_0 > t_1 > \dots > t_n$, prepared once per run.

    Holds the grid as host floats (``t_list``, for messages and noise scales) and as ``(B,)`` device
    vectors (``vecs``, one per grid point, views of one expanded tensor) so that a step costs no host
    work beyond indexing.

    Args:
        times: ``(n+1,)`` decreasing times, ``times[0]`` the start.
        x: the ``(B, *D)`` state (its batch size, device and dtype).
    """

    __slots__ = ("times_cpu", "t_list", "vecs", "n")

    def __init__(self, times: Tensor, x: Tensor):
        self.times_cpu = times.detach().to("cpu", torch.float64)
        self.t_list = self.times_cpu.tolist()
        self.n = len(self.t_list) - 1
        tdev = times.to(device=x.device, dtype=x.dtype)
        self.vecs = tdev.unsqueeze(1).expand(self.n + 1, x.shape[0]).unbind(0)
