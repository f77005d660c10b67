r"""Langevin correctors and the predictor–corrector (PC) solver (Song et al. 2021, Alg. 1–5).

A corrector runs a few steps of Langevin MCMC targeting the current marginal $p_t$,

$$x \leftarrow x + \epsilon\, s(x, t) + \sqrt{2\epsilon}\, z, \qquad z \sim \mathcal N(0, I),$$

which leaves $p_t$ invariant as $\epsilon \to 0$ (Song et al. 2021, Alg. 4 and 5). Step sizes:

* ``LangevinCorrector`` (signal-to-noise rule, Alg. 5):
  $\epsilon_b = 2\alpha\,(r\,\sqrt d / \lVert s(x_b, t)\rVert)^2$ with the target ratio $r$ = ``snr``
  and $\sqrt d = \sqrt{\mathbb E\lVert z\rVert^2}$ the noise norm. The score norm is **per sample** $b$:
  a sample's step never depends on the other samples of its batch (the reference implementation
  averages the norms over the batch, which couples them). The realised $\lVert z_b\rVert$ is not used:
  a step computed from the draw it multiplies injects $(d+2)/d$ times the intended noise variance.
* ``AnnealedLangevinCorrector`` (Alg. 4, as in NCSN): $\epsilon = 2\alpha\,(r\, s(t))^2$ with $s(t)$
  the marginal std (needs an [`AffineSDE`][sdegen.AffineSDE]).

$\alpha = m(t_0)^2/m(t_1)^2$ over the current step $t_0 \to t_1$ (VP: DDPM's $\alpha_i = 1-\beta_i$; VE
and non-affine SDEs: 1), which makes the rule work for every affine SDE (sub-VP included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .._utils import append_dims
from ..sdes import AffineSDE
from .base import AbstractFixedGridSolver, Dynamics

__all__ = ["AbstractCorrector", "LangevinCorrector", "AnnealedLangevinCorrector", "PredictorCorrector",
           "langevin_alpha"]


def langevin_alpha(sde, t0: Tensor, t1: Tensor) -> Tensor:
    r"""$\alpha = m(t_0)^2 / m(t_1)^2$ for an affine SDE (VP: $\approx 1 - \beta_i$), else ones; shaped like ``t0``."""
    if isinstance(sde, AffineSDE):
        m0, _ = sde.marginal(t0)
        m1, _ = sde.marginal(t1)
        return (m0 / m1).square()
    return torch.ones_like(t0)


class AbstractCorrector:
    """One Langevin-type update at a fixed time; subclasses are frozen dataclasses holding options."""

    def correct(self, dyn: Dynamics, x: Tensor, t: Tensor, alpha: Tensor | float, noise: Tensor) -> Tensor:
        """Return the corrected ``x`` (``(B, *D)``) at time ``t`` (``(B,)``) using the unit draw ``noise``;
        ``alpha``: ``(B,)`` or a float."""
        raise NotImplementedError


def _langevin_update(x: Tensor, score: Tensor, step: Tensor, noise: Tensor) -> Tensor:
    r"""$x + \epsilon s + \sqrt{2\epsilon} z$ with a per-sample step $\epsilon$ ``(B,)`` (four kernels)."""
    step = append_dims(step, x.ndim)
    return torch.addcmul(x, step, score).addcmul_(step.mul(2.0).sqrt_(), noise)


@dataclass(frozen=True)
class LangevinCorrector(AbstractCorrector):
    r"""Langevin corrector with the signal-to-noise step rule (Song et al. 2021, Alg. 5), per sample.

    $\epsilon_b = 2\alpha (\text{snr}\,\sqrt d/\lVert s(x_b,t)\rVert_2)^2$ ($d$ = entries per sample); where
    the score is zero (or so small that the step overflows) the step is 0 (no information to move
    along). In very low dimension the per-sample $\lVert s_b\rVert$ is often near 0 close to a mode,
    so steps are heavy-tailed; prefer ``"annealed_langevin"`` there.

    Args:
        snr: target signal-to-noise ratio $r > 0$ (0.16 in the paper's CIFAR-10 runs).
    """

    snr: float = 0.16

    def correct(self, dyn: Dynamics, x: Tensor, t: Tensor, alpha: Tensor | float, noise: Tensor) -> Tensor:
        score = dyn.score(x, t)
        flat = score.flatten(1)
        sq = torch.linalg.vecdot(flat, flat)                      # ||s_b||^2, (B,)
        # E||z||^2 = d, not the realised ||z_b||: a step computed from the very draw it scales would
        # inject (d + 2)/d times the intended noise variance (E[||z||^2 z_j^2] = d + 2), a bias the
        # reference hides by averaging norms over the batch.
        d = x[0].numel()
        # 2 alpha snr^2 d / ||s||^2; 1/0 = inf (and overflow) become a zero step.
        step = torch.reciprocal(sq).mul_(2 * alpha * self.snr**2 * d).nan_to_num_(posinf=0.0)
        return _langevin_update(x, score, step, noise)


@dataclass(frozen=True)
class AnnealedLangevinCorrector(AbstractCorrector):
    r"""Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1; Song et al. 2021, Alg. 4).

    $\epsilon = 2\alpha\,(\text{snr}\cdot s(t))^2$ with $s(t)$ the marginal std, so the step scales with
    the noise level as in NCSN's $\epsilon\,\sigma_i^2/\sigma_L^2$.

    Args:
        snr: the ratio $r > 0$ multiplying the noise level.
    """

    snr: float = 0.16

    def correct(self, dyn: Dynamics, x: Tensor, t: Tensor, alpha: Tensor | float, noise: Tensor) -> Tensor:
        _, std = dyn.affine.marginal(t)
        score = dyn.score(x, t)
        return _langevin_update(x, score, 2 * alpha * (self.snr * std).square(), noise)


@dataclass(frozen=True, eq=False)
class PredictorCorrector(AbstractFixedGridSolver):
    r"""Predictor–corrector step: ``corrector_steps`` corrector updates at $t_0$, then the predictor
    $t_0 \to t_1$ (the order of Song et al. 2021, Alg. 1).

    Without a corrector this *is* the predictor: no extra score evaluation is made. The corrector's
    unit draws come from ``draw(k)`` (``k`` counts the corrector draws of the whole run), so the
    predictor's Brownian path from the loop is left untouched.

    Args:
        predictor: any fixed-grid solver.
        corrector: an [`AbstractCorrector`][sdegen.solvers.correctors.AbstractCorrector] or ``None``.
        corrector_steps: corrector updates per step, >= 1.
        draw: ``draw(k) -> Tensor`` shaped like ``x``, unit Gaussian; required with a corrector.
        alphas: optional per-step $\alpha$ as Python floats, precomputed on the grid (see
            [`langevin_alpha`][sdegen.solvers.correctors.langevin_alpha]); otherwise computed from ``t0``, ``t1`` each step.
    """

    predictor: AbstractFixedGridSolver
    corrector: AbstractCorrector | None = None
    corrector_steps: int = 1
    draw: Callable[[int], Tensor] | None = None
    alphas: tuple | None = None

    @property
    def order(self) -> float:  # type: ignore[override]
        return self.predictor.order

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.predictor.stochastic

    @property
    def evals_per_step(self) -> int:  # type: ignore[override]
        extra = self.corrector_steps if self.corrector is not None else 0
        return self.predictor.evals_per_step + extra

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        return self.predictor.init_state(dyn, x, t0), 0, 0

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        pstate, k, i = state
        if self.corrector is not None:
            alpha = self.alphas[i] if self.alphas is not None else langevin_alpha(dyn.sde, t0, t1)
            for _ in range(self.corrector_steps):
                x = self.corrector.correct(dyn, x, t0, alpha, self.draw(k))
                k += 1
        x, pstate = self.predictor.step(dyn, x, t0, t1, pstate, dw)
        return x, (pstate, k, i + 1)
