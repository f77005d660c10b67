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

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._utils import append_dims
from ..sdes import AffineSDE
from ..sdes.discrete import AbstractChainModel, AbstractChainSDE, ChainPlan
from .base import AbstractFixedGridSolver, CountingScore, Dynamics
from .marginal_rows import GridCoefficients

__all__ = ["Euler", "EulerMaruyama", "TableRule", "ReverseDiffusion", "Ancestral", "ChainStep", "ancestral_table", "ddpm_ancestral_table",
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
class TableRule(AbstractFixedGridSolver):
    r"""A one-step rule with an optional per-step coefficient table (host floats, see ``tabulated``).

    With a table the solver state is the step index; without one the rule evaluates the SDE's
    coefficients at run time (any [`SDE`][sdegen.SDE]) and carries no state.
    """

    table: tuple | None = field(default=None, repr=False)

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        return 0 if self.table is not None else None


@dataclass(frozen=True)
class Euler(TableRule):
    r"""One explicit Euler step of a term $(v, \sigma)$: $x_1 = x_0 + v(x_0, t_0)\,\Delta t + \sigma(t_0)\,\Delta w$.

    The term is a [`ReverseSDE`][sdegen.ReverseSDE]: the reverse-time SDE, $v = f - g^2 s$ and
    $\sigma = g$ ([`EulerMaruyama`][sdegen.solvers.sde_steps.EulerMaruyama]), or its probability
    flow, $v = f - \tfrac12 g^2 s$ and $\sigma = 0$ ([`ODEEuler`][sdegen.solvers.ode_steps.ODEEuler]);
    ``flow`` says which of the two the step integrates. The step reads the term's ``drift`` and
    ``diffusion`` and nothing else, so the two methods share every line.

    For an affine SDE, $f = a(t)x$ and $v = a x + k h s$ with $(a, h)$ = ``sde.ode_coefs(t)``
    ($h = -\tfrac12 g^2$; $k = 2$ for the SDE, 1 for the flow), and `tabulated` precomputes the rows
    $(1 + a\Delta t,\ k h\Delta t,\ \sigma)$ in float64. Order 1; one score evaluation per step
    ($\Delta t = t_1 - t_0 < 0$).
    """

    order: ClassVar[float] = 1.0
    evals_per_step: ClassVar[int] = 1
    #: Integrate the probability-flow ODE (``True``) or the reverse-time SDE (``False``).
    flow: ClassVar[bool] = False

    @classmethod
    def tabulated(cls, sde: AffineSDE, times: Tensor) -> "Euler":
        r"""The same rule for an affine SDE with rows $(1 + a\Delta t,\ k h\Delta t,\ \sigma)$ precomputed in float64
        (fewer kernels per step)."""
        return cls().prepare(GridCoefficients(sde, times))

    def prepare(self, coefs: GridCoefficients) -> "Euler":
        if self.table is not None or not coefs.affine:
            return self  # a non-affine SDE: the drift is evaluated on the fly
        a, h, dt = coefs.a, coefs.h, coefs.dt
        k = 1.0 if self.flow else 2.0
        sigma = [0.0] * coefs.n if self.flow else coefs.g
        return type(self)(tuple((1 + a[i] * dt[i], k * h[i] * dt[i], sigma[i]) for i in range(coefs.n)))

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        if self.table is not None:
            return linear_update(self.table[state], x, dyn.score(x, t0), dw if self.stochastic else None), None, state + 1
        term = dyn.ode if self.flow else dyn.sde_term
        out = x + term.drift(x, t0) * append_dims(t1 - t0, x.ndim)
        if term.probability_flow:
            return out, None, state
        return out + append_dims(term.diffusion(t0), x.ndim) * dw, None, state


@dataclass(frozen=True)
class EulerMaruyama(Euler):
    r"""Euler–Maruyama: [`Euler`][sdegen.solvers.sde_steps.Euler] on the reverse-time SDE.

    $$x_1 = x_0 + [f(x_0, t_0) - g(t_0)^2 s(x_0, t_0)]\,\Delta t + g(t_0)\,\Delta w,
      \qquad \Delta t = t_1 - t_0 < 0,\ \operatorname{Var}\Delta w = |\Delta t|$$

    (Kloeden & Platen 1992, eq. 10.2.2; Song et al. 2021, eq. 6). Strong order 1 here because the
    noise is additive ($g$ depends on $t$ only); weak order 1. One score evaluation per step.
    Works for any [`SDE`][sdegen.SDE]; `tabulated` gives $x_1 = (1 + a\Delta t)\,x_0 - g^2\Delta t\, s + g\,\Delta w$
    for an affine one.
    """

    stochastic: ClassVar[bool] = True
    flow: ClassVar[bool] = False


@dataclass(frozen=True)
class ReverseDiffusion(TableRule):
    r"""The reverse-diffusion predictor, matched to the SDE's own discretization.

    With the forward step $x_{t_0} = x_{t_1} + f_i + G_i z$ from [`SDE.discretize_step`][sdegen.sdes.SDE.discretize_step]
    over $[t_1, t_0]$ (evaluated at the current state), the reverse step is

    $$x_1 = x_0 - f_i + G_i^2\, s(x_0, t_0) + G_i z$$

    (Song et al. 2021, App. E, eq. 47). For an affine SDE $f_i = (r-1)x$, $G_i = q$ are the exact
    kernel's coefficients (VP: DDPM's $\beta_i$; VE: SMLD's $\sigma_i^2 - \sigma_{i-1}^2$); for a
    general SDE it coincides with Euler–Maruyama. Order 1, one score evaluation per step.
    """

    order: ClassVar[float] = 1.0
    stochastic: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 1

    @classmethod
    def tabulated(cls, sde: AffineSDE, times: Tensor) -> "ReverseDiffusion":
        r"""The same rule for an affine SDE with the kernel's $(r, q)$ precomputed in float64:
        $x_1 = (2 - r)\,x_0 + q^2 s + (q/\sqrt{|\Delta t|})\,\Delta w$."""
        return cls().prepare(GridCoefficients(sde, times))

    def prepare(self, coefs: GridCoefficients) -> "ReverseDiffusion":
        if self.table is not None or not coefs.affine:
            return self  # a non-affine SDE: its own discretize_step on the fly
        r, q, dt = coefs.r, coefs.q, coefs.dt
        return type(self)(tuple((2 - r[i], q[i] * q[i], q[i] / math.sqrt(-dt[i])) for i in range(coefs.n)))

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        if self.table is not None:
            return linear_update(self.table[state], x, dyn.score(x, t0), dw), None, state + 1
        f, G = dyn.sde.discretize_step(x, t0, t0 - t1)
        G = append_dims(G, x.ndim)
        z = _unit_noise(dw, t0, t1)
        return x - f + G.square() * dyn.score(x, t0) + G * z, None, state


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
    r"""``(K, 9)`` float64 columns of the plan's step with $\hat x_0$ and $\hat\epsilon$ kept apart (see
    [`ChainStep`][sdegen.solvers.sde_steps.ChainStep]): $m_i$, $s_i$, $\sqrt{\bar\alpha_j}$,
    $\sqrt{1 - \bar\alpha_j - \sigma^2}$, $c$ (the fixed noise multiplier of $\Delta w$), $1/\sqrt{|\Delta t|}$,
    $\log\max(\tilde\beta_{ij}, 10^{-20})$, $\log\beta_{ij}$ and whether the step adds noise."""
    ab = sde.alpha_bar.to("cpu", torch.float64)
    i, j = torch.tensor(plan.steps), torch.tensor(plan.targets)
    ab_i, ab_j = ab[i], ab[j]
    beta_ij = torch.where(ab_j > 0, -torch.expm1(ab_i.log() - ab_j.log()), torch.zeros_like(ab_j))
    post = (1 - ab_j) / (1 - ab_i) * beta_ij
    sigma2 = eta ** 2 * post
    direction = (1 - ab_j - sigma2).clamp_min(0).sqrt()
    c = chain_table(sde, plan, eta, times)[:, 2] if plan.variance in ("posterior", "beta") else torch.zeros_like(ab_i)
    t = times.detach().to("cpu", torch.float64)
    dt = (t[1:] - t[:-1]).abs()
    inv_sqrt_dt = torch.where(dt > 0, dt.clamp_min(1e-300).rsqrt(), torch.zeros_like(dt))
    noisy = torch.ones_like(ab_i) if not plan.noiseless_step_one else (i != 1).to(torch.float64)
    return torch.stack([ab_i.sqrt(), (1 - ab_i).sqrt(), ab_j.sqrt(), direction, c, inv_sqrt_dt,
                        post.clamp_min(1e-20).log(), beta_ij.clamp_min(1e-300).log(), noisy], dim=1)


def _chain_predict(dyn: Dynamics, x: Tensor, t: Tensor):
    """The model's ``(x0, eps, variance output)`` when the sampler's score is an ``AbstractChainModel`` (counted
    as one evaluation, with the sampler's ``model_kwargs``), else ``None``."""
    counted = dyn.score_fn
    if isinstance(counted, CountingScore) and isinstance(counted.score_fn, AbstractChainModel):
        return counted.call_method("chain_predict", x, t)
    return None


@dataclass(frozen=True, eq=False)
class ChainStep(AbstractFixedGridSolver):
    r"""A [`ChainPlan`][sdegen.sdes.discrete.ChainPlan] step with a transform of $\hat x_0$ inside it.

    The model's own $\hat x_0, \hat\epsilon$ (and variance output) come from ``chain_predict`` when the
    score is an [`AbstractChainModel`][sdegen.sdes.discrete.AbstractChainModel] (needed where $m_i = 0$,
    zero terminal SNR, and for learned variances); otherwise from the score $S$ at $t_i$:
    $\hat x_0 = (x + s_i^2 S)/m_i$, $\hat\epsilon = -s_i S$. Then $\tilde x_0 = \phi(\hat x_0)$, with
    $\hat\epsilon$ kept (``diffusers``' DDIM step with ``clip_sample`` and ``use_clipped_model_output=False``)
    or recomputed from $\tilde x_0$ (``plan.eps_from_x0``, DDPM), and
    $x_j = \sqrt{\bar\alpha_j}\,\tilde x_0 + \sqrt{1 - \bar\alpha_j - \sigma^2}\,\hat\epsilon + \sqrt v\,z$,
    $v$ fixed by the plan or the model's (``"learned"``: its output; ``"learned_range"``: the
    interpolation of [`CHAIN_VARIANCES`][sdegen.sdes.discrete.CHAIN_VARIANCES]). First order; one
    evaluation per step. Without a transform it is [`Ancestral`][sdegen.solvers.sde_steps.Ancestral]
    on [`chain_table`][sdegen.solvers.sde_steps.chain_table].

    Args:
        table: ``(K, 9)`` float64 from the plan (``ChainStep.from_plan``).
        x0_transform: $\phi$, ``(B, *D) -> (B, *D)``, or ``None``.
        eps_from_x0: recompute $\hat\epsilon$ from $\tilde x_0$.
        variance: the plan's variance (one of ``CHAIN_VARIANCES``).
    """

    table: Tensor = field(repr=False)
    x0_transform: Any = None
    eps_from_x0: bool = False
    variance: str = "posterior"
    order: ClassVar[float] = 1.0
    evals_per_step: ClassVar[int] = 1

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """False when no step adds noise (DDIM with eta = 0): the loop then draws no Brownian increments.
        A step adds noise when it is ``noisy`` and, for a fixed variance, its coefficient ``c`` is not 0."""
        noisy = self.table[:, 8].ne(0)
        if not self.variance.startswith("learned"):
            noisy &= self.table[:, 4].ne(0)
        return bool(noisy.any())

    @classmethod
    def from_plan(cls, sde: AbstractChainSDE, plan: ChainPlan, eta: float, times: Tensor) -> "ChainStep":
        """The plan's steps on ``times`` with its ``x0_transform``."""
        return cls(_chain_split(sde, plan, eta, times), plan.x0_transform, plan.eps_from_x0, plan.variance)

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        rows = _as_rows(*self.table.unbind(1))
        plain = not (isinstance(dyn.score_fn, CountingScore) and isinstance(dyn.score_fn.score_fn, AbstractChainModel))
        if plain and (self.variance.startswith("learned") or any(r[0] == 0.0 for r in rows)):
            why = "a learned variance" if self.variance.startswith("learned") else "x0 where m = 0 (zero terminal SNR)"
            raise ValueError(f"this chain plan needs the model's own {why}, which a plain score cannot carry; "
                             "use the score function of sdegen.adapters.from_diffusers")
        return 0, rows

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        k, rows = state
        m_i, s_i, m_j, direction, c, inv_sqrt_dt, log_post, log_beta, noisy = rows[k]
        pred = _chain_predict(dyn, x, t0)
        if pred is None:
            score = dyn.score(x, t0)
            x0, eps, var_out = torch.add(x, score, alpha=s_i * s_i).div_(m_i), score * (-s_i), None
        else:
            x0, eps, var_out = pred
        if self.x0_transform is not None:
            x0 = self.x0_transform(x0)
            if self.eps_from_x0:
                eps = torch.add(x, x0, alpha=-m_i).div_(s_i)
        out = torch.add(x0 * m_j, eps, alpha=direction)
        if dw is None or noisy == 0.0:
            return out, None, (k + 1, rows)
        if self.variance == "learned":
            # diffusers' "learned": the extra channels are the variance itself (std = sqrt of them).
            return out.addcmul_(var_out.sqrt(), dw, value=inv_sqrt_dt), None, (k + 1, rows)
        if self.variance == "learned_range":
            frac = (var_out + 1) * 0.5
            std = torch.exp(0.5 * (frac * log_beta + (1 - frac) * log_post))
            return out.addcmul_(std, dw, value=inv_sqrt_dt), None, (k + 1, rows)
        return (out.add_(dw, alpha=c) if c != 0.0 else out), None, (k + 1, rows)


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
    evals_per_step: ClassVar[int] = 1

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """False when every step's noise coefficient is zero (DDIM with eta = 0): the loop then draws
        nothing, so a deterministic chain leaves the generator (or the global RNG) untouched."""
        return bool(self.table[:, 2].ne(0).any())

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        return 0, _as_rows(*self.table.unbind(1))

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        k, rows = state
        return linear_update(rows[k], x, dyn.score(x, t0), dw), None, (k + 1, rows)
