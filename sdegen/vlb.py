r"""Variational bounds on $-\log p(x_0)$: the DDPM chain's, term by term, and its continuous-time limit.

[`chain_vlb`][sdegen.vlb.chain_vlb] is the bound of a [`DDPM`][sdegen.ddpm.DDPM] chain
(``DDPM.vlb`` calls it) with its terms [`chain_vlb_term`][sdegen.vlb.chain_vlb_term] (``DDPM.vlb_term``). [`continuous_vlb`][sdegen.vlb.continuous_vlb]
is its $N \to \infty$ limit for any [`AffineSDE`][sdegen.AffineSDE] and score function. Both are
Monte Carlo estimates built from the closed forms of [`sdegen.gaussian`][sdegen.gaussian]; the exact
likelihood through the probability-flow ODE is [`sdegen.likelihood`][sdegen.likelihood].

Time convention: data at $t = 0$ (chain step 0), noise at $T$ (step $N$).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ._utils import append_dims, check_floating, check_int, check_positive, is_traceable_device, sum_except_batch
from .gaussian import (discretized_gaussian_log_likelihood, draw_device, gaussian_kl, gaussian_log_likelihood,
                       standard_normal)
from .sdes import AffineSDE

__all__ = ["VLBResult", "ContinuousVLBResult", "chain_vlb", "chain_vlb_term", "chain_simple_loss", "continuous_vlb", "DECODERS", "FORMS"]

#: Decoders $p_\theta(x_0 \mid x_1)$ accepted by [`chain_vlb`][sdegen.vlb.chain_vlb] (``DDPM.vlb``).
DECODERS = ("gaussian", "discretized")
#: The three equal forms of one term $L_{i-1}$ accepted by [`chain_vlb_term`][sdegen.vlb.chain_vlb_term].
FORMS = ("kl", "eps", "snr")
_LOG2 = math.log(2.0)


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
    r"""The continuous-time bound of [`continuous_vlb`][sdegen.vlb.continuous_vlb], per sample, in nats.

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


def chain_vlb_term(ddpm, eps_model: Callable[..., Tensor], x0: Tensor, i, noise: Tensor, *, form: str = "kl",
                   model_kwargs: dict | None = None) -> Tensor:
    r"""$L_{i-1} = \mathrm{KL}(q(x_{i-1}\mid x_i, x_0)\,\|\,p_\theta(x_{i-1}\mid x_i))$ for $i \ge 2$ at $x_i$ = ``ddpm.q_sample(x0, i, noise)``.

    Three equal forms (with $r_i = \tilde\beta_i/\sigma_i^2$ and $c_i = \tfrac D2(r_i - 1 - \log r_i)$,
    zero for ``variance="posterior"``):

    - ``"kl"``: [`gaussian_kl`][sdegen.gaussian.gaussian_kl] of the posterior and the model, summed over dimensions;
    - ``"eps"``: $\lambda_i\|\epsilon - \hat\epsilon\|^2 + c_i$ with $\lambda_i$ = ``ddpm.eps_weight(i)`` (Ho et al. 2020, eq. 12);
    - ``"snr"``: $\tfrac{r_i}2(\mathrm{SNR}_{i-1} - \mathrm{SNR}_i)\|x_0 - \hat x_0\|^2 + c_i$ (Kingma et al. 2021, eq. 13).

    The chain's coefficients are read from its float64 tables on ``x0``'s device and dtype (the
    chain's internal ``_coef``; this module is the chain's bound, split from ``ddpm.py`` for size).

    Args:
        ddpm (DDPM): the chain.
        eps_model: ``eps_model(x, i, **model_kwargs)``.
        x0: ``(B, *D)`` data.
        i (int | Tensor): steps in ``2..N``, an int or ``(B,)`` integer tensor.
        noise: ``(B, *D)`` the standard normal draw of $x_i$.
        form: one of ``FORMS``.
        model_kwargs: extra keyword arguments for ``eps_model``.

    Returns:
        ``(B,)`` nats.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}, got {form!r}")
    check_floating(x0, "x0")
    ii = ddpm._steps(i, x0, lo=2)
    x_i = ddpm.q_sample(x0, ii, noise)
    eps_hat = ddpm._eps(eps_model, x_i, ii, model_kwargs)
    D, nd = x0[0].numel(), x0.ndim
    sigma2 = ddpm._coef("sigma2", ii, x0)
    post_var = ddpm._coef("post_var", ii, x0)
    if form == "kl":
        mean_q, _ = ddpm.q_posterior(x0, x_i, ii)
        mean_p = ddpm._mean_from_eps(x_i, ii, eps_hat)
        return sum_except_batch(gaussian_kl(mean_q, append_dims(post_var, nd), mean_p, append_dims(sigma2, nd)))
    r = post_var / sigma2
    const = 0.5 * D * (r - 1 - r.log())
    if form == "eps":
        w = ddpm._coef("beta", ii, x0).square() / (
            2 * sigma2 * ddpm._coef("alpha", ii, x0) * (1 - ddpm._coef("alpha_bar", ii, x0)))
        return w * sum_except_batch((noise - eps_hat).square()) + const
    x0_hat = ddpm.x0_from_eps(x_i, ii, eps_hat)
    dsnr = ddpm._coef("snr", ii - 1, x0) - ddpm._coef("snr", ii, x0)
    return 0.5 * r * dsnr * sum_except_batch((x0 - x0_hat).square()) + const


def chain_vlb(ddpm, eps_model: Callable[..., Tensor], x0: Tensor, *, generator: torch.Generator | None = None,
              decoder: str = "gaussian", n_terms: int | None = None, model_kwargs: dict | None = None) -> VLBResult:
    r"""The variational bound of a DDPM chain on $-\log p_\theta(x_0)$, term by term (Ho et al. 2020, eq. 5; Sohl-Dickstein et al. 2015).

    $$L = \underbrace{\mathrm{KL}(q(x_N\mid x_0)\|\mathcal N(0,I))}_{L_T}
        + \sum_{i=2}^{N}\underbrace{\mathbb E_{q(x_i\mid x_0)}\mathrm{KL}(q(x_{i-1}\mid x_i,x_0)\|p_\theta(x_{i-1}\mid x_i))}_{L_{i-1}}
        \underbrace{- \mathbb E_{q(x_1\mid x_0)}\log p_\theta(x_0\mid x_1)}_{L_0}.$$

    $L_T$ is exact. Each $L_{i-1}$ ($i \ge 2$, [`chain_vlb_term`][sdegen.vlb.chain_vlb_term]) and $L_0$ is estimated with one
    draw $x_i \sim q(x_i \mid x_0)$ per sample; independent draws across $i$. With ``n_terms=None``
    every $i$ is evaluated ($N$ model calls); with ``n_terms=K`` the sum is the unbiased estimate
    $\tfrac{N-1}{K}\sum_k L_{i_k - 1}$, $i_k \sim \mathcal U\{2..N\}$ per sample, and ``terms`` is ``None``.

    Decoder $p_\theta(x_0\mid x_1)$, mean $\mu_\theta(x_1, 1) = \hat x_0$ and variance $\beta_1$ (the
    variance of $x_0 \mid x_1$ to first order; $\tilde\beta_1 = 0$ would make it degenerate):

    - ``"gaussian"`` (default, for continuous data): $\mathcal N(x_0; \mu_\theta, \beta_1 I)$,
      a density, so bits/dim is in density units (no dequantization offset);
    - ``"discretized"`` (for 8-bit data scaled to $[-1, 1]$): the Gaussian mass of each data bin
      ([`discretized_gaussian_log_likelihood`][sdegen.gaussian.discretized_gaussian_log_likelihood]),
      a probability, so the bound is a true discrete NLL and bits/dim compares with published numbers.

    **Which variance.** The bound uses the chain's ``variance``. With ``"beta"`` and the exact
    $\epsilon$ it tends to $-\log p(x_0)$ as $N \to \infty$ (the gap is $O(1/N)$). With ``"posterior"``
    it does not: in the first steps, where $\beta_i$ is comparable to the noise level
    $1-\bar\alpha_{i-1}$, the true reverse variance is close to $\beta_i$, not $\tilde\beta_i$,
    and the mismatch costs a constant, about 0.3 nats per dimension, for every $N$
    (``tests/test_ddpm.py::test_vlb_gap_shrinks_with_n``). Use ``DDPM(..., variance="beta")``
    for likelihoods.

    Draws: per step a ``torch.randn`` (and, for ``n_terms``, first the ``torch.randint`` steps).

    Args:
        ddpm (DDPM): the chain.
        eps_model: ``eps_model(x, i, **model_kwargs)`` with ``i`` a ``(B,)`` long tensor of steps.
        x0: ``(B, *D)`` data (in $[-1, 1]$ for ``"discretized"``).
        generator: source of all randomness.
        decoder: ``"gaussian"`` or ``"discretized"``.
        n_terms: None (all terms) or the number K of sampled terms.
        model_kwargs: extra keyword arguments for ``eps_model``.

    Returns:
        [`VLBResult`][sdegen.vlb.VLBResult], nats and bits/dim, ``(B,)`` each.

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
    B, D, N = x0.shape[0], x0[0].numel(), ddpm.n_steps
    # L_T: KL(N(sqrt(abar_N) x0, 1 - abar_N) || N(0, 1)), exact.
    abN = ddpm.alpha_bar[N].to(device=x0.device, dtype=x0.dtype)
    prior = sum_except_batch(gaussian_kl(abN.sqrt() * x0, 1 - abN, torch.zeros_like(x0), torch.ones_like(x0)))

    def term(ii: Tensor) -> Tensor:
        noise = standard_normal(x0, generator)
        return chain_vlb_term(ddpm, eps_model, x0, ii, noise, form="kl", model_kwargs=model_kwargs)

    cols = []
    if n_terms is None:
        steps = torch.arange(1, N + 1)
        for i in range(2, N + 1):
            cols.append(term(torch.full((B,), i, dtype=torch.long, device=x0.device)))
        diffusion = torch.stack(cols, 1).sum(1) if cols else torch.zeros_like(prior)
    else:
        K = check_int(n_terms, "n_terms", low=1)
        if N < 2:
            diffusion, steps = torch.zeros_like(prior), torch.zeros(0, dtype=torch.long)
        else:
            draws = torch.randint(2, N + 1, (K, B), generator=generator, device=draw_device(generator, x0))
            draws = draws.to(x0.device)
            acc = torch.zeros_like(prior)
            for k in range(K):
                acc = acc + term(draws[k])
            diffusion = acc * ((N - 1) / K)
            steps = draws.reshape(-1)
    # L_0: the decoder at step 1, variance beta_1.
    one = torch.ones(B, dtype=torch.long, device=x0.device)
    x1 = ddpm.q_sample(x0, one, standard_normal(x0, generator))
    mean, _ = ddpm.p_mean_variance(eps_model, x1, one, model_kwargs=model_kwargs)
    var = torch.full_like(x0, float(ddpm.betas[0]))
    if decoder == "gaussian":
        logp = gaussian_log_likelihood(x0, mean, var)
    else:
        logp = discretized_gaussian_log_likelihood(x0, mean, var)
    dec = -sum_except_batch(logp)
    total = prior + diffusion + dec
    terms = torch.stack([dec, *cols], 1) if n_terms is None else None
    return VLBResult(prior=prior, diffusion=diffusion, decoder=dec, total=total,
                     bits_per_dim=total / (D * _LOG2), terms=terms, steps=steps)


def continuous_vlb(sde: AffineSDE, score_fn: Callable[..., Tensor], x0: Tensor, *, eps: float = 1e-5,
                   n_t: int = 16, generator: torch.Generator | None = None,
                   model_kwargs: dict | None = None) -> ContinuousVLBResult:
    r"""The continuous-time variational bound of an affine SDE, the $N \to \infty$ limit of the DDPM VLB.

    $$-\log p(x_0) \lesssim \mathrm{KL}(q(x_T\mid x_0)\|p_T)
      - \tfrac12\int_\epsilon^T \mathrm{SNR}'(t)\,\mathbb E\|x_0 - \hat x_0(x_t, t)\|^2 dt
      - \mathbb E\log\mathcal N(x_0; \hat x_0(x_\epsilon, \epsilon), \sigma(\epsilon)^2 I)$$

    with $\mathrm{SNR} = m^2/s^2$, $x_t = m(t)x_0 + s(t)\epsilon$ and $\hat x_0$ from the score by
    Tweedie (Kingma et al. 2021, eq. 17 and App. E). It is the limit of [`chain_vlb`][sdegen.vlb.chain_vlb]
    (``DDPM.vlb``): the DDPM's $L_{i-1} = \tfrac12(\mathrm{SNR}_{i-1} - \mathrm{SNR}_i)\|x_0 - \hat x_0\|^2$
    are Riemann sums of the integral, and its decoder $L_0$ becomes the Gaussian decoder at
    $\epsilon \approx T/N$. The integral diverges like $\tfrac D2\log(1/\epsilon)$ and the decoder like
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
        model_kwargs: extra keyword arguments for ``score_fn``.

    Returns:
        [`ContinuousVLBResult`][sdegen.vlb.ContinuousVLBResult], ``(B,)`` nats each.
    """
    if not isinstance(sde, AffineSDE):
        raise TypeError(f"sde must be an sdegen.AffineSDE, got {type(sde).__name__}")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable score_fn(x, t), got {type(score_fn).__name__}")
    check_floating(x0, "x0")
    eps = check_positive(eps, "eps")
    if not eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}")
    n_t = check_int(n_t, "n_t", low=1)
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
    u = torch.rand((B, n_t), generator=generator, device=draw_device(generator, x0), dtype=x0.dtype).to(x0.device)
    u = (torch.arange(n_t, **like)[None, :] + u) / n_t
    lam_all = lam_T[:, None] + u * width[:, None]                              # (B, n_t)
    # One inversion for all strata (generic affine SDEs invert log-SNR by bisection).
    t_all = sde.t_from_log_snr(lam_all.reshape(-1)).to(**like).clamp(eps, sde.T).reshape(B, n_t)
    diffusion = torch.zeros(B, **like)
    for k in range(n_t):
        lam, t = lam_all[:, k], t_all[:, k]
        m, s = sde.marginal(t)
        xt = append_dims(m, nd) * x0 + append_dims(s, nd) * standard_normal(x0, generator)
        x0_hat = sde.x0_from_score(xt, t, score_fn(xt, t, **kw))
        diffusion = diffusion + 0.5 * lam.exp() * sum_except_batch((x0 - x0_hat).square())
    diffusion = diffusion * width / n_t
    # decoder at eps
    m, s = sde.marginal(t_eps)
    xe = append_dims(m, nd) * x0 + append_dims(s, nd) * standard_normal(x0, generator)
    x0_hat = sde.x0_from_score(xe, t_eps, score_fn(xe, t_eps, **kw))
    dec = -sum_except_batch(gaussian_log_likelihood(x0, x0_hat, append_dims((s / m).square(), nd)))
    total = prior + diffusion + dec
    return ContinuousVLBResult(prior=prior, diffusion=diffusion, decoder=dec, total=total,
                               bits_per_dim=total / (D * _LOG2))


def chain_simple_loss(ddpm, eps_model: Callable[..., Tensor], x0: Tensor, *, generator: torch.Generator | None = None,
                      reduction: str = "mean", model_kwargs: dict | None = None) -> Tensor:
    r"""The simple objective $L_\text{simple} = \mathbb E_{i, \epsilon}\|\epsilon - \epsilon_\theta(x_i, i)\|^2$ of a DDPM chain (Ho et al. 2020, eq. 14).

    The bound's $L_{i-1}$ terms with their weights ``DDPM.eps_weight`` set to one. Draws $i \sim \mathcal U\{1..N\}$ per sample (``torch.randint``), then $\epsilon$
    (``torch.randn``), in that order. The squared error is averaged over the data dimensions.

    Args:
        ddpm (DDPM): the [`DDPM`][sdegen.ddpm.DDPM] chain.
        eps_model: ``eps_model(x, i)`` with integer steps ``i``.
        x0: ``(B, *D)`` data.
        generator: source of the step and noise draws.
        reduction: ``"mean"`` (a scalar) or ``"none"`` (``(B,)``).
        model_kwargs: keyword arguments passed to every model call.

    Returns:
        The loss, a scalar or ``(B,)``.
    """
    check_floating(x0, "x0")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    B = x0.shape[0]
    ii = torch.randint(1, ddpm.n_steps + 1, (B,), generator=generator, device=draw_device(generator, x0))
    ii = ii.to(x0.device)
    noise = standard_normal(x0, generator)
    eps_hat = ddpm._eps(eps_model, ddpm.q_sample(x0, ii, noise), ii, model_kwargs)
    per = (noise - eps_hat).square().reshape(B, -1).mean(1)
    return per.mean() if reduction == "mean" else per

