r"""The DDPM chain as the discretized VP SDE: schedules, forward jumps, posterior, samplers, score view, loss.

Its bound is in [`sdegen.vlb`][sdegen.vlb]; its samplers run in the one loop (``sdegen.sample``).

The forward chain (Ho et al. 2020, eq. 2 and 4) with $\alpha_i = 1 - \beta_i$,
$\bar\alpha_i = \prod_{j \le i} \alpha_j$ is

$$q(x_i \mid x_{i-1}) = \mathcal N(\sqrt{\alpha_i}\,x_{i-1},\ \beta_i I), \qquad
  q(x_i \mid x_0) = \mathcal N(\sqrt{\bar\alpha_i}\,x_0,\ (1-\bar\alpha_i) I).$$

**Steps and time.** Integer steps are $i = 1, \dots, N$ (step 0 is the data). Every tensor of
per-step coefficients (``betas``, ``alphas``, ``alphas_cumprod``) is indexed ``0 .. N-1`` for steps
``1 .. N``; [`DDPM.alpha_bar`][sdegen.ddpm.DDPM.alpha_bar] has $N+1$ entries with $\bar\alpha_0 = 1$ so that
``alpha_bar[i]`` is $\bar\alpha_i$. The map between step and forward time used by every sampler and
adapter is $t_i = i\,T/N$ and back $i = \mathrm{round}(t N / T)$.

**The VP SDE.** ``VPSDE(beta_min, beta_max, T).discretize(N)`` is the chain with
$\beta_i = \bar\beta_i\,T/N$, $\bar\beta_i = \beta_\min + \tfrac{i-1}{N-1}(\beta_\max - \beta_\min)$
(Song et al. 2021, App. B; $\beta_\min = 0.1$, $\beta_\max = 20$, $N = 1000$ gives Ho et al.'s
$10^{-4} \dots 0.02$). Then $\log\bar\alpha_i = \sum_{j\le i}\log(1-\beta_j)$ differs from the
SDE's $\log m(t_i)^2 = -\int_0^{t_i}\beta$ by $O(1/N)$: the chain is the SDE up to a first-order
discretization error, and with the same $\beta_i$ the DDPM ancestral sampler is exactly
``sdegen.sample(vp, ddpm.score_fn(eps_model), method="ancestral", steps=N)``.

Notation map: ``alpha_bar`` $=\bar\alpha$ (the SDE's ``mean_coef``$^2$), ``sigma2`` $= \sigma_i^2$
(the reverse-step variance), ``snr`` $= \bar\alpha/(1-\bar\alpha)$ (the SDE's $e^{\log\mathrm{SNR}}$).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ._utils import (append_dims, as_time, check_floating, check_positive, check_shaped_like, check_time_range,
                     is_traceable_device)
from .sampling import sample
from .sdes import VPSDE
from .sdes.base import _check_shape
from .sdes.discrete import ChainPlan, DiscreteVPSDE
from .vlb import VLBResult, chain_simple_loss, chain_vlb, chain_vlb_term

__all__ = ["DDPM", "VARIANCES"]

#: Reverse-step variances accepted by [`DDPM`][sdegen.ddpm.DDPM].
VARIANCES = ("posterior", "beta")

EpsModel = Callable[..., Tensor]


# ---------------------------------------------------------------------- the chain
class DDPM:
    r"""A DDPM forward chain $\beta_1, \dots, \beta_N$ and everything computed from it (final, immutable).

    Args:
        betas (Tensor): ``(N,)`` noise levels $\beta_i \in (0, 1)$ for steps $i = 1, \dots, N$ (any float
            sequence; stored as float64).
        T: the forward time of step $N$; step $i$ is at $t_i = iT/N$.
        variance: the reverse-step variance $\sigma_i^2$: ``"posterior"`` (default)
            $\tilde\beta_i = \beta_i(1-\bar\alpha_{i-1})/(1-\bar\alpha_i)$, so the last step
            $i = 1$ adds no noise, or ``"beta"`` $\beta_i$ (Ho et al. 2020, Sec. 3.2: the lower and
            upper bounds on the optimal isotropic variance).

    Raises:
        ValueError: ``betas`` empty, not 1-D, not finite or outside $(0, 1)$; unknown ``variance``.

    Example::

        ddpm = sdegen.VPSDE(0.1, 20).discretize(1000)     # == DDPM.linear(1000, 1e-4, 0.02)
        x = ddpm.sample(eps_model, (16, 2), generator=torch.Generator().manual_seed(0))
    """

    __slots__ = ("_betas", "_T", "_variance", "_tab", "_cache")

    def __init_subclass__(cls, **kwargs):
        raise TypeError("DDPM is final: wrap it instead of subclassing")

    def __init__(self, betas, *, T: float = 1.0, variance: str = "posterior"):
        b = torch.as_tensor(betas).detach().to(device="cpu", dtype=torch.float64).clone()
        if b.ndim != 1 or b.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(b.shape)}")
        if not torch.isfinite(b).all() or not ((b > 0) & (b < 1)).all():
            bad = int(torch.nonzero(~(torch.isfinite(b) & (b > 0) & (b < 1)))[0])
            raise ValueError(f"betas must lie in (0, 1), got betas[{bad}] = {float(b[bad])!r} (step {bad + 1})")
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {', '.join(map(repr, VARIANCES))}, got {variance!r}")
        object.__setattr__(self, "_betas", b)
        object.__setattr__(self, "_T", check_positive(T, "T"))
        object.__setattr__(self, "_variance", variance)
        object.__setattr__(self, "_tab", self._build_tables(b, variance))
        object.__setattr__(self, "_cache", {})

    def __setattr__(self, name, value):
        raise AttributeError(f"DDPM is immutable: cannot set {name!r}; build a new DDPM instead")

    def __reduce__(self):
        # copy/deepcopy/pickle rebuild through the constructor (the default slot-state path would setattr).
        return (_rebuild, (self._betas.clone(), self._T, self._variance))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, n_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02, *, T: float = 1.0,
               variance: str = "posterior") -> "DDPM":
        r"""Ho et al.'s linear schedule $\beta_i = \beta_\text{start} + \tfrac{i-1}{N-1}(\beta_\text{end} - \beta_\text{start})$."""
        n = _check_steps(n_steps, "n_steps")
        check_positive(beta_start, "beta_start")
        check_positive(beta_end, "beta_end")
        return cls(torch.linspace(beta_start, beta_end, n, dtype=torch.float64), T=T, variance=variance)

    @classmethod
    def cosine(cls, n_steps: int, s: float = 0.008, *, max_beta: float = 0.999, T: float = 1.0,
               variance: str = "posterior") -> "DDPM":
        r"""The cosine schedule $\bar\alpha_i = f(i)/f(0)$, $f(i) = \cos^2\!\big(\tfrac{i/N + s}{1+s}\tfrac\pi2\big)$,
        with $\beta_i = \min(1 - \bar\alpha_i/\bar\alpha_{i-1}, \beta_\max)$ (Nichol & Dhariwal 2021, eq. 17)."""
        n = _check_steps(n_steps, "n_steps")
        s = check_positive(s, "s", allow_zero=True)
        if not 0 < max_beta < 1:
            raise ValueError(f"max_beta must lie in (0, 1), got {max_beta!r}")
        u = torch.arange(n + 1, dtype=torch.float64) / n
        f = torch.cos((u + s) / (1 + s) * math.pi / 2).square()
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        return cls(betas, T=T, variance=variance)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, *, T: float = 1.0, variance: str = "posterior") -> "DDPM":
        r"""The chain with given $\bar\alpha_1 > \dots > \bar\alpha_N$: $\beta_i = 1 - \bar\alpha_i/\bar\alpha_{i-1}$, $\bar\alpha_0 = 1$.

        With $\bar\alpha_i = m(t_i)^2$ of an affine SDE this is the chain whose marginals equal the
        SDE's at every $t_i$ (no $O(1/N)$ gap), e.g. for comparing DDIM with the probability-flow ODE.
        """
        ab = torch.as_tensor(alphas_cumprod).detach().to(device="cpu", dtype=torch.float64)
        if ab.ndim != 1 or ab.numel() < 1:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D sequence, got shape {tuple(ab.shape)}")
        prev = torch.cat([ab.new_ones(1), ab[:-1]])
        return cls(1 - ab / prev, T=T, variance=variance)

    @classmethod
    def from_vp(cls, vp: VPSDE, n_steps: int, *, variance: str = "posterior") -> "DDPM":
        r"""The DDPM that ``vp`` becomes with ``n_steps`` steps: $\beta_i = \bar\beta_i T/N$ with
        $\bar\beta_i = \beta_\min + \tfrac{i-1}{N-1}(\beta_\max - \beta_\min)$, $i = 1, \dots, N$
        (Song et al. 2021, App. B), and the same ``T``.

        Raises:
            TypeError: ``vp`` is not a [`VPSDE`][sdegen.VPSDE].
            ValueError: some $\beta_i \ge 1$, i.e. ``n_steps <= beta_max * T`` (too few steps).
        """
        if not isinstance(vp, VPSDE):
            raise TypeError(f"vp must be an sdegen.VPSDE, got {type(vp).__name__}")
        n = _check_steps(n_steps, "n_steps")
        # linspace of the scaled end points (not beta-bar scaled afterwards): the same rounding as
        # DDPM.linear, so VPSDE(0.1, 20).discretize(1000) is bitwise DDPM.linear(1000, 1e-4, 0.02).
        betas = torch.linspace(vp.beta_min * vp.T / n, vp.beta_max * vp.T / n, n, dtype=torch.float64)
        if float(betas.max()) >= 1:
            raise ValueError(f"n_steps must exceed beta_max * T = {vp.beta_max * vp.T:g} so that every beta_i < 1, "
                             f"got n_steps={n} (largest beta_i = {float(betas.max()):g})")
        return cls(betas, T=vp.T, variance=variance)

    # ------------------------------------------------------------------ schedule
    @staticmethod
    def _build_tables(b: Tensor, variance: str) -> dict[str, Tensor]:
        """Float64 coefficient tables of length N+1, indexed by step ``i = 0..N`` (row 0 is the data)."""
        one = b.new_ones(1)
        zero = b.new_zeros(1)
        log_ab = torch.cat([zero, torch.cumsum(torch.log1p(-b), 0)])
        ab = log_ab.exp()
        one_m_ab = -torch.expm1(log_ab)                 # 1 - abar without cancellation near abar = 1
        beta = torch.cat([zero, b])
        alpha = torch.cat([one, 1 - b])
        prev_one_m = torch.cat([zero, one_m_ab[:-1]])    # 1 - abar_{i-1}
        prev_ab = torch.cat([one, ab[:-1]])
        safe = torch.where(one_m_ab > 0, one_m_ab, one)  # row 0 placeholders only
        post_var = beta * prev_one_m / safe
        tab = {
            "alpha_bar": ab,
            "sqrt_ab": ab.sqrt(),
            "sqrt_1mab": one_m_ab.sqrt(),
            "neg_inv_sqrt_1mab": -1 / safe.sqrt(),       # the score of eps: -1 / sqrt(1 - abar_i) (row 0 unused)
            "beta": beta,
            "alpha": alpha,
            "inv_sqrt_alpha": alpha.rsqrt(),
            "eps_coef": beta / safe.sqrt(),              # beta_i / sqrt(1 - abar_i)
            "post_var": post_var,
            "post_c0": prev_ab.sqrt() * beta / safe,     # coefficient of x_0 in the posterior mean
            "post_ct": alpha.sqrt() * prev_one_m / safe,  # coefficient of x_i
            "snr": torch.where(one_m_ab > 0, ab / safe, torch.full_like(ab, math.inf)),
        }
        tab["sigma2"] = post_var if variance == "posterior" else beta
        return tab

    @property
    def n_steps(self) -> int:
        """N, the number of steps."""
        return self._betas.numel()

    def __len__(self) -> int:
        return self.n_steps

    @property
    def T(self) -> float:
        """The forward time of step N."""
        return self._T

    @property
    def variance(self) -> str:
        """``"posterior"`` or ``"beta"``: the reverse-step variance."""
        return self._variance

    @property
    def betas(self) -> Tensor:
        r"""$\beta_i$, float64 ``(N,)``; entry ``k`` is step $i = k+1$."""
        return self._betas.clone()

    @property
    def alphas(self) -> Tensor:
        r"""$\alpha_i = 1 - \beta_i$, float64 ``(N,)``; entry ``k`` is step $i = k+1$."""
        return self._tab["alpha"][1:].clone()

    @property
    def alphas_cumprod(self) -> Tensor:
        r"""$\bar\alpha_i = \prod_{j\le i}\alpha_j$, float64 ``(N,)``; entry ``k`` is step $i = k+1$."""
        return self._tab["alpha_bar"][1:].clone()

    @property
    def alpha_bar(self) -> Tensor:
        r"""$\bar\alpha_i$ for $i = 0, \dots, N$ with $\bar\alpha_0 = 1$, float64 ``(N+1,)``: ``alpha_bar[i]`` is step $i$."""
        return self._tab["alpha_bar"].clone()

    @property
    def posterior_variance(self) -> Tensor:
        r"""$\tilde\beta_i = \beta_i(1-\bar\alpha_{i-1})/(1-\bar\alpha_i)$, float64 ``(N,)`` (entry 0 is $\tilde\beta_1 = 0$)."""
        return self._tab["post_var"][1:].clone()

    def snr(self, i) -> Tensor:
        r"""$\mathrm{SNR}_i = \bar\alpha_i / (1 - \bar\alpha_i)$ for steps ``i`` in ``0..N`` ($\mathrm{SNR}_0 = \infty$).

        Args:
            i (int | Tensor): an int or an integer tensor of steps. Returns float64 of the same shape (CPU for an
                int, else ``i``'s device).
        """
        ii = _as_steps(i, 0, self.n_steps, "i")
        return self._tab["snr"].to(ii.device)[ii]

    def step_to_time(self, i) -> Tensor:
        r"""$t_i = iT/N$ (float64, ``i``'s shape)."""
        ii = _as_steps(i, 0, self.n_steps, "i")
        return ii.to(torch.float64) * (self.T / self.n_steps)

    def time_to_step(self, t: Tensor) -> Tensor:
        r"""$i = \mathrm{round}(tN/T)$ clamped to $[1, N]$ (long, ``t``'s shape and device).

        Times below $T/(2N)$ map to step 1: the chain has no model step at $i = 0$.
        """
        return (torch.as_tensor(t) * (self.n_steps / self._T)).round_().clamp_(1, self.n_steps).long()

    def _coef(self, name: str, i: Tensor | int, like: Tensor) -> Tensor:
        """Table ``name`` at steps ``i`` on ``like``'s device and dtype (cached per device/dtype)."""
        key = (like.device, like.dtype)
        tabs = self._cache.get(key)
        if tabs is None:
            tabs = {k: v.to(device=like.device, dtype=like.dtype) for k, v in self._tab.items()}
            self._cache[key] = tabs
        return tabs[name][i]

    def _steps(self, i, x: Tensor, lo: int = 1) -> Tensor:
        """Steps as a ``(B,)`` long tensor on ``x``'s device, checked to lie in ``lo..N``."""
        B = x.shape[0]
        ii = _as_steps(i, lo, self.n_steps, "i", device=x.device)
        if ii.ndim == 0 or (ii.ndim == 1 and ii.shape[0] == 1):
            ii = ii.reshape(1).expand(B)
        if ii.shape != (B,):
            raise ValueError(f"i must be an int or have shape ({B},), got {tuple(ii.shape)}")
        return ii

    # ------------------------------------------------------------------ forward and posterior
    def q_sample(self, x0: Tensor, i, noise: Tensor) -> Tensor:
        r"""The forward jump $x_i = \sqrt{\bar\alpha_i}\,x_0 + \sqrt{1-\bar\alpha_i}\,\epsilon$ (Ho et al. 2020, eq. 4).

        Args:
            x0: ``(B, *D)`` data.
            i (int | Tensor): steps in ``0..N``, an int or ``(B,)`` integer tensor.
            noise: ``(B, *D)`` standard normal draw $\epsilon$.
        """
        check_floating(x0, "x0")
        check_shaped_like(noise, x0, "noise")
        ii = self._steps(i, x0, lo=0)
        a = append_dims(self._coef("sqrt_ab", ii, x0), x0.ndim)
        s = append_dims(self._coef("sqrt_1mab", ii, x0), x0.ndim)
        return a * x0 + s * noise

    def q_posterior(self, x0: Tensor, x_i: Tensor, i) -> tuple[Tensor, Tensor]:
        r"""The forward posterior $q(x_{i-1} \mid x_i, x_0) = \mathcal N(\tilde\mu_i, \tilde\beta_i I)$ (Ho et al. 2020, eq. 6–7).

        $$\tilde\mu_i = \frac{\sqrt{\bar\alpha_{i-1}}\beta_i}{1-\bar\alpha_i}x_0
          + \frac{\sqrt{\alpha_i}(1-\bar\alpha_{i-1})}{1-\bar\alpha_i}x_i, \qquad
          \tilde\beta_i = \frac{1-\bar\alpha_{i-1}}{1-\bar\alpha_i}\beta_i.$$

        Args:
            x0: ``(B, *D)`` data.
            x_i: ``(B, *D)``, the state at step ``i``.
            i (int | Tensor): steps in ``1..N``, an int or ``(B,)`` integer tensor.

        Returns:
            ``(mean, var)``: mean ``(B, *D)``, variance ``(B,)`` (broadcast with ``append_dims``).
        """
        check_floating(x0, "x0")
        check_shaped_like(x_i, x0, "x_i")
        ii = self._steps(i, x0)
        c0 = append_dims(self._coef("post_c0", ii, x0), x0.ndim)
        ct = append_dims(self._coef("post_ct", ii, x0), x0.ndim)
        return c0 * x0 + ct * x_i, self._coef("post_var", ii, x0)

    # ------------------------------------------------------------------ the reverse model
    def _eps(self, eps_model: EpsModel, x: Tensor, ii: Tensor, kwargs: dict | None = None) -> Tensor:
        out = eps_model(x, ii, **(kwargs or {}))
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise ValueError(f"eps_model(x, i) must return a tensor shaped like x {tuple(x.shape)}, got "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        if out.dtype != x.dtype:
            # Results keep the state's dtype or the call fails: a float64 output would silently turn
            # a float32 chain into float64 (and an int/complex one is not a noise prediction).
            raise TypeError(f"eps_model(x, i) must return the dtype of x ({x.dtype}), got {out.dtype}; "
                            f"cast the model's output (or run the chain in {out.dtype})")
        return out

    def _mean_from_eps(self, x: Tensor, ii, eps_hat: Tensor) -> Tensor:
        r"""$\mu_\theta = (x_i - \beta_i/\sqrt{1-\bar\alpha_i}\,\hat\epsilon)/\sqrt{\alpha_i}$."""
        c = append_dims(self._coef("eps_coef", ii, x), x.ndim)
        r = append_dims(self._coef("inv_sqrt_alpha", ii, x), x.ndim)
        return r * (x - c * eps_hat)

    def x0_from_eps(self, x_i: Tensor, i, eps_hat: Tensor) -> Tensor:
        r"""$\hat x_0 = (x_i - \sqrt{1-\bar\alpha_i}\,\hat\epsilon)/\sqrt{\bar\alpha_i}$, the inverse of [`q_sample`][sdegen.ddpm.DDPM.q_sample]."""
        ii = self._steps(i, x_i, lo=0)
        a = append_dims(self._coef("sqrt_ab", ii, x_i), x_i.ndim)
        s = append_dims(self._coef("sqrt_1mab", ii, x_i), x_i.ndim)
        return (x_i - s * eps_hat) / a

    def p_mean_variance(self, eps_model: EpsModel, x_i: Tensor, i, *, model_kwargs: dict | None = None
                        ) -> tuple[Tensor, Tensor]:
        r"""The reverse step $p_\theta(x_{i-1} \mid x_i) = \mathcal N(\mu_\theta(x_i, i), \sigma_i^2 I)$ (Ho et al. 2020, eq. 11).

        $\mu_\theta = \frac{1}{\sqrt{\alpha_i}}\big(x_i - \frac{\beta_i}{\sqrt{1-\bar\alpha_i}}\epsilon_\theta(x_i, i)\big)$,
        which is $\tilde\mu_i(\hat x_0, x_i)$ with the Tweedie estimate $\hat x_0$; $\sigma_i^2$ is
        ``variance`` ($\tilde\beta_i$ or $\beta_i$).

        Args:
            eps_model: ``eps_model(x, i, **model_kwargs)`` with ``i`` a ``(B,)`` long tensor.
            x_i: ``(B, *D)``.
            i (int | Tensor): steps in ``1..N``.

        Returns:
            ``(mean, var)``: ``(B, *D)`` and ``(B,)``.
        """
        check_floating(x_i, "x_i")
        ii = self._steps(i, x_i)
        eps_hat = self._eps(eps_model, x_i, ii, model_kwargs)
        return self._mean_from_eps(x_i, ii, eps_hat), self._coef("sigma2", ii, x_i)

    # ------------------------------------------------------------------ sampling
    def sample(self, eps_model: EpsModel, shape, *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None,
               x_T: Tensor | None = None, progress: bool = False, model_kwargs: dict | None = None) -> Tensor:
        r"""Ancestral sampling (Ho et al. 2020, Algorithm 2), from step $N$ down to 0.

        $x_N \sim \mathcal N(0, I)$; for $i = N, \dots, 1$: $z \sim \mathcal N(0, I)$,
        $x_{i-1} = \mu_\theta(x_i, i) + \sigma_i z$, run by the one sampling loop as the chain's
        [`ChainPlan`][sdegen.sdes.discrete.ChainPlan] of every step (``sdegen.sample`` with
        ``method="ancestral"``). Draws: $x_N$ = ``torch.randn(shape)`` first (skipped when ``x_T`` is
        given), then one ``torch.randn(shape)`` per step, also at $i = 1$ where $\sigma_1 = 0$ for
        ``variance="posterior"``. This is the order of
        ``sdegen.sample(vp, ddpm.score_fn(eps_model), shape, method="ancestral", steps=N)``, so both
        give the same samples from the same generator (to float rounding).

        Args:
            eps_model: ``eps_model(x, i, **model_kwargs)``; ``i`` a ``(B,)`` long tensor of steps.
            shape (tuple[int, ...]): ``(B, *D)``.
            generator: source of all randomness.
            device: of the samples (default: the generator's device; or that of ``x_T``).
            dtype: of the samples (default: the default dtype; or that of ``x_T``).
            x_T: start here instead of drawing $x_N$.
            progress: show a tqdm bar.
            model_kwargs: extra keyword arguments for ``eps_model``.

        Returns:
            ``(B, *D)`` samples $x_0$.
        """
        steps = tuple(range(self.n_steps, 0, -1))
        plan = ChainPlan(steps, steps[1:] + (0,), variance=self.variance, noiseless_step_one=False)
        return self._run(plan, eps_model, shape, generator, device, dtype, x_T, progress, model_kwargs)

    def ddim_steps(self, steps: int) -> list[int]:
        r"""The DDIM sub-sequence $0 = \tau_0 < \tau_1 < \dots < \tau_S = N$, $\tau_k = \mathrm{round}(kN/S)$."""
        S = _check_steps(steps, "steps")
        if S > self.n_steps:
            raise ValueError(f"steps must be <= n_steps = {self.n_steps}, got {S}")
        return [round(k * self.n_steps / S) for k in range(S + 1)]

    def ddim_sample(self, eps_model: EpsModel, shape, *, steps: int, eta: float = 0.0,
                    generator: torch.Generator | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, x_T: Tensor | None = None, progress: bool = False,
                    model_kwargs: dict | None = None) -> Tensor:
        r"""DDIM sampling on the sub-sequence [`ddim_steps`][sdegen.ddpm.DDPM.ddim_steps] (Song, Meng & Ermon 2021, eq. 12 and 16).

        From $\tau = \tau_k$ to $\tau' = \tau_{k-1}$, with $\hat\epsilon = \epsilon_\theta(x, \tau)$ and
        $\hat x_0 = (x - \sqrt{1-\bar\alpha_\tau}\hat\epsilon)/\sqrt{\bar\alpha_\tau}$:

        $$x' = \sqrt{\bar\alpha_{\tau'}}\,\hat x_0 + \sqrt{1-\bar\alpha_{\tau'}-\sigma^2}\,\hat\epsilon + \sigma z,
          \quad \sigma = \eta\sqrt{\tfrac{1-\bar\alpha_{\tau'}}{1-\bar\alpha_\tau}}\sqrt{1-\tfrac{\bar\alpha_\tau}{\bar\alpha_{\tau'}}}.$$

        $\eta = 0$ is deterministic: Euler's method for the probability-flow ODE in the variables
        $(x/\sqrt{\bar\alpha}, \sigma = \sqrt{(1-\bar\alpha)/\bar\alpha})$, exact for a constant
        $\hat\epsilon$. $\eta = 1$ with ``steps = N`` is ancestral sampling with $\tilde\beta_i$. The last
        step lands on $\tau_0 = 0$ ($\bar\alpha = 1$) and returns $\hat x_0$. The steps run in the one
        sampling loop as a [`ChainPlan`][sdegen.sdes.discrete.ChainPlan] (as [`sample`][sdegen.ddpm.DDPM.sample]).
        Draws: $x_N$ first (unless ``x_T``), then one ``torch.randn(shape)`` per step (multiplied by
        $\sigma = 0$ when ``eta = 0``).

        Args:
            eps_model: ``eps_model(x, i, **model_kwargs)`` as in [`sample`][sdegen.ddpm.DDPM.sample].
            shape (tuple[int, ...] | None): ``(B, *D)`` (may be ``None`` when ``x_T`` is given).
            steps: S, the number of model evaluations, ``1 <= S <= N``.
            eta: $\eta \ge 0$.
            generator: source of all randomness.
            device: as in [`sample`][sdegen.ddpm.DDPM.sample].
            dtype: as in [`sample`][sdegen.ddpm.DDPM.sample].
            x_T: start here instead of drawing $x_N$.
            progress: show a tqdm bar.
            model_kwargs: extra keyword arguments for ``eps_model``.

        Returns:
            ``(B, *D)`` samples $x_0$.
        """
        taus = self.ddim_steps(steps)
        eta = check_positive(eta, "eta", allow_zero=True)
        plan = ChainPlan(tuple(taus[:0:-1]), tuple(taus[-2::-1]), eta=eta, noiseless_step_one=False)
        return self._run(plan, eps_model, shape, generator, device, dtype, x_T, progress, model_kwargs)

    def _run(self, plan: ChainPlan, eps_model: EpsModel, shape, generator, device, dtype, x_T, progress: bool,
             model_kwargs: dict | None) -> Tensor:
        r"""Run ``plan`` from $x_N$ (``x_T`` checked, or drawn) in the one sampling loop: ``sdegen.sample`` with
        ``method="ancestral"`` on [`score_fn`][sdegen.ddpm.DDPM.score_fn] and the chain's own SDE, a
        [`DiscreteVPSDE`][sdegen.sdes.discrete.DiscreteVPSDE] of the same $\beta_i$ (its $\bar\alpha_i$ are these bit for bit)."""
        if x_T is not None:
            check_floating(x_T, "x_T")
            if x_T.ndim < 2 or x_T.shape[0] < 1:
                raise ValueError(f"x_T must be batch-first with shape (B, *D), at least 2 dims, "
                                 f"got shape {tuple(x_T.shape)}")
            if not bool(torch.isfinite(x_T).all()):        # one host read at the entry point
                raise ValueError("x_T contains NaN or inf values")
            if shape is not None and tuple(x_T.shape) != tuple(shape):
                raise ValueError(f"x_T must have shape {tuple(shape)}, got {tuple(x_T.shape)}")
            if dtype is not None and x_T.dtype != dtype:
                raise ValueError(f"x_T must have dtype {dtype}, got {x_T.dtype}")
        else:
            shape = _check_shape(shape)
            if device is None and generator is not None:
                device = generator.device
            dtype = dtype if dtype is not None else torch.get_default_dtype()
            if dtype not in (torch.float32, torch.float64):
                raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
            x_T = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        sde = DiscreteVPSDE(self._betas, T=self.T, plan=plan)
        with torch.no_grad():
            return sample(sde, self._grid_score(eps_model, x_T), None, method="ancestral", x_T=x_T, generator=generator,
                          progress=progress, model_kwargs=model_kwargs).samples

    # ------------------------------------------------------------------ score view
    def score_fn(self, eps_model: EpsModel) -> Callable[..., Tensor]:
        r"""The ε-model seen as a continuous score: $s(x, t) = -\epsilon_\theta(x, i)/\sqrt{1-\bar\alpha_i}$, $i = \mathrm{round}(tN/T)$.

        So ``sdegen.sample(vp, ddpm.score_fn(eps_model), ...)`` runs any continuous sampler with a
        DDPM model. Times between grid points use the nearest step (no interpolation); times below
        $T/(2N)$ use step 1. Extra keyword arguments go to ``eps_model``.

        The returned ``score_fn(x, t)`` raises ``ValueError`` for ``t`` outside $[0, T]$ or not finite
        (checked for CPU tensors), for ``x`` not batch-first ``(B, *D)``, and ``TypeError`` when
        ``eps_model`` returns another dtype than ``x``'s.
        """
        if not callable(eps_model):
            raise TypeError(f"eps_model must be callable eps_model(x, i), got {type(eps_model).__name__}")

        def score_fn(x: Tensor, t: Tensor, **kwargs) -> Tensor:
            check_floating(x, "x")
            if x.ndim < 2:
                raise ValueError(f"x must have shape (B, *D) (batch first), got {tuple(x.shape)}")
            tt = as_time(t, x.shape[0], device=x.device, name="t")
            # Out-of-range or NaN times were clamped to steps 1..N (or crashed in the rounding): refuse
            # them. The check reads values only on the CPU (no per-call device sync inside samplers).
            check_time_range(tt, self.T, name="t")
            ii = self.time_to_step(tt)
            eps_hat = self._eps(eps_model, x, ii, kwargs)
            return eps_hat * append_dims(self._coef("neg_inv_sqrt_1mab", ii, x), x.ndim)

        return score_fn

    def _grid_score(self, eps_model: EpsModel, like: Tensor) -> Callable[..., Tensor]:
        r"""[`score_fn`][sdegen.ddpm.DDPM.score_fn] (the same numbers) for the chain's own sampling runs, without
        its per-call argument checks: `_run` checks ``x_T`` once and the times are the plan's grid, in range
        by construction. Per call: the model call and three kernels (the checked view: about ten and two
        host reads of the time range).

        The step is found by one ``bucketize`` against $-\infty$ and the midpoints $(k + \tfrac12)T/N$,
        $k = 1..N-1$: the number of these $\le t$ is ``time_to_step(t)`` (round to nearest, clamped to
        $[1, N]$) wherever $tN/T$ is not within rounding of a half-integer, so on every chain time
        $iT/N$ and on $t = 0$."""
        n = self.n_steps
        mids = (torch.arange(1, n, dtype=torch.float64) + 0.5) * (self._T / n)
        bounds = torch.cat([mids.new_tensor([-math.inf]), mids]).to(like.device, like.dtype)
        coef = self._coef("neg_inv_sqrt_1mab", slice(None), like)      # (N + 1,) on like's device and dtype
        coef = coef.reshape(-1, *([1] * (like.ndim - 1)))              # indexed by (B,) steps: (B, 1, ..., 1)

        def score_fn(x: Tensor, t: Tensor, **kwargs) -> Tensor:
            ii = torch.bucketize(t.contiguous(), bounds, right=True)   # (the loop's t is an expanded view)
            eps_hat = self._eps(eps_model, x, ii, kwargs)
            return eps_hat * coef[ii]

        return score_fn

    def eps_model_from_score(self, score_fn: Callable[..., Tensor]) -> EpsModel:
        r"""A continuous score as a DDPM ε-model: $\epsilon(x, i) = -\sqrt{1-\bar\alpha_i}\,s(x, t_i)$, $t_i = iT/N$.

        The inverse of [`score_fn`][sdegen.ddpm.DDPM.score_fn] at the grid times, so ``ddpm.sample(ddpm.eps_model_from_score(s))``
        equals ``sdegen.sample(vp, s, method="ancestral", steps=N)``. It uses the chain's
        $\sqrt{1-\bar\alpha_i}$, which differs from the SDE's $s(t_i)$ by $O(1/N)$ for
        [`from_vp`][sdegen.ddpm.DDPM.from_vp] chains (zero for [`from_alphas_cumprod`][sdegen.ddpm.DDPM.from_alphas_cumprod] with $\bar\alpha_i = m(t_i)^2$).
        """
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable score_fn(x, t), got {type(score_fn).__name__}")

        def eps_model(x: Tensor, i: Tensor, **kwargs) -> Tensor:
            ii = self._steps(i, x)
            t = ii.to(x.dtype) * (self.T / self.n_steps)
            return -append_dims(self._coef("sqrt_1mab", ii, x), x.ndim) * score_fn(x, t, **kwargs)

        return eps_model

    # ------------------------------------------------------------------ training objective and bound
    def loss(self, eps_model: EpsModel, x0: Tensor, *, generator: torch.Generator | None = None,
             reduction: str = "mean", model_kwargs: dict | None = None) -> Tensor:
        r"""The simple objective $L_\text{simple}$ (Ho et al. 2020, eq. 14): [`chain_simple_loss`][sdegen.vlb.chain_simple_loss] of this chain."""
        return chain_simple_loss(self, eps_model, x0, generator=generator, reduction=reduction,
                                 model_kwargs=model_kwargs)

    def eps_weight(self, i) -> Tensor:
        r"""$\lambda_i = \beta_i^2 / (2\sigma_i^2\alpha_i(1-\bar\alpha_i))$, the weight of $\|\epsilon - \hat\epsilon\|^2$ in $L_{i-1}$ (Ho et al. 2020, eq. 12); float64, steps ``2..N``."""
        ii = _as_steps(i, 2, self.n_steps, "i")
        t = {k: v.to(ii.device)[ii] for k, v in self._tab.items()}
        return t["beta"].square() / (2 * t["sigma2"] * t["alpha"] * (1 - t["alpha_bar"]))

    def vlb_term(self, eps_model: EpsModel, x0: Tensor, i, noise: Tensor, *, form: str = "kl",
                 model_kwargs: dict | None = None) -> Tensor:
        r"""$L_{i-1}$ ($i \ge 2$) at $x_i$ = ``q_sample(x0, i, noise)``, ``(B,)`` nats: [`chain_vlb_term`][sdegen.vlb.chain_vlb_term] of this chain."""
        return chain_vlb_term(self, eps_model, x0, i, noise, form=form, model_kwargs=model_kwargs)

    def vlb(self, eps_model: EpsModel, x0: Tensor, *, generator: torch.Generator | None = None,
            decoder: str = "gaussian", n_terms: int | None = None, model_kwargs: dict | None = None) -> VLBResult:
        r"""The variational bound on $-\log p_\theta(x_0)$, term by term (Ho et al. 2020, eq. 5), in nats and bits/dim.

        [`chain_vlb`][sdegen.vlb.chain_vlb] of this chain, which documents the estimator, the decoders
        and the options. Use ``variance="beta"`` for likelihoods.
        """
        return chain_vlb(self, eps_model, x0, generator=generator, decoder=decoder, n_terms=n_terms,
                         model_kwargs=model_kwargs)

    def __repr__(self) -> str:
        b = self._betas
        return (f"DDPM(n_steps={self.n_steps}, betas=[{float(b[0]):.4g} .. {float(b[-1]):.4g}], "
                f"T={self.T}, variance={self.variance!r})")


# ---------------------------------------------------------------------- helpers
def _rebuild(betas: Tensor, T: float, variance: str) -> DDPM:
    return DDPM(betas, T=T, variance=variance)


def _check_steps(n, name: str) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return n


def _as_steps(i, lo: int, hi: int, name: str, device=None) -> Tensor:
    """Integer steps as a long tensor, checked to lie in ``lo..hi`` (values read on CPU only)."""
    if isinstance(i, Tensor):
        if i.is_floating_point() or i.dtype == torch.bool or i.is_complex():
            raise TypeError(f"{name} must be integer steps (a long tensor), got dtype {i.dtype}")
        ii = i.to(device=device if device is not None else i.device, dtype=torch.long)
    elif isinstance(i, int) and not isinstance(i, bool):
        ii = torch.tensor(i, dtype=torch.long, device=device)
    else:
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(i).__name__}")
    if is_traceable_device(ii) and ii.numel() > 0:
        lo_v, hi_v = int(ii.min()), int(ii.max())
        if lo_v < lo or hi_v > hi:
            raise ValueError(f"{name} must lie in {lo}..{hi}, got values in {lo_v}..{hi_v}")
    return ii

