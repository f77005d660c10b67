r"""SDEs that carry a discrete chain: the training steps of a discrete model and the steps its sampler visits.

A model trained on a discrete $\beta$ schedule (DDPM and every ``diffusers`` scheduler) comes with
its chain $\bar\alpha_0 = 1, \bar\alpha_1, \dots, \bar\alpha_N$ and, when it was set up for sampling,
with the chain steps its own sampler visits. An SDE that knows both lets
``sdegen.sample(sde, score_fn, shape, method="ancestral")`` reproduce that sampler without
``steps=``/``eps=``: [`ChainPlan`][sdegen.sdes.discrete.ChainPlan] is that plan, and
[`AbstractChainSDE`][sdegen.sdes.discrete.AbstractChainSDE] is the interface the samplers read
([`DiscreteVPSDE`][sdegen.sdes.discrete.DiscreteVPSDE] below implements it; ``sdegen.adapters.DiscreteVPSDE`` is the same class).

Time map: chain index $i \in \{0, \dots, N\}$ sits at $t_i = iT/N$ (data at $i = 0$).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor

from .affine import AffineSDE

__all__ = ["ChainPlan", "AbstractChainSDE", "AbstractChainModel", "DiscreteVPSDE", "CHAIN_VARIANCES", "LOG_ZERO"]

#: Noise variances of a chain step: ``"posterior"`` $\eta^2\tilde\beta$ (DDPM ``fixed_small``, DDIM),
#: ``"beta"`` $\eta^2\beta$ (DDPM ``fixed_large``), and the model's own (``diffusers``' learned variances,
#: read through [`AbstractChainModel`][sdegen.sdes.discrete.AbstractChainModel]): ``"learned"`` (the
#: model's extra channels are the variance) and ``"learned_range"`` (they interpolate $\log\tilde\beta$ and
#: $\log\beta$: $\log v = \tfrac{1+o}2\log\beta + \tfrac{1-o}2\log\tilde\beta$; Nichol & Dhariwal 2021, eq. 15).
CHAIN_VARIANCES = ("posterior", "beta", "learned", "learned_range")
#: A chain index whose $\bar\alpha$ is zero (zero terminal SNR) is stored as $\log\bar\alpha$ = this value,
#: so $\bar\alpha$, $m$ and every interpolated value are exactly 0 in float64 and no NaN arises.
LOG_ZERO = -1.0e4


@dataclass(frozen=True)
class ChainPlan:
    r"""The steps a discrete sampler takes on a chain, and its noise (immutable).

    Step $k$ evaluates the model at chain index $i_k$ = ``steps[k]`` and lands on chain index
    $j_k$ = ``targets[k]`` $< i_k$ (the next evaluation is at ``steps[k+1]``, which is usually
    $j_k$; ``diffusers``' DDIM with ``timestep_spacing="linspace"`` is an example where it is not).
    With $\hat x_0, \hat\epsilon$ the model's predictions at $i = i_k$ and $j = j_k$, the step is the
    generalised DDIM / DDPM update (Song et al. 2021, "DDIM", eq. 12; Ho et al. 2020, eq. 7)

    $$x_j = \sqrt{\bar\alpha_j}\,\hat x_0 + \sqrt{1 - \bar\alpha_j - \sigma^2}\,\hat\epsilon + \sqrt{v}\,z,
      \qquad \sigma^2 = \eta^2\,\tilde\beta_{ij},\quad
      \tilde\beta_{ij} = \frac{1 - \bar\alpha_j}{1 - \bar\alpha_i}\Big(1 - \frac{\bar\alpha_i}{\bar\alpha_j}\Big),$$

    with noise variance $v = \sigma^2$ (``variance="posterior"``) or $v = \eta^2(1 - \bar\alpha_i/\bar\alpha_j)$
    (``"beta"``), and $v = 0$ on a step from $i = 1$ when ``noiseless_step_one`` (DDPM's ``t > 0`` rule).
    $\eta = 1$ with ``"posterior"`` is DDPM's ancestral step ($\tilde\beta$), $\eta = 0$ is DDIM.

    Args:
        steps: chain indices evaluated, strictly decreasing, each in ``1..N``.
        targets: the chain index each step lands on, ``0 <= targets[k] <= steps[k]``.
        variance: ``"posterior"`` or ``"beta"``.
        eta: $\eta \ge 0$; the default of the ancestral method's ``eta=`` option.
        noiseless_step_one: no noise on a step evaluated at $i = 1$.
        method_options: per method name, option defaults that reproduce the model's own sampler
            with that method (e.g. ``{"dpm_solver": {"grid": (...), "order": 2, ...}}`` for diffusers'
            DPM-Solver++ 2M); ``sdegen.sample`` applies them when no ``steps=`` is given, below the
            options the caller passes.
        x0_transform: applied to $\hat x_0$ *inside* the step, $\hat\epsilon$ staying the model's own
            (``diffusers``' DDIM with ``clip_sample`` and its default ``use_clipped_model_output=False``):
            ``x0_transform(x0) -> x0``, shapes ``(B, *D)``; ``None`` for none.
        eps_from_x0: recompute $\hat\epsilon = (x - m_i\tilde x_0)/s_i$ from the transformed $\tilde x_0$
            (DDPM's step, which uses $\tilde x_0$ and $x$ only); ``False`` keeps the model's $\hat\epsilon$ (DDIM).

    Raises:
        ValueError: empty or non-decreasing steps, targets out of range, unknown variance, eta < 0.
    """

    steps: tuple[int, ...]
    targets: tuple[int, ...]
    variance: str = "posterior"
    eta: float = 1.0
    noiseless_step_one: bool = True
    method_options: Mapping[str, Mapping] = field(default_factory=dict, hash=False)
    x0_transform: Callable | None = field(default=None, hash=False, compare=False)
    eps_from_x0: bool = False

    def __post_init__(self):
        steps, targets = tuple(int(i) for i in self.steps), tuple(int(j) for j in self.targets)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "targets", targets)
        if not steps or len(steps) != len(targets):
            raise ValueError(f"steps and targets must be non-empty and of equal length, got {len(steps)} and "
                             f"{len(targets)}")
        if any(b >= a for a, b in zip(steps, steps[1:])) or steps[-1] < 1:
            raise ValueError(f"steps must be strictly decreasing chain indices >= 1, got {list(steps)}")
        bad = [k for k, (i, j) in enumerate(zip(steps, targets)) if not 0 <= j <= i]
        if bad:
            raise ValueError(f"targets must satisfy 0 <= targets[k] <= steps[k], got targets[{bad[0]}] = "
                             f"{targets[bad[0]]} for steps[{bad[0]}] = {steps[bad[0]]}")
        if self.variance not in CHAIN_VARIANCES:
            raise ValueError(f"variance must be one of {', '.join(map(repr, CHAIN_VARIANCES))}, got {self.variance!r}")
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not math.isfinite(self.eta) \
                or self.eta < 0:
            raise ValueError(f"eta must be a finite float >= 0, got {self.eta!r}")
        object.__setattr__(self, "eta", float(self.eta))
        if not isinstance(self.method_options, Mapping) or not all(
                isinstance(k, str) and isinstance(v, Mapping) for k, v in self.method_options.items()):
            raise TypeError(f"method_options must map method names to option dicts, got {self.method_options!r}")
        if self.x0_transform is not None and not callable(self.x0_transform):
            raise TypeError(f"x0_transform must be callable x0 -> x0, got {type(self.x0_transform).__name__}")
        # Copies (plain dicts, so that plans pickle), not shared with the caller.
        object.__setattr__(self, "method_options", {k: dict(v) for k, v in self.method_options.items()})

    @classmethod
    def full(cls, n: int) -> "ChainPlan":
        """Every step of an ``n``-step chain, ``n -> n-1 -> ... -> 0``: DDPM's ancestral sampler."""
        return cls(tuple(range(n, 0, -1)), tuple(range(n - 1, -1, -1)))

    def times(self, n: int, T: float) -> Tensor:
        r"""The sampler's float64 grid: $t_{i_0}, \dots, t_{i_{K-1}}$ then $t_{j_{K-1}}$, with $t_i = iT/N$."""
        idx = torch.tensor([*self.steps, self.targets[-1]], dtype=torch.float64)
        return idx * (T / n)


class AbstractChainModel(abc.ABC):
    r"""A score function on a chain SDE that can also hand a chain step the model's own predictions.

    A score cannot carry $\hat x_0$ where $m(t) = 0$ (zero terminal SNR: $\nabla\log p_T = -x$ whatever
    the model says), nor a learned variance; a chain step that needs them calls ``chain_predict``
    (one model evaluation, counted like a score call).
    """

    @abc.abstractmethod
    def __call__(self, x: Tensor, t: Tensor, **model_kwargs) -> Tensor:
        """The score, ``(B, *D)``."""

    @abc.abstractmethod
    def chain_predict(self, x: Tensor, t: Tensor, **model_kwargs) -> tuple:
        r"""``(x0_hat, eps_hat, variance_output)`` of one model call at times ``t`` ``(B,)``: two ``(B, *D)``
        tensors and the model's extra variance channels (``(B, *D)``) or ``None``."""


class AbstractChainSDE(AffineSDE):
    r"""An affine SDE whose marginal is exact at the steps of a discrete chain, with the sampler's plan.

    Subclasses give ``alpha_bar`` (``(N + 1,)`` float64, $\bar\alpha_0 = 1$) and ``plan``; the chain
    index $i$ sits at $t_i = iT/N$ and $m(t_i)^2 = \bar\alpha_i$.
    """

    @property
    @abc.abstractmethod
    def alpha_bar(self) -> Tensor:
        r"""``(N + 1,)`` float64 $\bar\alpha_0 = 1, \bar\alpha_1, \dots, \bar\alpha_N$."""

    @property
    @abc.abstractmethod
    def plan(self) -> ChainPlan:
        """The chain steps the model's own sampler visits (default: every step)."""


class DiscreteVPSDE(AbstractChainSDE):
    r"""The VP SDE whose marginal is exact at the steps of a discrete $\beta$ schedule (final class).

    Given $\beta_1, \dots, \beta_N$ (or $\bar\alpha_i = \prod_{j \le i}(1 - \beta_j)$), step $i$ sits at
    $t_i = iT/N$ and $\log\bar\alpha(t)$ is the piecewise-linear interpolant of the knots
    $(t_i, \log\bar\alpha_i)$, $\bar\alpha_0 = 1$. Then

    $$\beta(t) = -\frac{d\log\bar\alpha}{dt} = -\frac{N}{T}\log(1 - \beta_i)\ \text{on}\ (t_{i-1}, t_i],
      \qquad dx = -\tfrac12\beta(t)\,x\,dt + \sqrt{\beta(t)}\,dw,$$

    with $m(t) = \bar\alpha(t)^{1/2}$, $s(t) = (1 - \bar\alpha(t))^{1/2}$: exactly DDPM's
    $q(x_i \mid x_0)$ at every training step (Ho et al. 2020, eq. 4), so the exact one-step kernel
    between neighbouring steps has variance $\beta_i$ and the ancestral sampler on the grid
    $t_i$ is DDPM's. $\beta(t)$ is piecewise constant; at a knot it takes the value of the interval
    below it (the one a reverse step from $t_i$ crosses). Between knots the interpolation in
    $\log\bar\alpha$ is the choice of DPM-Solver's ``NoiseScheduleVP('discrete')`` (Lu et al. 2022,
    App. D), and keeps $\bar\alpha$ monotone for any positive $\beta$ schedule.

    Args:
        betas (Tensor | None): ``(N,)`` values in $(0, 1)$; or give
        alphas_cumprod (Tensor | None): ``(N,)`` decreasing values $\bar\alpha_1 \ge \dots \ge \bar\alpha_N$ in $(0, 1)$.
        T: end time; step $i$ sits at $iT/N$.
        plan: the chain steps the model's own sampler visits
            ([`ChainPlan`][sdegen.sdes.discrete.ChainPlan]); default every step $N \to 0$ (DDPM).
            ``sdegen.sample(sde, score_fn, shape, method="ancestral")`` without ``steps=`` runs it.

    Raises:
        ValueError: neither or both schedules given, or values out of range / not monotone.
    """

    def __init__(self, betas=None, *, alphas_cumprod=None, T: float = 1.0, plan: ChainPlan | None = None):
        super().__init__(T=T)
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("give exactly one of betas= or alphas_cumprod=")
        if betas is not None:
            b = torch.as_tensor(betas).detach().to("cpu", torch.float64).reshape(-1)
            if b.numel() < 1 or not bool(((b > 0) & (b < 1)).all()):
                raise ValueError(f"betas must be a non-empty 1-D schedule with values in (0, 1), "
                                 f"got {b.numel()} values in [{float(b.min()) if b.numel() else 'nan'}, "
                                 f"{float(b.max()) if b.numel() else 'nan'}]")
            log_ab = torch.cumsum(torch.log1p(-b), 0)
        else:
            ab = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).reshape(-1)
            # The last value may be 0 (zero terminal SNR, e.g. diffusers' rescale_betas_zero_snr).
            inside = (ab > 0) & (ab < 1)
            if ab.numel() < 1 or not bool(inside[:-1].all()) or not (0 <= float(ab[-1]) < 1):
                raise ValueError("alphas_cumprod must be a non-empty 1-D tensor with values in (0, 1) "
                                 "(the last may be 0: zero terminal SNR)")
            if ab.numel() > 1 and not bool((ab[1:] <= ab[:-1]).all()):
                raise ValueError("alphas_cumprod must be non-increasing")
            log_ab = ab.log().clamp_min(LOG_ZERO)       # exactly 0 in float64, without -inf in the knots
        self._log_ab = torch.cat([log_ab.new_zeros(1), log_ab])      # knots i = 0..N, log abar_0 = 0
        self._n = log_ab.numel()
        self._knot_cache: dict = {}
        if plan is not None and not isinstance(plan, ChainPlan):
            raise TypeError(f"plan must be an sdegen.sdes.discrete.ChainPlan, got {type(plan).__name__}")
        if plan is not None and plan.steps[0] > self._n:
            raise ValueError(f"plan.steps must lie in 1..{self._n} (the chain's steps), got {plan.steps[0]}")
        self._plan = ChainPlan.full(self._n) if plan is None else plan

    # ------------------------------------------------------------------ schedule
    @property
    def n_steps(self) -> int:
        """$N$, the number of training steps."""
        return self._n

    @property
    def alpha_bar(self) -> Tensor:
        r"""``(N + 1,)`` float64 $\bar\alpha_0 = 1, \bar\alpha_1, \dots, \bar\alpha_N$."""
        return self._log_ab.exp()

    @property
    def plan(self) -> ChainPlan:
        """The chain steps ``sample(..., method="ancestral")`` visits when no ``steps=`` is given."""
        return self._plan

    @property
    def alphas_cumprod(self) -> Tensor:
        r"""``(N,)`` float64 $\bar\alpha_1, \dots, \bar\alpha_N$."""
        return self._log_ab[1:].exp()

    @property
    def betas(self) -> Tensor:
        r"""``(N,)`` float64 $\beta_i = 1 - \bar\alpha_i/\bar\alpha_{i-1}$."""
        return -torch.expm1(self._log_ab[1:] - self._log_ab[:-1])

    def step_times(self) -> Tensor:
        r"""``(N + 1,)`` float64 $t_i = iT/N$, $i = 0 \dots N$."""
        return torch.arange(self._n + 1, dtype=torch.float64) * (self.T / self._n)

    def _knots(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        k = self._knot_cache.get(key)
        if k is None:
            k = self._knot_cache[key] = self._log_ab.to(device=like.device, dtype=like.dtype)
        return k

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        r"""$\log\bar\alpha(t)$, linear between the knots $t_i$. ``(B,) -> (B,)``."""
        L = self._knots(t)
        u = t * (self._n / self.T)
        k = u.floor().clamp(0, self._n - 1)
        frac = u - k
        k = k.long()
        return L[k] + frac * (L[k + 1] - L[k])

    def beta(self, t: Tensor) -> Tensor:
        r"""$\beta(t) = -d\log\bar\alpha/dt$, piecewise constant (left-continuous at the knots). ``(B,)``."""
        L = self._knots(t)
        u = t * (self._n / self.T)
        k = (u.ceil() - 1).clamp(0, self._n - 1).long()
        return (L[k] - L[k + 1]) * (self._n / self.T)

    def drift_coef(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def diffusion(self, t: Tensor) -> Tensor:
        return self.beta(t).sqrt()

    def marginal(self, t) -> tuple[Tensor, Tensor]:
        r"""$m = \bar\alpha(t)^{1/2}$, $s = (1 - \bar\alpha(t))^{1/2}$ (``expm1`` keeps $s$ accurate near 0)."""
        t = self._as_t(t)
        la = self.log_alpha_bar(t)
        return torch.exp(0.5 * la), torch.sqrt(-torch.expm1(la))

    def log_snr(self, t) -> Tensor:
        r"""$\log(\bar\alpha / (1 - \bar\alpha))$."""
        t = self._as_t(t)
        la = self.log_alpha_bar(t)
        return la - torch.log(-torch.expm1(la))

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        r"""Closed-form inverse: $\log\bar\alpha = \log\mathrm{sigmoid}(\lambda)$, then invert the linear pieces.

        Values outside the schedule's range clamp to ``[0, T]``.
        """
        lam = torch.as_tensor(log_snr)
        dtype = lam.dtype if lam.is_floating_point() else torch.get_default_dtype()
        la = torch.nn.functional.logsigmoid(lam.to(torch.float64))
        neg = -self._log_ab.to(la.device)                          # increasing in i
        target = (-la).clamp(float(neg[0]), float(neg[-1]))
        k = (torch.searchsorted(neg, target.reshape(-1).contiguous()) - 1).clamp(0, self._n - 1).reshape(target.shape)
        lo, hi = neg[k], neg[k + 1]
        frac = torch.where(hi > lo, (target - lo) / (hi - lo).clamp_min(1e-300), torch.zeros_like(target))
        return ((k.to(torch.float64) + frac) * (self.T / self._n)).to(dtype)

    def prior_std(self) -> float:
        return 1.0

    def __repr__(self) -> str:
        return f"DiscreteVPSDE(n_steps={self._n}, T={self.T})"
