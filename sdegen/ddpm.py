r"""The DDPM chain as the discretized VP SDE: forward jumps, posterior, ancestral and DDIM sampling, the VLB.

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
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ._utils import (append_dims, as_time, check_floating, check_positive, check_time_range, is_traceable_device,
                     sum_except_batch)
from .sdes import AffineSDE, VPSDE
from .sdes.base import _check_shape

__all__ = ["DDPM", "VLBResult", "ContinuousVLBResult", "gaussian_kl", "discretized_gaussian_log_likelihood",
           "continuous_vlb", "VARIANCES", "DECODERS"]

#: Reverse-step variances accepted by [`DDPM`][sdegen.ddpm.DDPM].
VARIANCES = ("posterior", "beta")
#: Decoders $p_\theta(x_0 \mid x_1)$ accepted by [`DDPM.vlb`][sdegen.ddpm.DDPM.vlb].
DECODERS = ("gaussian", "discretized")

EpsModel = Callable[..., Tensor]
_LOG2 = math.log(2.0)


# ---------------------------------------------------------------------- closed forms
def gaussian_kl(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> Tensor:
    r"""$\mathrm{KL}(\mathcal N(\mu_1, \sigma_1^2) \,\|\, \mathcal N(\mu_2, \sigma_2^2))$, elementwise, in nats.

    $$\mathrm{KL} = \log\frac{\sigma_2}{\sigma_1} + \frac{\sigma_1^2 + (\mu_1-\mu_2)^2}{2\sigma_2^2} - \frac12$$

    (Kingma & Welling 2014, App. B). Arguments broadcast against each other; variances must be
    positive. Sum over dimensions for the KL of isotropic or diagonal Gaussians.

    Args:
        mean1: mean of the first Gaussian.
        var1: variance of the first Gaussian (positive).
        mean2: mean of the second Gaussian.
        var2: variance of the second Gaussian (positive).

    Returns:
        The broadcast elementwise KL, $\ge 0$, zero only where the two Gaussians are equal.
    """
    mean1, var1, mean2, var2 = (torch.as_tensor(v) for v in (mean1, var1, mean2, var2))
    # log(var2/var1) written as a difference of logs keeps precision when the ratio is near 1.
    return 0.5 * (var2.log() - var1.log() + (var1 + (mean1 - mean2).square()) / var2 - 1.0)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, var: Tensor, *, bins: int = 256) -> Tensor:
    r"""Log-probability of $x$ in $[-1, 1]$ quantized to ``bins`` levels under $\mathcal N(\mu, \sigma^2)$.

    $$\log p(x) = \log \int_{\delta_-(x)}^{\delta_+(x)} \mathcal N(u; \mu, \sigma^2)\,du, \qquad
      \delta_\pm(x) = \begin{cases} \pm\infty & x = \pm 1 \\ x \pm 1/(\text{bins}-1) & \text{else}\end{cases}$$

    (Ho et al. 2020, eq. 13). The bin mass is computed from ``log_ndtr`` on the side of the mean
    where it does not cancel, so it stays accurate for bins far in a tail. Elementwise, broadcasting.
    """
    half = 1.0 / (bins - 1)
    std = var.sqrt()
    lo = (x - half - mean) / std
    hi = (x + half - mean) / std
    edge_lo = x <= -1.0 + 1e-6
    edge_hi = x >= 1.0 - 1e-6
    lo = torch.where(edge_lo, torch.full_like(lo, -math.inf), lo)
    hi = torch.where(edge_hi, torch.full_like(hi, math.inf), hi)
    # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi): use the form whose two terms are both small.
    upper = (lo + hi) > 0
    a = torch.where(upper, -hi, lo)
    b = torch.where(upper, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    # log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))); a < b always.
    return log_b + torch.log((-torch.expm1((log_a - log_b).clamp_max(0.0))).clamp_min(1e-300))


# ---------------------------------------------------------------------- results
@dataclass(frozen=True)
class VLBResult:
    r"""The DDPM variational bound $-\log p_\theta(x_0) \le L_T + \sum_{i=2}^N L_{i-1} + L_0$, per sample.

    Attributes:
        prior: $L_T = \mathrm{KL}(q(x_N \mid x_0)\,\|\,\mathcal N(0, I))$, ``(B,)`` nats.
        diffusion: $\sum_{i=2}^N L_{i-1}$, ``(B,)`` nats (exact in $i$, or an unbiased estimate).
        decoder: $L_0 = -\log p_\theta(x_0 \mid x_1)$, ``(B,)`` nats.
        total: the bound, ``(B,)`` nats.
        bits_per_dim: ``total / (D ln 2)``, ``(B,)``.
        terms: ``(B, N)`` with column ``j`` $= L_j$ for $j = 0, \dots, N-1$ (column 0 is the decoder)
            when every term was computed; ``None`` for the sampled estimate.
        steps: the steps $i$ whose terms $L_{i-1}$ were evaluated (1-D long tensor).
    """

    prior: Tensor
    diffusion: Tensor
    decoder: Tensor
    total: Tensor
    bits_per_dim: Tensor
    terms: Tensor | None
    steps: Tensor


@dataclass(frozen=True)
class ContinuousVLBResult:
    r"""The continuous-time bound of [`continuous_vlb`][sdegen.ddpm.continuous_vlb], per sample, in nats.

    Attributes:
        prior: $\mathrm{KL}(q(x_T \mid x_0)\,\|\,p_T)$, ``(B,)``.
        diffusion: the estimate of $\tfrac12\int_{\lambda_T}^{\lambda_\epsilon} e^{\lambda}
            \|x_0 - \hat x_0(x_\lambda)\|^2 d\lambda$, ``(B,)``.
        decoder: $-\log \mathcal N(x_0; \hat x_0(x_\epsilon), \sigma(\epsilon)^2 I)$, ``(B,)``.
        total: the sum, ``(B,)``.
        bits_per_dim: ``total / (D ln 2)``, ``(B,)``.
    """

    prior: Tensor
    diffusion: Tensor
    decoder: Tensor
    total: Tensor
    bits_per_dim: Tensor


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
        t = torch.as_tensor(t)
        return torch.round(t * (self.n_steps / self.T)).clamp(1, self.n_steps).long()

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
        _check_like(noise, x0, "noise")
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
        _check_like(x_i, x0, "x_i")
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
        $x_{i-1} = \mu_\theta(x_i, i) + \sigma_i z$. Draws: $x_N$ = ``torch.randn(shape)`` first (skipped
        when ``x_T`` is given), then one ``torch.randn(shape)`` per step, also at $i = 1$ where
        $\sigma_1 = 0$ for ``variance="posterior"``. This is the order of
        ``sdegen.sample(vp, ddpm.score_fn(eps_model), shape, method="ancestral", steps=N)``, so both
        give the same samples from the same generator.

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
        x, gen_kw = self._start(shape, generator, device, dtype, x_T)
        B = x.shape[0]
        steps = range(self.n_steps, 0, -1)
        with torch.no_grad():
            for i in _progress(steps, progress, "DDPM"):
                ii = torch.full((B,), i, dtype=torch.long, device=x.device)
                eps_hat = self._eps(eps_model, x, ii, model_kwargs)
                mean = self._mean_from_eps(x, i, eps_hat)
                z = torch.randn(x.shape, **gen_kw)
                x = mean + self._coef("sigma2", i, x).sqrt() * z
        return x

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
        step lands on $\tau_0 = 0$ ($\bar\alpha = 1$) and returns $\hat x_0$. Draws: $x_N$ first (unless
        ``x_T``), then one ``torch.randn(shape)`` per step only when ``eta > 0``.

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
        x, gen_kw = self._start(shape, generator, device, dtype, x_T)
        B = x.shape[0]
        with torch.no_grad():
            for k in _progress(range(len(taus) - 1, 0, -1), progress, "DDIM"):
                tau, tau_prev = taus[k], taus[k - 1]
                ii = torch.full((B,), tau, dtype=torch.long, device=x.device)
                eps_hat = self._eps(eps_model, x, ii, model_kwargs)
                ab = self._coef("alpha_bar", tau, x)
                ab_prev = self._coef("alpha_bar", tau_prev, x)
                x0_hat = self.x0_from_eps(x, ii, eps_hat)
                sigma2 = (eta ** 2) * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
                x = ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma2).clamp_min(0).sqrt() * eps_hat
                if eta > 0:
                    x = x + sigma2.sqrt() * torch.randn(x.shape, **gen_kw)
        return x

    def _start(self, shape, generator, device, dtype, x_T):
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
            gen_kw = {"generator": generator, "device": x_T.device, "dtype": x_T.dtype}
            return x_T, gen_kw
        shape = _check_shape(shape)
        if device is None and generator is not None:
            device = generator.device
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        gen_kw = {"generator": generator, "device": device, "dtype": dtype}
        return torch.randn(shape, **gen_kw), gen_kw

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
            return -eps_hat / append_dims(self._coef("sqrt_1mab", ii, x), x.ndim)

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

    # ------------------------------------------------------------------ training objective
    def loss(self, eps_model: EpsModel, x0: Tensor, *, generator: torch.Generator | None = None,
             reduction: str = "mean", model_kwargs: dict | None = None) -> Tensor:
        r"""The simple objective $L_\text{simple} = \mathbb E_{i, \epsilon}\|\epsilon - \epsilon_\theta(x_i, i)\|^2$ (Ho et al. 2020, eq. 14).

        Draws $i \sim \mathcal U\{1..N\}$ per sample (``torch.randint``), then $\epsilon$ (``torch.randn``),
        in that order. The squared error is averaged over the data dimensions.

        Args:
            eps_model: ``eps_model(x, i)``.
            x0: ``(B, *D)`` data.
            reduction: ``"mean"`` (a scalar) or ``"none"`` (``(B,)``).
        """
        check_floating(x0, "x0")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        B = x0.shape[0]
        ii = torch.randint(1, self.n_steps + 1, (B,), generator=generator, device=_gen_device(generator, x0))
        ii = ii.to(x0.device)
        noise = _randn_like(x0, generator)
        eps_hat = self._eps(eps_model, self.q_sample(x0, ii, noise), ii, model_kwargs)
        per = (noise - eps_hat).square().reshape(B, -1).mean(1)
        return per.mean() if reduction == "mean" else per

    # ------------------------------------------------------------------ variational bound
    def eps_weight(self, i) -> Tensor:
        r"""$\lambda_i = \beta_i^2 / (2\sigma_i^2\alpha_i(1-\bar\alpha_i))$, the weight of $\|\epsilon - \hat\epsilon\|^2$ in $L_{i-1}$ (Ho et al. 2020, eq. 12); float64, steps ``2..N``."""
        ii = _as_steps(i, 2, self.n_steps, "i")
        t = {k: v.to(ii.device)[ii] for k, v in self._tab.items()}
        return t["beta"].square() / (2 * t["sigma2"] * t["alpha"] * (1 - t["alpha_bar"]))

    def vlb_term(self, eps_model: EpsModel, x0: Tensor, i, noise: Tensor, *, form: str = "kl",
                 model_kwargs: dict | None = None) -> Tensor:
        r"""$L_{i-1} = \mathrm{KL}(q(x_{i-1}\mid x_i, x_0)\,\|\,p_\theta(x_{i-1}\mid x_i))$ for $i \ge 2$ at $x_i$ = ``q_sample(x0, i, noise)``.

        Three equal forms (with $r_i = \tilde\beta_i/\sigma_i^2$ and $c_i = \tfrac D2(r_i - 1 - \log r_i)$,
        zero for ``variance="posterior"``):

        - ``"kl"``: ``gaussian_kl`` of the posterior and the model, summed over dimensions;
        - ``"eps"``: $\lambda_i\|\epsilon - \hat\epsilon\|^2 + c_i$ with [`eps_weight`][sdegen.ddpm.DDPM.eps_weight] (Ho et al. 2020, eq. 12);
        - ``"snr"``: $\tfrac{r_i}2(\mathrm{SNR}_{i-1} - \mathrm{SNR}_i)\|x_0 - \hat x_0\|^2 + c_i$ (Kingma et al. 2021, eq. 13).

        Returns:
            ``(B,)`` nats.
        """
        if form not in ("kl", "eps", "snr"):
            raise ValueError(f"form must be one of 'kl', 'eps', 'snr', got {form!r}")
        check_floating(x0, "x0")
        _check_like(noise, x0, "noise")
        ii = _as_steps(i, 2, self.n_steps, "i", device=x0.device)
        ii = self._steps(ii, x0)
        x_i = self.q_sample(x0, ii, noise)
        eps_hat = self._eps(eps_model, x_i, ii, model_kwargs)
        return self._kl_term(x0, x_i, ii, noise, eps_hat, form)

    def _kl_term(self, x0, x_i, ii, noise, eps_hat, form: str) -> Tensor:
        D = x0[0].numel()
        sigma2 = self._coef("sigma2", ii, x0)
        post_var = self._coef("post_var", ii, x0)
        if form == "kl":
            mean_q, _ = self.q_posterior(x0, x_i, ii)
            mean_p = self._mean_from_eps(x_i, ii, eps_hat)
            kl = gaussian_kl(mean_q, append_dims(post_var, x0.ndim), mean_p, append_dims(sigma2, x0.ndim))
            return sum_except_batch(kl)
        r = post_var / sigma2
        const = 0.5 * D * (r - 1 - r.log())
        if form == "eps":
            w = self._coef("beta", ii, x0).square() / (
                2 * sigma2 * self._coef("alpha", ii, x0) * (1 - self._coef("alpha_bar", ii, x0)))
            return w * sum_except_batch((noise - eps_hat).square()) + const
        x0_hat = self.x0_from_eps(x_i, ii, eps_hat)
        dsnr = self._coef("snr", ii - 1, x0) - self._coef("snr", ii, x0)
        return 0.5 * r * dsnr * sum_except_batch((x0 - x0_hat).square()) + const

    def vlb(self, eps_model: EpsModel, x0: Tensor, *, generator: torch.Generator | None = None,
            decoder: str = "gaussian", n_terms: int | None = None, model_kwargs: dict | None = None) -> VLBResult:
        r"""The variational bound on $-\log p_\theta(x_0)$, term by term (Ho et al. 2020, eq. 5; Sohl-Dickstein et al. 2015).

        $$L = \underbrace{\mathrm{KL}(q(x_N\mid x_0)\|\mathcal N(0,I))}_{L_T}
            + \sum_{i=2}^{N}\underbrace{\mathbb E_{q(x_i\mid x_0)}\mathrm{KL}(q(x_{i-1}\mid x_i,x_0)\|p_\theta(x_{i-1}\mid x_i))}_{L_{i-1}}
            \underbrace{- \mathbb E_{q(x_1\mid x_0)}\log p_\theta(x_0\mid x_1)}_{L_0}.$$

        $L_T$ is exact. Each $L_{i-1}$ ($i \ge 2$) and $L_0$ is estimated with one draw
        $x_i \sim q(x_i \mid x_0)$ per sample; independent draws across $i$. With ``n_terms=None`` every
        $i$ is evaluated ($N$ model calls); with ``n_terms=K`` the sum is the unbiased estimate
        $\tfrac{N-1}{K}\sum_k L_{i_k - 1}$, $i_k \sim \mathcal U\{2..N\}$ per sample, and ``terms`` is ``None``.

        Decoder $p_\theta(x_0\mid x_1)$, mean $\mu_\theta(x_1, 1) = \hat x_0$ and variance $\beta_1$ (the
        variance of $x_0 \mid x_1$ to first order; $\tilde\beta_1 = 0$ would make it degenerate):

        - ``"gaussian"`` (default, for continuous data): $\mathcal N(x_0; \mu_\theta, \beta_1 I)$,
          a density, so bits/dim is in density units (no dequantization offset);
        - ``"discretized"`` (for 8-bit data scaled to $[-1, 1]$): the Gaussian mass of each data bin
          ([`discretized_gaussian_log_likelihood`][sdegen.ddpm.discretized_gaussian_log_likelihood]), a probability, so the bound is a true
          discrete NLL and bits/dim compares with published numbers.

        **Which variance.** The bound uses the chain's ``variance``. With ``"beta"`` and the exact
        $\epsilon$ it tends to $-\log p(x_0)$ as $N \to \infty$ (the gap is $O(1/N)$). With ``"posterior"``
        it does not: in the first steps, where $\beta_i$ is comparable to the noise level
        $1-\bar\alpha_{i-1}$, the true reverse variance is close to $\beta_i$, not $\tilde\beta_i$,
        and the mismatch costs a constant, about 0.3 nats per dimension, for every $N$
        (``tests/test_ddpm.py::test_vlb_gap_shrinks_with_n``). Use ``DDPM(..., variance="beta")``
        for likelihoods.

        Draws: per step a ``torch.randn`` (and, for ``n_terms``, first the ``torch.randint`` steps).

        Args:
            eps_model: ``eps_model(x, i)``.
            x0: ``(B, *D)`` data (in $[-1, 1]$ for ``"discretized"``).
            generator: source of all randomness.
            decoder: ``"gaussian"`` or ``"discretized"``.
            n_terms: None (all terms) or the number K of sampled terms.

        Returns:
            [`VLBResult`][sdegen.ddpm.VLBResult], nats and bits/dim, ``(B,)`` each.

        Raises:
            ValueError: ``x0`` not batch-first ``(B, *D)`` or containing NaN/inf; unknown ``decoder``.
            TypeError: ``eps_model`` returns another dtype than ``x0``'s.
        """
        check_floating(x0, "x0")
        if x0.ndim < 2 or x0.shape[0] < 1:
            raise ValueError(f"x0 must be batch-first with shape (B, *D), at least 2 dims, got {tuple(x0.shape)}")
        if not bool(torch.isfinite(x0).all()):        # one host read at the entry point
            raise ValueError("x0 contains NaN or inf values: the bound would be NaN")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")
        if decoder == "discretized" and is_traceable_device(x0) and bool((x0.abs() > 1 + 1e-6).any()):
            raise ValueError("decoder='discretized' needs x0 in [-1, 1] (8-bit data scaled), got values outside")
        B, D, N = x0.shape[0], x0[0].numel(), self.n_steps
        nd = x0.ndim
        # L_T: KL(N(sqrt(abar_N) x0, 1 - abar_N) || N(0, 1)), exact.
        abN = self._coef("alpha_bar", N, x0)
        prior = sum_except_batch(gaussian_kl(abN.sqrt() * x0, 1 - abN, torch.zeros_like(x0), torch.ones_like(x0)))

        def term(ii: Tensor) -> Tensor:
            noise = _randn_like(x0, generator)
            x_i = self.q_sample(x0, ii, noise)
            return self._kl_term(x0, x_i, ii, noise, self._eps(eps_model, x_i, ii, model_kwargs), "kl")

        cols = []
        if n_terms is None:
            steps = torch.arange(1, N + 1)
            for i in range(2, N + 1):
                cols.append(term(torch.full((B,), i, dtype=torch.long, device=x0.device)))
            diffusion = torch.stack(cols, 1).sum(1) if cols else torch.zeros_like(prior)
        else:
            K = _check_steps(n_terms, "n_terms")
            if N < 2:
                diffusion, steps = torch.zeros_like(prior), torch.zeros(0, dtype=torch.long)
            else:
                draws = torch.randint(2, N + 1, (K, B), generator=generator, device=_gen_device(generator, x0))
                draws = draws.to(x0.device)
                acc = torch.zeros_like(prior)
                for k in range(K):
                    acc = acc + term(draws[k])
                diffusion = acc * ((N - 1) / K)
                steps = draws.reshape(-1)
        # L_0: the decoder at step 1.
        one = torch.ones(B, dtype=torch.long, device=x0.device)
        noise = _randn_like(x0, generator)
        x1 = self.q_sample(x0, one, noise)
        mean = self._mean_from_eps(x1, one, self._eps(eps_model, x1, one, model_kwargs))
        var = append_dims(self._coef("beta", one, x0), nd).expand_as(x0)
        if decoder == "gaussian":
            logp = -0.5 * ((x0 - mean).square() / var + var.log() + math.log(2 * math.pi))
        else:
            logp = discretized_gaussian_log_likelihood(x0, mean, var)
        dec = -sum_except_batch(logp)
        total = prior + diffusion + dec
        terms = torch.stack([dec, *cols], 1) if n_terms is None else None
        return VLBResult(prior=prior, diffusion=diffusion, decoder=dec, total=total,
                         bits_per_dim=total / (D * _LOG2), terms=terms, steps=steps)

    def __repr__(self) -> str:
        b = self._betas
        return (f"DDPM(n_steps={self.n_steps}, betas=[{float(b[0]):.4g} .. {float(b[-1]):.4g}], "
                f"T={self.T}, variance={self.variance!r})")


# ---------------------------------------------------------------------- continuous time
def continuous_vlb(sde: AffineSDE, score_fn: Callable[..., Tensor], x0: Tensor, *, eps: float = 1e-5,
                   n_t: int = 16, generator: torch.Generator | None = None,
                   model_kwargs: dict | None = None) -> ContinuousVLBResult:
    r"""The continuous-time variational bound of an affine SDE, the $N \to \infty$ limit of the DDPM VLB.

    $$-\log p(x_0) \lesssim \mathrm{KL}(q(x_T\mid x_0)\|p_T)
      - \tfrac12\int_\epsilon^T \mathrm{SNR}'(t)\,\mathbb E\|x_0 - \hat x_0(x_t, t)\|^2 dt
      - \mathbb E\log\mathcal N(x_0; \hat x_0(x_\epsilon, \epsilon), \sigma(\epsilon)^2 I)$$

    with $\mathrm{SNR} = m^2/s^2$, $x_t = m(t)x_0 + s(t)\epsilon$ and $\hat x_0$ from the score by
    Tweedie (Kingma et al. 2021, eq. 17 and App. E). It is the limit of [`DDPM.vlb`][sdegen.ddpm.DDPM.vlb]: the
    DDPM's $L_{i-1} = \tfrac12(\mathrm{SNR}_{i-1} - \mathrm{SNR}_i)\|x_0 - \hat x_0\|^2$ are Riemann
    sums of the integral, and its decoder $L_0$ becomes the Gaussian decoder at $\epsilon \approx T/N$.
    The integral diverges like $\tfrac D2\log(1/\epsilon)$ and the decoder like
    $-\tfrac D2\log(1/\epsilon)$; their sum converges, so ``eps`` may be small.

    The integral is estimated in $\lambda = \log\mathrm{SNR}$, where it reads
    $\tfrac12\int_{\lambda_T}^{\lambda_\epsilon} e^\lambda\|x_0 - \hat x_0\|^2 d\lambda$ (the integrand
    stays bounded, $\le D$ for an exact model as $\lambda \to \infty$), by stratified sampling: ``n_t``
    strata of $[\lambda_T, \lambda_\epsilon]$, one uniform $\lambda$ and one $\epsilon$-draw per stratum
    and sample; unbiased. Draws: ``torch.rand`` ``(B, n_t)``, then per stratum ``torch.randn``, then
    the decoder's ``torch.randn``.

    Args:
        sde: any [`AffineSDE`][sdegen.AffineSDE] (VP, sub-VP, VE, user-defined).
        score_fn: ``score_fn(x, t)``.
        x0: ``(B, *D)``.
        eps: the truncation time, ``0 < eps < T``.
        n_t: the number of strata per sample.
        generator: source of all randomness.

    Returns:
        [`ContinuousVLBResult`][sdegen.ddpm.ContinuousVLBResult], ``(B,)`` nats each.
    """
    if not isinstance(sde, AffineSDE):
        raise TypeError(f"sde must be an sdegen.AffineSDE, got {type(sde).__name__}")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable score_fn(x, t), got {type(score_fn).__name__}")
    check_floating(x0, "x0")
    eps = check_positive(eps, "eps")
    if not eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}")
    n_t = _check_steps(n_t, "n_t")
    kw = model_kwargs or {}
    B, D, nd = x0.shape[0], x0[0].numel(), x0.ndim
    like = dict(device=x0.device, dtype=x0.dtype)
    t_eps = torch.full((B,), eps, **like)
    t_T = torch.full((B,), sde.T, **like)
    # prior term
    mT, sT = sde.marginal(t_T)
    ps = sde.prior_std()
    prior = sum_except_batch(gaussian_kl(append_dims(mT, nd) * x0, append_dims(sT.square(), nd).expand_as(x0),
                                         torch.zeros_like(x0), torch.full_like(x0, ps ** 2)))
    # diffusion term, stratified in log-SNR
    lam_T, lam_eps = sde.log_snr(t_T), sde.log_snr(t_eps)
    width = lam_eps - lam_T
    u = torch.rand((B, n_t), generator=generator, device=_gen_device(generator, x0), dtype=x0.dtype).to(x0.device)
    u = (torch.arange(n_t, **like)[None, :] + u) / n_t
    lam_all = lam_T[:, None] + u * width[:, None]                              # (B, n_t)
    # One inversion for all strata (generic affine SDEs invert log-SNR by bisection).
    t_all = sde.t_from_log_snr(lam_all.reshape(-1)).to(**like).clamp(eps, sde.T).reshape(B, n_t)
    diffusion = torch.zeros(B, **like)
    for k in range(n_t):
        lam, t = lam_all[:, k], t_all[:, k]
        m, s = sde.marginal(t)
        noise = _randn_like(x0, generator)
        xt = append_dims(m, nd) * x0 + append_dims(s, nd) * noise
        x0_hat = sde.x0_from_score(xt, t, score_fn(xt, t, **kw))
        diffusion = diffusion + 0.5 * lam.exp() * sum_except_batch((x0 - x0_hat).square())
    diffusion = diffusion * width / n_t
    # decoder at eps
    m, s = sde.marginal(t_eps)
    noise = _randn_like(x0, generator)
    xe = append_dims(m, nd) * x0 + append_dims(s, nd) * noise
    x0_hat = sde.x0_from_score(xe, t_eps, score_fn(xe, t_eps, **kw))
    var = append_dims((s / m).square(), nd)
    dec = 0.5 * sum_except_batch((x0 - x0_hat).square() / var + var.log().expand_as(x0) + math.log(2 * math.pi))
    total = prior + diffusion + dec
    return ContinuousVLBResult(prior=prior, diffusion=diffusion, decoder=dec, total=total,
                               bits_per_dim=total / (D * _LOG2))


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


def _check_like(t: Tensor, x: Tensor, name: str) -> None:
    if not isinstance(t, Tensor) or t.shape != x.shape:
        raise ValueError(f"{name} must be a tensor shaped like x0 {tuple(x.shape)}, got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")


def _gen_device(generator, x: Tensor):
    """Draw on the generator's device (a CUDA generator cannot fill a CPU tensor), else on ``x``'s."""
    return generator.device if generator is not None else x.device


def _randn_like(x: Tensor, generator) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=_gen_device(generator, x), dtype=x.dtype).to(x.device)


def _progress(it, progress: bool, desc: str):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)
