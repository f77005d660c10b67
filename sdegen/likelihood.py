r"""Exact log-likelihoods through the probability-flow ODE, bits per dimension and ODE encoding.

The probability-flow ODE $dx/dt = \tilde f(x, t) = f(x, t) - \tfrac12 g(t)^2 s_\theta(x, t)$
(Song et al. 2021, eq. 13) is a continuous normalizing flow, so the instantaneous change of variables
(Chen et al. 2018, Thm. 1) gives, along its solution $x_t$ started at the data point $x_\epsilon = x$,

$$\log p_\epsilon(x) = \log p_T(x_T) + \int_\epsilon^T \nabla\!\cdot \tilde f(x_t, t)\,dt$$

(Song et al. 2021, App. D.2, eq. 39). We integrate the augmented state $(x_t, \int_\epsilon^t
\nabla\cdot\tilde f)$ forward in time, from $\epsilon$ up to $T$. The divergence is either exact
($d$ vector-Jacobian products per evaluation, batched) or the Hutchinson–Skilling estimate
$\nabla\cdot\tilde f \approx \tfrac1P\sum_p z_p^\top (\partial \tilde f/\partial x) z_p$ with probes
$z_p$ drawn once per sample and held fixed along the trajectory, which keeps the estimate of the
integral unbiased: $\mathbb E[z^\top (\int J\,dt) z] = \int \mathrm{tr} J\,dt$ (Grathwohl et al. 2019,
"FFJORD", eq. 7; Song et al. 2021, eq. 40).

The density at $T$: ``prior="sde"`` scores $x_T$ under the SDE's own prior ``sde.prior_log_prob``
($\mathcal N(0, I)$ for VP and sub-VP, $\mathcal N(0, \sigma_\max^2 I)$ for VE), which is only an
approximation of the true $p_T$ (on toy data it costs about 0.04 nats for VP and 0.12 for VE); pass
``prior=callable`` to use another density, e.g. the oracle's exact $p_T$,
``prior=lambda z: gm.log_prob_t(z, sde.T, sde)``, so that only the ODE error remains.

Notation map: $\epsilon$ = ``eps`` (truncation time), $\tilde f$ = the ODE drift, ``delta_log_prob`` =
$\int_\epsilon^T \nabla\cdot\tilde f\,dt$, ``prior_log_prob`` = $\log p_T(x_T)$.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ._utils import check_floating, check_positive
from .sdes import SDE, AffineSDE
from .solvers.base import CountingScore, Dynamics, progress_bar
from .solvers.ode_integrators import ODE_INTEGRATORS

__all__ = ["LikelihoodResult", "log_likelihood", "encode", "decode", "bits_per_dim", "dequantize",
           "DIVERGENCES", "PROBE_DISTS", "ODE_METHODS"]

DIVERGENCES = ("exact", "hutchinson")
PROBE_DISTS = ("rademacher", "gaussian")
#: The ``method=`` names: every adaptive ODE integrator of `sdegen.solvers.ode_integrators.ODE_INTEGRATORS`
#: (the same integrators are ``sample`` methods). The checks read the table itself.
ODE_METHODS = tuple(ODE_INTEGRATORS)

# Largest number of entries of one batched vector-Jacobian product (basis vectors x batch x dim)
# before the exact divergence splits its basis vectors into several passes.
_MAX_VJP_ENTRIES = 1 << 24


@dataclass(frozen=True)
class LikelihoodResult:
    r"""Result of [`log_likelihood`][sdegen.likelihood.log_likelihood].

    Attributes:
        log_prob: ``(B,)`` $\log p_\epsilon(x)$ in nats (``prior_log_prob + delta_log_prob``).
        prior_log_prob: ``(B,)`` $\log p_T(x_T)$ under the chosen prior.
        delta_log_prob: ``(B,)`` $\int_\epsilon^T \nabla\cdot\tilde f(x_t, t)\,dt$.
        latent: ``(B, *D)`` $x_T$, the encoding of ``x``.
        nfe: number of score-function evaluations (forward passes), counted by a wrapper.
        stats: solver statistics summed over chunks (``accepted``, ``rejected``, ``vjp`` = vector-
            Jacobian products, ``chunks``, ...).
    """

    log_prob: Tensor
    prior_log_prob: Tensor
    delta_log_prob: Tensor
    latent: Tensor
    nfe: int
    stats: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- checks
def _check_choice(value, name: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, valid))}")
    return value


def _check_data(x: Tensor, name: str = "x") -> None:
    check_floating(x, name)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B, *D) with B >= 1, got {tuple(x.shape)}")
    # One host read at the entry point, not inside the integration.
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def _check_eps(sde: SDE, eps, dtype: torch.dtype) -> float:
    r"""Validate the truncation time.

    ``eps`` must lie in $(0, T)$. For an affine SDE the noise level at ``eps`` must also be resolvable
    in the data's dtype: if $s(\epsilon) \le 64\,u$ ($u$ = machine epsilon: 1.2e-7 in float32,
    2.2e-16 in float64), $x_\epsilon$ differs from $x_0$ only by a few rounding units of $O(1)$ data,
    the score $\approx -\hat\epsilon/s(\epsilon)$ is dominated by rounding error and the ODE's
    divergence ($\sim d/s^2$ near 0) is numerically meaningless.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float in (0, T), got {eps!r}")
    eps = float(eps)
    if not (0.0 < eps < sde.T):
        raise ValueError(f"eps must lie in (0, T) = (0, {sde.T}), got {eps!r}")
    if isinstance(sde, AffineSDE):
        _, std = sde.marginal(torch.tensor([eps], dtype=dtype))
        s = float(std)
        limit = 64 * torch.finfo(dtype).eps
        if not math.isfinite(s) or s <= limit:
            raise ValueError(
                f"eps={eps!r} is too small for {sde!r} in {dtype}: the noise std at eps is {s:.3g}, at or below "
                f"{limit:.3g} (64 machine epsilons), so x_eps and x_0 are indistinguishable in this precision and "
                f"the score/divergence near t=eps is rounding noise; use a larger eps or float64")
    return eps


def _resolve_prior(sde: SDE, prior) -> Callable[[Tensor], Tensor]:
    if isinstance(prior, str):
        if prior != "sde":
            raise ValueError(f"unknown prior {prior!r}; use 'sde' (sde.prior_log_prob) or a callable log p_T(x)")
        return sde.prior_log_prob
    if callable(prior):
        return prior
    raise TypeError(f"prior must be 'sde' or a callable log p_T(x) -> (B,), got {type(prior).__name__}")


# ---------------------------------------------------------------------------------------------- differentiability
_CUT_MESSAGE = (
    "score_fn's output does not depend on x through autograd{detail}: it was computed under "
    "torch.no_grad(), from x.detach(), or through numpy (or another library outside torch). "
    "log_likelihood needs the derivative d score / d x for the divergence of the probability-flow "
    "drift and would return a wrong log p without it. Compute the score from x with torch operations "
    "and autograd enabled (a guided score: sdegen.guidance.classifier_grad keeps its term differentiable); "
    "a score that is truly constant in x can be returned as c + 0 * x.")


class _DifferentiableScore:
    r"""Wrap a score function and refuse an output cut from the autograd graph of ``x`` (final class).

    Checked whenever ``x`` requires grad under enabled autograd (the likelihood's divergence
    evaluations): the output must require grad (free: a flag, no device sync), and on the first such
    call it must reach ``x`` in the graph, one extra vector-Jacobian product with ``allow_unused``
    (an output that requires grad only through model parameters, from ``x.detach()``, does not).
    """

    def __init__(self, score_fn: Callable[..., Tensor]):
        self.score_fn = score_fn
        self.checked = False

    def __call__(self, x: Tensor, t: Tensor, **model_kwargs) -> Tensor:
        out = self.score_fn(x, t, **model_kwargs)
        if not (isinstance(out, Tensor) and x.requires_grad and torch.is_grad_enabled()):
            return out                      # shape/type errors are CountingScore's to report
        if not out.requires_grad:
            raise ValueError(_CUT_MESSAGE.format(detail=" (the output has requires_grad=False)"))
        if not self.checked:
            (g,) = torch.autograd.grad(out, x, torch.ones_like(out), retain_graph=True, allow_unused=True)
            if g is None:
                raise ValueError(_CUT_MESSAGE.format(
                    detail=" (the output requires grad, but only through other tensors such as model parameters)"))
            self.checked = True
        return out


# ---------------------------------------------------------------------------------------------- divergences
def _draw_probes(shape, dist: str, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Probes on the generator's device (reproducible), moved to ``like``'s device."""
    device = generator.device if generator is not None else like.device
    if dist == "rademacher":
        z = torch.randint(0, 2, shape, generator=generator, device=device).to(like.dtype) * 2 - 1
    else:
        z = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return z.to(like.device)


def _vjp_batched(out: Tensor, xr: Tensor, vs: Tensor, counter: list[int]) -> Tensor:
    """``vs[i]^T d out / d xr`` for every ``i`` (``vs``: ``(n, *out.shape)``), graph kept for reuse."""
    counter[0] += vs.shape[0]
    try:
        (g,) = torch.autograd.grad(out, xr, vs, retain_graph=True, is_grads_batched=True)
        return g
    except (RuntimeError, NotImplementedError):
        # The score function uses an operation vmap cannot batch: one backward pass per vector.
        return torch.stack([torch.autograd.grad(out, xr, v, retain_graph=True)[0] for v in vs])


def _exact_divergence(out: Tensor, xr: Tensor, counter: list[int]) -> Tensor:
    r"""$\mathrm{tr}(\partial\,\text{out}/\partial x)$ per sample from $d$ VJPs with basis vectors. ``(B,)``."""
    B = out.shape[0]
    d = out[0].numel()
    chunk = max(1, min(d, _MAX_VJP_ENTRIES // max(1, B * d)))
    eye = torch.eye(d, device=out.device, dtype=out.dtype)
    div = torch.zeros(B, device=out.device, dtype=out.dtype)
    for start in range(0, d, chunk):
        basis = eye[start:start + chunk]                                    # (c, d)
        vs = basis[:, None, :].expand(basis.shape[0], B, d).reshape(basis.shape[0], *out.shape)
        g = _vjp_batched(out, xr, vs, counter).reshape(basis.shape[0], B, d)
        # g[i, b, :] = e_i^T J_b, so the diagonal entries are g[i, b, start + i].
        idx = torch.arange(start, start + basis.shape[0], device=out.device)
        div = div + g.gather(2, idx[:, None, None].expand(-1, B, 1)).squeeze(2).sum(0)
    return div


def _hutchinson_divergence(out: Tensor, xr: Tensor, probes: Tensor, counter: list[int]) -> Tensor:
    r"""$\tfrac1P \sum_p z_p^\top J z_p$ per sample. ``probes``: ``(P, B, *D)``. Returns ``(B,)``."""
    B = out.shape[0]
    if probes.shape[0] == 1:
        counter[0] += 1
        (g,) = torch.autograd.grad(out, xr, probes[0], retain_graph=True)
        g = g[None]
    else:
        g = _vjp_batched(out, xr, probes, counter)
    return (g * probes).reshape(probes.shape[0], B, -1).sum(-1).mean(0)


# ---------------------------------------------------------------------------------------------- integration
def _check_method(method, per_sample: bool) -> str:
    """``method`` names an integrator of the table; ``per_sample=True`` needs a native one."""
    _check_choice(method, "method", tuple(ODE_INTEGRATORS))
    if per_sample and not ODE_INTEGRATORS[method].native:
        native = tuple(name for name, integ in ODE_INTEGRATORS.items() if integ.native)
        raise ValueError(f"per_sample=True needs a native integrator, method one of {', '.join(map(repr, native))}; "
                         f"got method={method!r}")
    return method


def _solve(fn, y0: Tensor, t0: float, t1: float, method: str, rtol: float, atol: float, per_sample: bool,
           progress: bool, options: dict) -> tuple[Tensor, dict]:
    if per_sample:
        options = {**options, "per_sample": True}   # native integrators only (`_check_method`)
    y1, stats, _ = ODE_INTEGRATORS[method].integrate(fn, y0, t0, t1, rtol=rtol, atol=atol, progress=progress,
                                                     **options)
    return y1, stats


def _merge_stats(total: dict, stats: dict) -> None:
    for k, v in stats.items():
        if isinstance(v, int) and not isinstance(v, bool):
            total[k] = total.get(k, 0) + v


def _chunks(B: int, batch_size: int | None):
    if batch_size is None:
        return [slice(0, B)]
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    return [slice(i, min(B, i + batch_size)) for i in range(0, B, batch_size)]


def log_likelihood(
    sde: SDE,
    score_fn: Callable[..., Tensor],
    x: Tensor,
    *,
    divergence: str = "exact",
    probes: int = 1,
    probe_dist: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    method: str = "rk45",
    prior: str | Callable[[Tensor], Tensor] = "sde",
    batch_size: int | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
    per_sample: bool = False,
    model_kwargs: dict | None = None,
    **solver_options,
) -> LikelihoodResult:
    r"""Log-likelihood $\log p_\epsilon(x)$ by the probability-flow ODE and the change of variables.

    Integrates $\frac{d}{dt}(x_t, \ell_t) = (\tilde f(x_t, t), \nabla\cdot\tilde f(x_t, t))$ from
    $(x, 0)$ at $t = \epsilon$ up to $t = T$ and returns $\log p_T(x_T) + \ell_T$ (Song et al. 2021,
    App. D.2, eq. 39; see the module docstring). No autograd graph is kept between solver steps:
    each evaluation builds the graph of one score call, takes its VJPs and detaches.

    Which density is used at $T$: ``prior="sde"`` uses ``sde.prior_log_prob``, the SDE's Gaussian
    prior (an approximation of the true $p_T$); a callable ``prior(x_T) -> (B,)`` replaces it (e.g.
    the oracle's exact $p_T$).

    Args:
        sde: the forward SDE (any [`SDE`][sdegen.SDE]).
        score_fn: ``score_fn(x, t, **model_kwargs)`` approximating $\nabla_x\log p_t(x)$; must be
            differentiable in ``x`` by autograd (an output cut from the graph of ``x`` is refused).
        x: ``(B, *D)`` data points (treated as samples of $p_\epsilon$).
        divergence: ``"exact"`` ($d$ VJPs per evaluation, batched with ``vmap``; for small $d$) or
            ``"hutchinson"`` (``probes`` VJPs per evaluation).
        probes: number of Hutchinson probes per sample, averaged.
        probe_dist: ``"rademacher"`` or ``"gaussian"`` probes.
        rtol (float): relative ODE solver tolerance (on the augmented state).
        atol (float): absolute ODE solver tolerance (on the augmented state).
        eps: truncation time $\epsilon \in (0, T)$.
        method: an adaptive ODE integrator of
            [`ODE_INTEGRATORS`][sdegen.solvers.ode_integrators.ODE_INTEGRATORS] (`ODE_METHODS`):
            ``"rk45"`` (native), ``"torchdiffeq"`` or ``"scipy"``.
        prior: ``"sde"`` or a callable ``log p_T(x_T) -> (B,)``.
        batch_size: integrate in chunks of this many samples (memory); ``None``: one chunk.
            Probes are drawn for the whole batch first, so chunking does not change them.
        progress: tqdm bars (over chunks, and the solver's own).
        generator: source of the Hutchinson probes.
        per_sample: per-sample step sizes, in a native integrator (``rk45``): each sample's error is then
            controlled on its own, independent of the rest of the batch.
        model_kwargs: extra keyword arguments for every ``score_fn`` call.
        **solver_options (Any): passed to the integrator (e.g. ``max_steps=``, ``first_step=`` for rk45,
            ``solver=`` for the backends).

    Returns:
        [`LikelihoodResult`][sdegen.likelihood.LikelihoodResult] with ``log_prob`` ``(B,)`` in nats, its two parts, the latent
        $x_T$, ``nfe`` and ``stats``.

    Raises:
        ValueError: ``x`` has NaN/inf or a bad shape; ``eps`` outside $(0, T)$ or too small for the
            SDE in ``x``'s dtype; unknown ``divergence``, ``probe_dist``, ``method`` or ``prior``;
            ``score_fn``'s output does not depend on ``x`` through autograd (computed under
            ``torch.no_grad``, from ``x.detach()`` or through numpy), so its divergence is unknown.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
    _check_data(x)
    eps = _check_eps(sde, eps, x.dtype)
    _check_choice(divergence, "divergence", DIVERGENCES)
    _check_choice(probe_dist, "probe_dist", PROBE_DISTS)
    _check_method(method, per_sample)
    if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
        raise ValueError(f"probes must be a positive int, got {probes!r}")
    check_positive(rtol, "rtol")
    check_positive(atol, "atol")
    prior_fn = _resolve_prior(sde, prior)
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    score = CountingScore(_DifferentiableScore(score_fn), model_kwargs)
    dyn = Dynamics(sde, score)
    B = x.shape[0]
    d = x[0].numel()
    z_all = (_draw_probes((probes, *x.shape), probe_dist, generator, x) if divergence == "hutchinson" else None)
    vjps = [0]
    pieces = {"latent": [], "delta": []}
    totals: dict = {}
    chunks = _chunks(B, batch_size)
    bar = progress_bar(progress and len(chunks) > 1, B, "log_likelihood")
    for sl in chunks:
        xc = x[sl]
        shape = xc.shape
        zc = z_all[:, sl] if z_all is not None else None

        def fn(y: Tensor, t: Tensor, shape=shape, zc=zc) -> Tensor:
            with torch.enable_grad():
                xr = y[:, :d].detach().reshape(shape).requires_grad_(True)
                drift = dyn.ode_drift(xr, t)
                if zc is None:
                    div = _exact_divergence(drift, xr, vjps)
                else:
                    div = _hutchinson_divergence(drift, xr, zc, vjps)
            return torch.cat([drift.detach().reshape(shape[0], d), div.detach()[:, None]], dim=1)

        y0 = torch.cat([xc.detach().reshape(shape[0], d), xc.new_zeros(shape[0], 1)], dim=1)
        y1, stats = _solve(fn, y0, eps, sde.T, method, rtol, atol, per_sample, progress, solver_options)
        _merge_stats(totals, stats)
        pieces["latent"].append(y1[:, :d].reshape(shape))
        pieces["delta"].append(y1[:, d])
        if bar is not None:
            bar.update(shape[0])
    if bar is not None:
        bar.close()
    latent = torch.cat(pieces["latent"])
    delta = torch.cat(pieces["delta"])
    with torch.no_grad():
        prior_lp = prior_fn(latent)
    if not isinstance(prior_lp, Tensor) or prior_lp.shape != (B,):
        raise ValueError(f"prior(x_T) must return a tensor of shape ({B},), got "
                         f"{tuple(prior_lp.shape) if isinstance(prior_lp, Tensor) else type(prior_lp).__name__}")
    totals.update({"vjp": vjps[0], "chunks": len(chunks), "divergence": divergence, "method": method})
    return LikelihoodResult(log_prob=prior_lp + delta, prior_log_prob=prior_lp, delta_log_prob=delta,
                            latent=latent, nfe=score.nfe, stats=totals)


def _flow(sde: SDE, score_fn, x: Tensor, t0: float, t1: float, rtol, atol, method, per_sample, progress,
          model_kwargs, solver_options) -> Tensor:
    score = CountingScore(score_fn, model_kwargs)
    dyn = Dynamics(sde, score)
    _check_method(method, per_sample)
    check_positive(rtol, "rtol")
    check_positive(atol, "atol")
    with torch.no_grad():
        y, _ = _solve(dyn.ode_drift, x, t0, t1, method, rtol, atol, per_sample, progress, solver_options)
    return y


def encode(sde: SDE, score_fn: Callable[..., Tensor], x: Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
           eps: float = 1e-5, method: str = "rk45", per_sample: bool = False, progress: bool = False,
           model_kwargs: dict | None = None, **solver_options) -> Tensor:
    r"""Map data to its latent $x_T$ along the probability-flow ODE, from $t=\epsilon$ up to $T$.

    $x_T = x + \int_\epsilon^T \big[f(x_t, t) - \tfrac12 g(t)^2 s_\theta(x_t, t)\big]\,dt$ (Song et al.
    2021, eq. 13, Sec. 4.3 "uniquely identifiable encoding"). [`decode`][sdegen.likelihood.decode] (or ``sample(...,
    x_T=z)``) inverts it up to the solver tolerance. Only the score itself is integrated (no divergence,
    no derivative of the score), so a score computed without autograd gives the right latent here;
    [`log_likelihood`][sdegen.likelihood.log_likelihood] is the one that needs $\partial s/\partial x$.

    Args:
        sde (SDE): the forward SDE.
        score_fn (Callable): the score, ``score_fn(x, t, **model_kwargs)``.
        x: ``(B, *D)`` data, read as samples at time ``eps``.
        rtol (float): as in [`log_likelihood`][sdegen.likelihood.log_likelihood].
        atol (float): as in [`log_likelihood`][sdegen.likelihood.log_likelihood].
        eps (float): as in [`log_likelihood`][sdegen.likelihood.log_likelihood].
        method (str): as in [`log_likelihood`][sdegen.likelihood.log_likelihood].
        per_sample (bool): as in [`log_likelihood`][sdegen.likelihood.log_likelihood].
        progress (bool): as in [`log_likelihood`][sdegen.likelihood.log_likelihood].
        **solver_options (Any): passed to the integrator.

    Returns:
        ``(B, *D)`` latents on ``x``'s device and dtype.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
    _check_data(x)
    eps = _check_eps(sde, eps, x.dtype)
    return _flow(sde, score_fn, x, eps, sde.T, rtol, atol, method, per_sample, progress, model_kwargs,
                 solver_options)


def decode(sde: SDE, score_fn: Callable[..., Tensor], z: Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
           eps: float = 1e-5, method: str = "rk45", per_sample: bool = False, progress: bool = False,
           model_kwargs: dict | None = None, **solver_options) -> Tensor:
    r"""Inverse of [`encode`][sdegen.likelihood.encode]: integrate the probability-flow ODE from $T$ down to $\epsilon$.

    Args:
        z: ``(B, *D)`` latents at time ``T``. Other arguments as in [`encode`][sdegen.likelihood.encode].

    Returns:
        ``(B, *D)`` data at time ``eps``.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE, got {type(sde).__name__}")
    _check_data(z, "z")
    eps = _check_eps(sde, eps, z.dtype)
    return _flow(sde, score_fn, z, sde.T, eps, rtol, atol, method, per_sample, progress, model_kwargs,
                 solver_options)


# ---------------------------------------------------------------------------------------------- bits/dim
def _check_range(data_range, n_bits) -> tuple[float, float, int]:
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise TypeError(f"data_range must be a pair (lo, hi) of floats, got {data_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"data_range must satisfy lo < hi (finite), got {data_range!r}")
    if not isinstance(n_bits, int) or isinstance(n_bits, bool) or not 1 <= n_bits <= 16:
        raise ValueError(f"n_bits must be an int in [1, 16], got {n_bits!r}")
    return lo, hi, 2 ** n_bits


def _check_in_range(x: Tensor, lo: float, hi: float, name: str) -> None:
    slack = 1e-6 * (hi - lo)
    xmin, xmax = float(x.min()), float(x.max())
    if xmin < lo - slack or xmax > hi + slack:
        raise ValueError(f"{name} must lie in the declared data_range [{lo}, {hi}], got values in "
                         f"[{xmin:.6g}, {xmax:.6g}]")


def dequantize(x: Tensor, *, data_range: tuple[float, float] = (-1.0, 1.0), n_bits: int = 8,
               generator: torch.Generator | None = None) -> Tensor:
    r"""Uniform dequantization of $2^{n}$-level data.

    ``x`` holds quantized values on the grid $x = lo + k\,(hi - lo)/(K - 1)$, $k \in \{0, \dots, K-1\}$,
    $K = 2^{n}$ (e.g. 8-bit images scaled to ``data_range``). Returns
    $y = lo + (k + u)\,(hi - lo)/K$ with $u \sim U[0, 1)$ per entry: the bin of level $k$ in the
    continuous space (Theis et al. 2016; Ho et al. 2019, Sec. 3.1).

    Args:
        x: ``(B, *D)`` quantized data in ``data_range``.
        data_range: ``(lo, hi)``.
        n_bits: bits per entry.
        generator: source of the uniform noise.

    Returns:
        ``(B, *D)`` dequantized data in $[lo, hi)$.

    Raises:
        ValueError: ``x`` outside ``data_range`` or not on the $K$-level grid.
    """
    lo, hi, K = _check_range(data_range, n_bits)
    _check_data(x)
    _check_in_range(x, lo, hi, "x")
    raw = (x - lo) / (hi - lo) * (K - 1)
    k = raw.round()
    off = float((raw - k).abs().max())
    if off > 1e-3:
        raise ValueError(f"x is not {n_bits}-bit data on the grid lo + k (hi - lo)/{K - 1}: an entry is {off:.3g} "
                         f"levels off the nearest level")
    device = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return lo + (k + u) * ((hi - lo) / K)


def bits_per_dim(log_prob: Tensor, x: Tensor, *, data_range: tuple[float, float] = (-1.0, 1.0),
                 n_bits: int = 8) -> Tensor:
    r"""Bits per dimension of uniformly dequantized $2^{n}$-level data from a continuous log-density.

    Data in ``data_range`` $= [lo, hi]$ with $K = 2^{n}$ levels occupies bins of width
    $\Delta = (hi - lo)/K$. On the integer scale $[0, K)$ the density is $p(y)\,\Delta^{D}$, and the
    discrete model's log-likelihood is bounded below by $\mathbb E_u[\log p(y)] + D\log\Delta$ (Theis
    et al. 2016, eq. 6), hence

    $$\mathrm{bpd} = -\frac{\log p(y)}{D \ln 2} + \log_2\frac{K}{hi - lo},$$

    i.e. an offset of $\log_2(256/2) = 7$ bits for 8-bit data in $[-1, 1]$ and 8 bits in $[0, 1]$.
    With several dequantization draws, pass ``log_prob`` of shape ``(n_draws, B)``: the mean over
    draws is the Monte-Carlo estimate of the bound.

    Args:
        log_prob: ``(B,)`` or ``(n_draws, B)``, nats, evaluated at the dequantized data $y$.
        x: ``(B, *D)`` the dequantized data (for $D$ and the range check).
        data_range: ``(lo, hi)`` the data's declared range.
        n_bits: bits per entry of the original data.

    Returns:
        ``(B,)`` bits per dimension.

    Raises:
        ValueError: ``x`` outside ``data_range``; shapes that do not match.
    """
    lo, hi, K = _check_range(data_range, n_bits)
    _check_data(x)
    _check_in_range(x, lo, hi, "x")
    if not isinstance(log_prob, Tensor) or log_prob.ndim not in (1, 2) or log_prob.shape[-1] != x.shape[0]:
        raise ValueError(f"log_prob must have shape ({x.shape[0]},) or (n_draws, {x.shape[0]}), got "
                         f"{tuple(log_prob.shape) if isinstance(log_prob, Tensor) else type(log_prob).__name__}")
    lp = log_prob.mean(0) if log_prob.ndim == 2 else log_prob
    D = x[0].numel()
    return -lp / (D * math.log(2)) + math.log2(K / (hi - lo))
