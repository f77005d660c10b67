r"""Fixed-grid step rules for the reverse-time SDE: Euler–Maruyama, reverse diffusion, ancestral.

Every rule advances forward time *downwards*, $t_0 \to t_1 < t_0$, with the signed step
$\Delta t = t_1 - t_0 < 0$ and a Brownian increment ``dw`` of variance $|\Delta t|$ drawn by
[`integrate_fixed_grid`][sdegen.solvers.base.integrate_fixed_grid]; $z = dw/\sqrt{|\Delta t|}$ is the unit draw.
The reverse-time SDE is $dx = [f(x,t) - g(t)^2 s(x,t)]\,dt + g(t)\,d\bar w$ (Song et al. 2021,
eq. 6), with $s \approx \nabla_x \log p_t$ the score.

Notation map (DDPM, Ho et al. 2020): ``mean_coef`` $m = \sqrt{\bar\alpha}$, ``std`` $s = \sqrt{1-\bar\alpha}$;
for one step $t_1 \to t_0$ of the forward kernel, $r = m_0/m_1 = \sqrt{\alpha_i}$ and $q^2 = \beta_i$.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._utils import append_dims
from ..sdes import AffineSDE
from ..sdes.discrete import AbstractChainSDE, ChainPlan
from .base import AbstractFixedGridSolver, Dynamics

__all__ = ["EulerMaruyama", "ReverseDiffusion", "Ancestral", "ChainStep", "ancestral_table", "ddpm_ancestral_table",
           "chain_table",
           "linear_update"]


def _unit_noise(dw: Tensor, t0: Tensor, t1: Tensor) -> Tensor:
    """$z = dw / \\sqrt{|t_1 - t_0|}$: the unit-variance draw behind the loop's Brownian increment."""
    return dw / append_dims((t0 - t1).abs().sqrt(), dw.ndim)


def _as_rows(*cols: Tensor) -> tuple:
    """Per-step coefficient rows as Python floats: read on the host, no device sync inside the loop."""
    return tuple(zip(*(c.tolist() for c in cols)))


def linear_update(coefs, x: Tensor, score: Tensor, dw: Tensor | None) -> Tensor:
    r"""$a\,x + b\,s + c\,\Delta w$ for Python floats $(a, b, c)$: three fused kernels, any device."""
    a, b, c = coefs
    out = torch.add(x * a, score, alpha=b)
    return out if dw is None else out.add_(dw, alpha=c)


@dataclass(frozen=True)
class EulerMaruyama(AbstractFixedGridSolver):
    r"""Euler–Maruyama on the reverse-time SDE.

    $$x_1 = x_0 + [f(x_0, t_0) - g(t_0)^2 s(x_0, t_0)]\,\Delta t + g(t_0)\,\Delta w,
      \qquad \Delta t = t_1 - t_0 < 0,\ \operatorname{Var}\Delta w = |\Delta t|$$

    (Kloeden & Platen 1992, eq. 10.2.2; Song et al. 2021, eq. 6). Strong order 1 here because the
    noise is additive ($g$ depends on $t$ only); weak order 1. One score evaluation per step.
    Works for any [`SDE`][sdegen.SDE].
    """

    table: tuple | None = field(default=None, repr=False)
    order: ClassVar[float] = 1.0
    stochastic: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 1

    @classmethod
    def tabulated(cls, sde: AffineSDE, times: Tensor) -> "EulerMaruyama":
        r"""The same rule for an affine SDE, $f = a(t)x$, with per-step coefficients precomputed in float64:
        $x_1 = (1 + a\Delta t)\,x_0 - g^2\Delta t\, s + g\,\Delta w$ (fewer kernels per step)."""
        t = times.detach().to("cpu", torch.float64)
        t0, dt = t[:-1], t[1:] - t[:-1]
        g = sde.diffusion(t0)
        return cls(_as_rows(1 + sde.drift_coef(t0) * dt, -g.square() * dt, g))

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        return 0 if self.table is not None else None

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        if self.table is not None:
            return linear_update(self.table[state], x, dyn.score(x, t0), dw), state + 1
        dt = append_dims(t1 - t0, x.ndim)
        g = append_dims(dyn.diffusion(t0), x.ndim)
        return x + dyn.reverse_drift(x, t0) * dt + g * dw, state


@dataclass(frozen=True)
class ReverseDiffusion(AbstractFixedGridSolver):
    r"""The reverse-diffusion predictor, matched to the SDE's own discretization.

    With the forward step $x_{t_0} = x_{t_1} + f_i + G_i z$ from [`SDE.discretize_step`][sdegen.sdes.SDE.discretize_step]
    over $[t_1, t_0]$ (evaluated at the current state), the reverse step is

    $$x_1 = x_0 - f_i + G_i^2\, s(x_0, t_0) + G_i z$$

    (Song et al. 2021, App. E, eq. 47). For an affine SDE $f_i = (r-1)x$, $G_i = q$ are the exact
    kernel's coefficients (VP: DDPM's $\beta_i$; VE: SMLD's $\sigma_i^2 - \sigma_{i-1}^2$); for a
    general SDE it coincides with Euler–Maruyama. Order 1, one score evaluation per step.
    """

    table: tuple | None = field(default=None, repr=False)
    order: ClassVar[float] = 1.0
    stochastic: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 1

    @classmethod
    def tabulated(cls, sde: AffineSDE, times: Tensor) -> "ReverseDiffusion":
        r"""The same rule for an affine SDE with the kernel's $(r, q)$ precomputed in float64:
        $x_1 = (2 - r)\,x_0 + q^2 s + (q/\sqrt{|\Delta t|})\,\Delta w$."""
        t = times.detach().to("cpu", torch.float64)
        r, q = sde.transition(t[1:], t[:-1])
        return cls(_as_rows(2 - r, q.square(), q / (t[:-1] - t[1:]).sqrt()))

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        return 0 if self.table is not None else None

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        if self.table is not None:
            return linear_update(self.table[state], x, dyn.score(x, t0), dw), state + 1
        f, G = dyn.sde.discretize_step(x, t0, t0 - t1)
        G = append_dims(G, x.ndim)
        z = _unit_noise(dw, t0, t1)
        return x - f + G.square() * dyn.score(x, t0) + G * z, state


def _step_coefficients(r: Tensor, q2: Tensor, var: Tensor, times: Tensor) -> Tensor:
    """Columns ``(1/r, q^2/r, sqrt(v / |dt|))`` so a step is ``a x + b score + c dw`` (float64)."""
    dt = (times[1:] - times[:-1]).abs()
    return torch.stack([1 / r, q2 / r, (var / dt).sqrt()], dim=1)


def ancestral_table(sde: AffineSDE, times: Tensor) -> Tensor:
    r"""Per-step coefficients of the ancestral step on a decreasing grid: ``(n, 3)`` float64.

    For step $k$ from $t_0 = $ ``times[k]`` to $t_1 = $ ``times[k+1]``: the forward kernel
    $x_{t_0} \mid x_{t_1} \sim \mathcal N(r x_{t_1}, q^2 I)$ ([`AffineSDE.transition`][sdegen.adapters.DiscreteVPSDE.transition]) and the
    posterior variance $v = s_1^2 q^2 / s_0^2$ of $q(x_{t_1} \mid x_{t_0}, x_0)$, with $s_j$ the marginal
    std at $t_j$. Columns: $(1/r,\ q^2/r,\ \sqrt{v/|\Delta t|})$, the multipliers of $x$, the score
    and the Brownian increment (computed in float64 so that $dw/\sqrt{|\Delta t|}$ loses nothing).
    """
    t = times.detach().to("cpu", torch.float64)
    t0, t1 = t[:-1], t[1:]
    r, q = sde.transition(t1, t0)
    _, s0 = sde.marginal(t0)
    _, s1 = sde.marginal(t1)
    q2 = q.square()
    return _step_coefficients(r, q2, s1.square() * q2 / s0.square(), t)


def ddpm_ancestral_table(alphas_cumprod: Tensor, times: Tensor) -> Tensor:
    r"""The ancestral coefficients of the DDPM chain on the grid $t_i = iT/N$, in the sampler's step order.

    ``alphas_cumprod`` holds $\bar\alpha_1, \dots, \bar\alpha_N$ (or $\bar\alpha_0 = 1, \dots, \bar\alpha_N$);
    ``times`` the decreasing grid $t_N, \dots, t_0$. Step $k$ goes from $i = N - k$ to $i - 1$:
    $\alpha_i = \bar\alpha_i/\bar\alpha_{i-1}$, $r = \sqrt{\alpha_i}$, $q^2 = \beta_i = 1 - \alpha_i$,
    $v = \tilde\beta_i = \beta_i (1 - \bar\alpha_{i-1})/(1 - \bar\alpha_i)$ (Ho et al. 2020, eq. 7), so $v = 0$
    on the last step. Same columns as [`ancestral_table`][sdegen.solvers.sde_steps.ancestral_table]; ``(N, 3)`` float64.
    """
    ab = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).reshape(-1)
    if ab[0] != 1.0:
        ab = torch.cat([ab.new_ones(1), ab])
    prev, cur = ab[:-1].flip(0), ab[1:].flip(0)     # \bar\alpha_{i-1}, \bar\alpha_i for i = N..1
    beta = -torch.expm1(torch.log(cur) - torch.log(prev))     # 1 - alpha_i without cancellation
    var = beta * (1 - prev) / (1 - cur)
    return _step_coefficients((cur / prev).sqrt(), beta, var, times.detach().to("cpu", torch.float64))


def chain_table(sde: AbstractChainSDE, plan: ChainPlan, eta: float, times: Tensor) -> Tensor:
    r"""Per-step coefficients of a [`ChainPlan`][sdegen.sdes.discrete.ChainPlan] on its chain: ``(K, 3)`` float64.

    With Tweedie's $\hat x_0 = (x + s_i^2 S)/m_i$ and $\hat\epsilon = -s_i S$ ($S$ the score at $t_i$,
    $m_i = \sqrt{\bar\alpha_i}$, $s_i = \sqrt{1 - \bar\alpha_i}$) the plan's step
    $x_j = \sqrt{\bar\alpha_j}\hat x_0 + \sqrt{1 - \bar\alpha_j - \sigma^2}\,\hat\epsilon + \sqrt v\,z$ is
    $a x + b S + c\,\Delta w$ with

    $$a = \frac{\sqrt{\bar\alpha_j}}{m_i},\quad b = \frac{\sqrt{\bar\alpha_j}\,s_i^2}{m_i} - \sqrt{1 - \bar\alpha_j - \sigma^2}\,s_i,
      \quad c = \sqrt{v / |\Delta t|}$$

    ($c = 0$ where $v = 0$; $\Delta t$ is the loop's step on ``times``, whose increment is $\sqrt{|\Delta t|}\,z$).
    $\sigma^2 = \eta^2\tilde\beta_{ij}$ and $v$ as in [`ChainPlan`][sdegen.sdes.discrete.ChainPlan].
    With $\eta = 1$, ``"posterior"`` and $j = i - 1$ this is [`ddpm_ancestral_table`][sdegen.solvers.sde_steps.ddpm_ancestral_table]'s step.
    """
    ab = sde.alpha_bar.to("cpu", torch.float64)
    i = torch.tensor(plan.steps)
    j = torch.tensor(plan.targets)
    ab_i, ab_j = ab[i], ab[j]
    # 1 - abar_i / abar_j without cancellation; zero where the step lands on its own level (j = i).
    beta_ij = -torch.expm1(ab_i.log() - ab_j.log())
    post = (1 - ab_j) / (1 - ab_i) * beta_ij
    sigma2 = eta ** 2 * post
    v = sigma2 if plan.variance == "posterior" else eta ** 2 * beta_ij
    if plan.noiseless_step_one:
        v = torch.where(i == 1, torch.zeros_like(v), v)
    m_i, s_i = ab_i.sqrt(), (1 - ab_i).sqrt()
    a = ab_j.sqrt() / m_i
    b = ab_j.sqrt() * s_i.square() / m_i - (1 - ab_j - sigma2).clamp_min(0).sqrt() * s_i
    t = times.detach().to("cpu", torch.float64)
    dt = (t[1:] - t[:-1]).abs()
    c = torch.where(v > 0, (v / torch.where(dt > 0, dt, torch.ones_like(dt))).sqrt(), torch.zeros_like(v))
    return torch.stack([a, b, c], dim=1)


def _chain_split(sde: AbstractChainSDE, plan: ChainPlan, eta: float, times: Tensor) -> Tensor:
    r"""``(K, 5)`` float64 columns $(1/m_i,\ s_i^2,\ \sqrt{\bar\alpha_j},\ \sqrt{1 - \bar\alpha_j - \sigma^2}\,s_i,\ c)$:
    the plan's step with $\hat x_0$ and $\hat\epsilon$ kept apart (see [`ChainStep`][sdegen.solvers.sde_steps.ChainStep])."""
    ab = sde.alpha_bar.to("cpu", torch.float64)
    i, j = torch.tensor(plan.steps), torch.tensor(plan.targets)
    ab_i, ab_j = ab[i], ab[j]
    beta_ij = -torch.expm1(ab_i.log() - ab_j.log())
    sigma2 = eta ** 2 * (1 - ab_j) / (1 - ab_i) * beta_ij
    s2_i = 1 - ab_i
    direction = (1 - ab_j - sigma2).clamp_min(0).sqrt() * s2_i.sqrt()
    c = chain_table(sde, plan, eta, times)[:, 2]
    return torch.stack([ab_i.rsqrt(), s2_i, ab_j.sqrt(), direction, c], dim=1)


@dataclass(frozen=True, eq=False)
class ChainStep(AbstractFixedGridSolver):
    r"""A [`ChainPlan`][sdegen.sdes.discrete.ChainPlan] step with a transform of $\hat x_0$ inside it.

    With $S$ the score at $t_i$: $\hat x_0 = \phi((x + s_i^2 S)/m_i)$ and $\hat\epsilon = -s_i S$ (the
    model's own, *not* recomputed from $\phi(\hat x_0)$), then
    $x_j = \sqrt{\bar\alpha_j}\,\hat x_0 + \sqrt{1 - \bar\alpha_j - \sigma^2}\,\hat\epsilon + \sqrt v\,z$
    (``diffusers``' DDIM step with ``clip_sample`` and ``use_clipped_model_output=False``). First order;
    one score evaluation per step. Without a transform it is [`Ancestral`][sdegen.solvers.sde_steps.Ancestral]
    on [`chain_table`][sdegen.solvers.sde_steps.chain_table].

    Args:
        table: ``(K, 5)`` float64 from the plan (``ChainStep.from_plan``).
        x0_transform: $\phi$, ``(B, *D) -> (B, *D)``.
    """

    table: Tensor = field(repr=False)
    x0_transform: Any = None
    order: ClassVar[float] = 1.0
    stochastic: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 1

    @classmethod
    def from_plan(cls, sde: AbstractChainSDE, plan: ChainPlan, eta: float, times: Tensor) -> "ChainStep":
        """The plan's steps on ``times`` with its ``x0_transform``."""
        return cls(_chain_split(sde, plan, eta, times), plan.x0_transform)

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        return 0, _as_rows(*self.table.unbind(1))

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        k, rows = state
        inv_m, s2, m_j, direction, c = rows[k]
        score = dyn.score(x, t0)
        x0 = torch.add(x, score, alpha=s2).mul_(inv_m)
        if self.x0_transform is not None:
            x0 = self.x0_transform(x0)
        out = torch.add(x0 * m_j, score, alpha=-direction)     # eps_hat = -s_i S, so direction * eps = -d' S
        if dw is not None and c != 0.0:
            out = out.add_(dw, alpha=c)
        return out, (k + 1, rows)


@dataclass(frozen=True, eq=False)
class Ancestral(AbstractFixedGridSolver):
    r"""Ancestral sampling: draw from the Gaussian posterior $q(x_{t_1} \mid x_{t_0}, \hat x_0)$.

    With $\hat x_0 = (x_0 + s_0^2 s(x_0, t_0))/m_0$ (Tweedie) plugged into the exact posterior of the
    SDE's kernel, the mean simplifies to

    $$x_1 = \frac{x_0 + q^2\, s(x_0, t_0)}{r} + \sqrt{v}\, z, \qquad v = \frac{s_1^2 q^2}{s_0^2},$$

    where $x_{t_0} \mid x_{t_1} \sim \mathcal N(r x_{t_1}, q^2 I)$. VP with DDPM's $\bar\alpha_i$: this is
    Ho et al. 2020, Alg. 2 with $\sigma_i^2 = \tilde\beta_i$ (mean $(x + \beta_i s)/\sqrt{\alpha_i}$); VE
    ($r = 1$, $q^2 = s_0^2 - s_1^2$): SMLD's ancestral step (Song et al. 2021, App. F, eq. 47).
    First order; one score evaluation per step.

    Args:
        table: ``(n, 3)`` float64 per-step coefficients from [`ancestral_table`][sdegen.solvers.sde_steps.ancestral_table] or
            [`ddpm_ancestral_table`][sdegen.solvers.sde_steps.ddpm_ancestral_table], for the grid the solver runs on (the step index is the
            solver state).
    """

    table: Tensor = field(repr=False)
    order: ClassVar[float] = 1.0
    stochastic: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 1

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        return 0, _as_rows(*self.table.unbind(1))

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        k, rows = state
        return linear_update(rows[k], x, dyn.score(x, t0), dw), (k + 1, rows)
