r"""Langevin correctors and the predictor–corrector (PC) solver (Song et al. 2021, Alg. 1–5).

A corrector runs a few steps of unadjusted Langevin MCMC targeting the current marginal $p_t$,

$$x \leftarrow x + \epsilon\, s(x, t) + \sqrt{2\epsilon}\, z, \qquad z \sim \mathcal N(0, I),$$

which leaves $p_t$ invariant as $\epsilon \to 0$ **provided $\epsilon$ does not depend on $x$**. With a
state-dependent step the small-step limit is $dx = \epsilon(x)\,\nabla\log p\,dt + \sqrt{2\epsilon(x)}\,dW$,
whose Fokker–Planck equation $\partial_t q = -\nabla\cdot(\epsilon\, q\,\nabla\log p) + \Delta(\epsilon\, q)$ is
stationary for $\epsilon q \propto p$, i.e. $q \propto p/\epsilon(x)$, not $p$. Step rules (names as in
``sample(..., method="pc", corrector=...)``):

* ``"langevin"``, [`LangevinCorrector`][sdegen.solvers.correctors.LangevinCorrector] (default): the
  signal-to-noise rule of Alg. 5 with the score norm replaced by its bound under $p_t$, a function of
  $t$ only: $\epsilon(t) = 2\alpha\, r^2\,(s(t)^2 + m(t)^2\sigma^2)$; $\sigma$ = ``data_std`` (default 0).
  Per sample, independent of the batch, stable in every dimension (derivation in the class).
* ``"langevin_batch"``, [`BatchLangevinCorrector`][sdegen.solvers.correctors.BatchLangevinCorrector]: the
  paper's rule, $\epsilon = 2\alpha\,(r\,\overline{\lVert z\rVert}/\overline{\lVert s\rVert})^2$ with norms
  **averaged over the batch**: a sample's result depends on its batch-mates and on the batch size.
* ``"annealed_langevin"``, [`AnnealedLangevinCorrector`][sdegen.solvers.correctors.AnnealedLangevinCorrector]
  (Alg. 4, as in NCSN): $\epsilon = 2\alpha\,(r\, s(t))^2$; equal to ``"langevin"`` with ``data_std=0``.

The per-sample rule $\epsilon_b = 2\alpha (r\sqrt d/\lVert s(x_b,t)\rVert)^2$ used before is gone: by the
argument above it samples $\propto p_t\,\lVert s\rVert^2$ (variance +14 % in 16-D, +5 % in 64-D, not
shrinking with more steps) and is singular where the score vanishes between modes (samples at
$|x| \approx 1800$ on the 2-D eight-Gaussian mixture).

$\alpha = m(t_0)^2/m(t_1)^2$ over the current step $t_0 \to t_1$ (VP: DDPM's $\alpha_i = 1-\beta_i$; VE
and non-affine SDEs: 1), which makes the rules work for every affine SDE (sub-VP included).
Notation: $m(t)$ = ``mean_coef``, $s(t)$ = ``std`` of $x_t \mid x_0 \sim \mathcal N(m x_0, s^2 I)$; $r$ =
``snr``; $d$ = entries per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .._utils import append_dims
from ..sdes import SDE, AffineSDE
from .base import AbstractFixedGridSolver, Dynamics
from .marginal_rows import GridCoefficients

__all__ = ["AbstractCorrector", "LangevinCorrector", "BatchLangevinCorrector", "AnnealedLangevinCorrector",
           "PredictorCorrector", "langevin_alpha"]


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

    def tabulate(self, sde: SDE, times: Tensor, alphas: Sequence[float], dtype: torch.dtype) -> tuple | None:
        r"""Per-step ``(eps_i, sqrt(2 eps_i))`` as host floats on the grid ``times`` (``(n+1,)``) when the
        step depends on time only, computed once per run in ``dtype`` (the state's) so that a step
        needs no coefficient kernels; ``None`` (the default) for rules that read the state.

        Args:
            sde: the forward SDE.
            times: the decreasing grid, ``times[0]`` the start.
            alphas: the ``n`` per-step $\alpha_i$ (floats, see `langevin_alpha`).
            dtype: the state's floating dtype (the step is rounded as the untabulated rule rounds it).
        """
        return None


def _tabulate_steps(step: Tensor) -> tuple:
    """``((eps_i, sqrt(2 eps_i)), ...)`` host floats from the ``(n,)`` steps, rounded as `_langevin_update` rounds them."""
    return tuple(zip(step.tolist(), step.mul(2.0).sqrt_().tolist()))


def _grid_args(times: Tensor, alphas, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The grid's left ends and the $\alpha_i$ as CPU tensors in ``dtype`` (as the loop's time vectors)."""
    return times.detach()[:-1].to("cpu", dtype), torch.tensor(alphas, dtype=torch.float64).to(dtype)


def _langevin_update(x: Tensor, score: Tensor, step: Tensor, noise: Tensor) -> Tensor:
    r"""$x + \epsilon s + \sqrt{2\epsilon} z$ with a per-sample step $\epsilon$ ``(B,)`` (four kernels)."""
    step = append_dims(step, x.ndim)
    return torch.addcmul(x, step, score).addcmul_(step.mul(2.0).sqrt_(), noise)


def _check_affine_for(name: str, sde) -> AffineSDE:
    if not isinstance(sde, AffineSDE):
        raise TypeError(f"corrector {name!r} needs an AffineSDE (its step uses the marginal std s(t)), got "
                        f"{type(sde).__name__}; use corrector='langevin_batch' or corrector=None")
    return sde


@dataclass(frozen=True)
class LangevinCorrector(AbstractCorrector):
    r"""Langevin corrector with the signal-to-noise rule at the expected score norm: a step per time $t$.

    Alg. 5 of Song et al. (2021) chooses $\epsilon$ so that the drift and noise norms have the ratio
    $r$: $\lVert\epsilon s\rVert / \lVert\sqrt{2\epsilon} z\rVert = r$, i.e. $\epsilon = 2\alpha r^2\,
    \lVert z\rVert^2/\lVert s\rVert^2$, with norms averaged over the batch. Here both norms are replaced by
    their expectations under $p_t$, $\mathbb E\lVert z\rVert^2 = d$ and the Fisher information
    $J(t) = \mathbb E_{p_t}\lVert\nabla\log p_t\rVert^2$, so the step depends on $t$ only (the corrector
    then leaves $p_t$ invariant as $\epsilon \to 0$; see the module docstring).

    **The bound.** Let the data be $y + \sigma\xi$ with $y$ arbitrary and $\xi \sim \mathcal N(0, I)$
    ($\sigma$ = ``data_std``; $\sigma = 0$ allows any data). Then $x_t = m\,y + v^{1/2} z'$ with
    $v(t) = s(t)^2 + m(t)^2\sigma^2$, and Tweedie's formula $\nabla\log p_t(x) = -\mathbb E[z' \mid x_t = x]
    / v^{1/2}$ gives, by Jensen,

    $$J(t) = \frac{\mathbb E\,\lVert \mathbb E[z'\mid x_t]\rVert^2}{v} \le \frac{d}{v},
      \qquad -\nabla^2\log p_t = \frac{I - \mathrm{Cov}(z'\mid x_t)}{v} \preceq \frac{I}{v},$$

    with equality as the spread of $y$ vanishes. The rule takes $J$ at its bound:

    $$\epsilon(t) = 2\alpha\,r^2\,\frac{d}{d/v(t)} = 2\alpha\,r^2\,\big(s(t)^2 + m(t)^2\sigma^2\big).$$

    Consequences: (i) no dependence on $x$ or on other samples (seeded samples do not depend on the
    batch); (ii) stable for every data distribution of that form and every dimension: the drift map
    $x + \epsilon s$ has Jacobian $I + \epsilon\nabla s \succeq (1 - 2\alpha r^2) I$, so no stiff
    direction is overshot while $\alpha r^2 < 1$; (iii) the realised signal-to-noise ratio is
    $r\sqrt{J v/d} \le r$: never more aggressive than asked. With $\sigma = 0$ this is Alg. 4's annealed
    step (NCSN's $\epsilon\sigma_i^2/\sigma_L^2$); a $\sigma > 0$ that overstates the smallest scale of
    the data (e.g. the overall std of a mixture with narrow modes) voids (ii).

    ``x``: ``(B, *D)``; ``t``: ``(B,)``, samplers run from ``T`` down to ``eps``.

    Args:
        snr: target signal-to-noise ratio $r$, in $(0, 1)$ (0.16 in the paper's CIFAR-10 runs).
        data_std: $\sigma \ge 0$, a Gaussian smoothing scale every data point carries (the smallest
            component std of a mixture); 0 (default) assumes nothing about the data.

    Raises:
        ValueError: ``snr`` outside $(0, 1)$ or ``data_std`` negative or not finite.
        TypeError: (when called) the SDE is not an [`AffineSDE`][sdegen.AffineSDE]: there is no marginal
            std to bound the score with; use ``"langevin_batch"`` or no corrector.
    """

    snr: float = 0.16
    data_std: float = 0.0

    def __post_init__(self):
        if isinstance(self.snr, bool) or not isinstance(self.snr, (int, float)) or not 0.0 < self.snr < 1.0:
            raise ValueError(f"snr must be a number in (0, 1) for the Langevin corrector, got {self.snr!r}")
        if (isinstance(self.data_std, bool) or not isinstance(self.data_std, (int, float))
                or not math.isfinite(self.data_std) or self.data_std < 0):
            raise ValueError(f"data_std must be a finite number >= 0, got {self.data_std!r}")

    def step_size(self, sde, t: Tensor, alpha: Tensor | float) -> Tensor:
        r"""$\epsilon(t) = 2\alpha r^2 (s(t)^2 + m(t)^2\sigma^2)$, shaped like ``t``."""
        m, std = _check_affine_for("langevin", sde).marginal(t)
        v = std.square() if self.data_std == 0 else std.square() + (m * self.data_std).square()
        return v.mul(2 * self.snr**2).mul_(alpha)

    def tabulate(self, sde: SDE, times: Tensor, alphas: Sequence[float], dtype: torch.dtype) -> tuple:
        return _tabulate_steps(self.step_size(sde, *_grid_args(times, alphas, dtype)))

    def correct(self, dyn: Dynamics, x: Tensor, t: Tensor, alpha: Tensor | float, noise: Tensor) -> Tensor:
        step = self.step_size(dyn.sde, t, alpha)
        return _langevin_update(x, dyn.score(x, t), step, noise)


@dataclass(frozen=True)
class BatchLangevinCorrector(AbstractCorrector):
    r"""The paper's signal-to-noise Langevin corrector, norms averaged over the batch (Song et al. 2021, Alg. 5).

    $$\epsilon = 2\alpha\,\Big(r\,\frac{\tfrac1B\sum_b \lVert z_b\rVert_2}{\tfrac1B\sum_b \lVert s(x_b, t)\rVert_2}\Big)^2,$$

    one step for the whole batch, as in the reference implementation (``LangevinCorrector`` in
    ``yang-song/score_sde_pytorch``, ``sampling.py``). **It couples the samples of a batch**: a sample's
    result depends on its batch-mates and on the batch size, so seeded samples are not reproducible
    across batch sizes; use ``"langevin"`` for that. Works for any SDE (no marginal needed). With a
    large batch the step approaches $2\alpha r^2 d / (\mathbb E\lVert s\rVert)^2$, the SNR rule at the
    expected norm (up to Jensen). Where every score of the batch is zero the step is 0.

    Args:
        snr: target signal-to-noise ratio $r > 0$.
    """

    snr: float = 0.16

    def correct(self, dyn: Dynamics, x: Tensor, t: Tensor, alpha: Tensor | float, noise: Tensor) -> Tensor:
        score = dyn.score(x, t)
        score_norm = torch.linalg.vector_norm(score.flatten(1), dim=1).mean()
        noise_norm = torch.linalg.vector_norm(noise.flatten(1), dim=1).mean()
        # One scalar for the batch; 1/0 (all scores zero) becomes a zero step, not inf.
        step = (self.snr * noise_norm / score_norm).square().mul_(2.0).nan_to_num_(posinf=0.0)
        step = (step * alpha).expand(x.shape[0])        # alpha: a float or (B,)
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

    def step_size(self, sde, t: Tensor, alpha: Tensor | float) -> Tensor:
        r"""$\epsilon(t) = 2\alpha\,(r\,s(t))^2$, shaped like ``t``."""
        _, std = _check_affine_for("annealed_langevin", sde).marginal(t)
        return 2 * alpha * (self.snr * std).square()

    def tabulate(self, sde: SDE, times: Tensor, alphas: Sequence[float], dtype: torch.dtype) -> tuple:
        return _tabulate_steps(self.step_size(sde, *_grid_args(times, alphas, dtype)))

    def correct(self, dyn: Dynamics, x: Tensor, t: Tensor, alpha: Tensor | float, noise: Tensor) -> Tensor:
        step = self.step_size(dyn.sde, t, alpha)
        return _langevin_update(x, dyn.score(x, t), step, noise)


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
        table: optional per-step ``(eps_i, sqrt(2 eps_i))`` host floats from the corrector's
            [`tabulate`][sdegen.solvers.correctors.AbstractCorrector.tabulate] for this grid: a corrector
            update is then $x + \epsilon_i s + \sqrt{2\epsilon_i} z$ in two kernels (the same numbers as
            ``corrector.correct``); ``alphas`` is not read.
    """

    predictor: AbstractFixedGridSolver
    corrector: AbstractCorrector | None = None
    corrector_steps: int = 1
    draw: Callable[[int], Tensor] | None = None
    alphas: tuple | None = None
    table: tuple | None = None

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

    def prepare(self, coefs: GridCoefficients) -> "PredictorCorrector":
        """The wrapper around the predictor prepared for the grid of ``coefs`` (the loop prepares only the wrapper)."""
        predictor = self.predictor.prepare(coefs)
        return self if predictor is self.predictor else replace(self, predictor=predictor)

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        return self.predictor.init_state(dyn, x, t0), 0, 0

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        pstate, k, i = state
        if self.table is not None:
            eps, scale = self.table[i]
            for _ in range(self.corrector_steps):
                noise = self.draw(k)
                x = torch.add(x, dyn.score(x, t0), alpha=eps).add_(noise, alpha=scale)
                k += 1
        elif self.corrector is not None:
            alpha = self.alphas[i] if self.alphas is not None else langevin_alpha(dyn.sde, t0, t1)
            for _ in range(self.corrector_steps):
                x = self.corrector.correct(dyn, x, t0, alpha, self.draw(k))
                k += 1
        x, _, pstate = self.predictor.step(dyn, x, t0, t1, pstate, dw)
        return x, None, (pstate, k, i + 1)
