r"""Conditional generation from an unconditional score: inpainting / imputation and colourization.

Known coordinates $x_K = y$ (``mask`` = 1), unknown $x_U$ (``mask`` = 0). The target is
$p_0(x_U \mid x_K = y)$. Three samplers, all on the decreasing grid $t_0 = T > \dots > t_n = \epsilon$:

``"replacement"`` (Song et al. 2021, App. I.2, "imputation"): a reverse-SDE predictor step on the full
state, then the known part is replaced by a fresh draw of the forward kernel,
$x_K \leftarrow m(t_1)\,y + s(t_1)\,z$. It approximates
$\nabla \log p_t(x_U \mid y)$ by $\nabla_{x_U} \log p_t(x_U, \hat x_K)$ with $\hat x_K$ one noisy copy of
$y$; this is **not exact**: the unknown part sees $y$ only through its noised version, so
correlations between $x_U$ and $x_K$ and the mixture weights of the conditional are shrunk at
large $t$ (the bias does not vanish with more steps; ``tests/test_conditional.py`` measures it).

``"masked_ode"``: the probability-flow ODE on $x_U$ with the known part on the forward path
$x_K(t) = m(t)\,y + s(t)\,z$ for one fixed $z$: deterministic given $(x_T, z)$, same approximation.

``"smc"``: a particle filter that is asymptotically exact (Trippe et al. 2023, "SMCDiff", Alg. 2).
The known part follows one path of the forward process *given* $x_0 = y$, generated backwards by the
exact posterior $q(x_{t_1} \mid x_{t_0}, x_0 = y)$ (the forward process is Markov, so this is the
same path law). $P$ particles per output propose $x_U$ with the ancestral reverse kernel
$\mathcal N(\mu(x_{t_0}), v)$ and are weighted by the likelihood of the known path under the same
kernel, $w \mathrel{*}= \mathcal N(x_K^{t_1}; \mu_K(x_{t_0}), v)$, with systematic resampling when the
effective sample size falls below ``ess_threshold`` $\cdot P$. Because the forward noise of
$x_K$ is independent of $x_U$ given $x_0$, $p(x_U^0 \mid x_K^{0:T}) = p(x_U^0 \mid y)$, which the filter
targets as $P \to \infty$ (bias $O(1/P)$ plus the $O(1/n)$ of the ancestral kernel). Cost: $P$ times
the batch. ``nfe`` counts score calls (each on $B\cdot P$ rows).

**Colourization** (Song et al. 2021, App. I.2) observes a known orthogonal map of the data: with
$Q$ orthogonal on the channel axis, $x' = Qx$ diffuses under the same isotropic SDE with score
$Q\,s(Q^\top x', t)$, so it is inpainting of the first row of $Q x$ (the grey level) in the rotated
coordinates (``transform=Q``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from ._utils import append_dims, check_floating, check_number, check_positive
from .sdes import AffineSDE
from .solvers.base import AbstractFixedGridSolver, CountingScore, Dynamics, NonFiniteError, SampleResult, \
    integrate_fixed_grid
from .sampling import METHODS, RunContext
from .solvers.correctors import LangevinCorrector, PredictorCorrector
from .solvers.marginal_rows import GridCoefficients
from .solvers.ode_steps import ODEEuler, ODEHeun
from .solvers.sde_steps import Ancestral, EulerMaruyama, ReverseDiffusion, ancestral_table

__all__ = ["inpaint", "colorize", "INPAINT_METHODS", "gray_transform", "inpaint_predictors"]


# ---------------------------------------------------------------------------------------------- solvers
@dataclass(frozen=True, eq=False)
class _Replacement(AbstractFixedGridSolver):
    r"""Wrap a step rule: after each step, $x_K \leftarrow m(t_1)\,y + s(t_1)\,z$.

    Stochastic inner rules: $z$ is the step's own unit draw on the known entries ($dw/\sqrt{|\Delta t|}$),
    which the inner rule used only for those entries (all rules here act entrywise on the noise), so
    it is fresh and independent of the unknown part. Deterministic rules: $z$ = ``z_fixed``.
    """

    inner: AbstractFixedGridSolver
    known: Tensor = field(repr=False)       # y, (B, *D)
    mask: Tensor = field(repr=False)        # 1 = known, broadcastable to (B, *D)
    z_fixed: Tensor | None = field(default=None, repr=False)
    order: ClassVar[float] = 1.0

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.inner.stochastic

    @property
    def evals_per_step(self) -> int:  # type: ignore[override]
        return self.inner.evals_per_step

    def prepare(self, coefs: GridCoefficients) -> "_Replacement":
        """The wrapper around the inner rule prepared for the grid of ``coefs`` (the loop prepares only the wrapper)."""
        inner = self.inner.prepare(coefs)
        return self if inner is self.inner else replace(self, inner=inner)

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        return self.inner.init_state(dyn, x, t0)

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        x, err, state = self.inner.step(dyn, x, t0, t1, state, dw)
        z = self.z_fixed if dw is None else dw / append_dims((t0 - t1).abs().sqrt(), dw.ndim)
        m, s = dyn.affine.marginal(t1)
        noisy = append_dims(m, x.ndim) * self.known + append_dims(s, x.ndim) * z
        return torch.where(self.mask, noisy, x), err, state


@dataclass(frozen=True, eq=False)
class _SMC(AbstractFixedGridSolver):
    r"""SMCDiff step on particles ``(B*P, *D)``: ancestral proposal, known-path weights, resampling.

    State: ``(k, log_w)`` with ``log_w`` ``(B, P)``. Ancestral coefficients from ``table`` (columns
    ``1/r, q^2/r, sqrt(v/|dt|)``); the known path moves by the exact posterior
    $q(x_{t_1} \mid x_{t_0}, y)$ with mean $\frac{r s_1^2}{s_0^2} x_{t_0} + \frac{m_1 q^2}{s_0^2} y$, variance $v$.
    """

    table: Tensor = field(repr=False)
    known: Tensor = field(repr=False)       # y repeated per particle, (B*P, *D)
    mask: Tensor = field(repr=False)
    particles: int = 16
    ess_threshold: float = 0.5
    generator: torch.Generator | None = field(default=None, repr=False)
    order: ClassVar[float] = 1.0
    stochastic: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 1

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        B = x.shape[0] // self.particles
        tab = self.table.to(device=x.device, dtype=x.dtype)
        return 0, tab, torch.zeros(B, self.particles, device=x.device, dtype=x.dtype), 0

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        k, tab, log_w, n_resampled = state
        a, b, c = tab[k]
        mean = a * x + b * dyn.score(x, t0)
        var = c.square() * (t0 - t1).abs()[0]
        z = dw / append_dims((t0 - t1).abs().sqrt(), dw.ndim)
        # Known path: exact posterior of the forward process given x_0 = y (same unit draw z on K).
        sde = dyn.affine
        # The loop's times are one value expanded over the batch: compute the coefficients once.
        m0, s0 = sde.marginal(t0[:1])
        m1, s1 = sde.marginal(t1[:1])
        r = m0 / m1
        q2 = s0.square() - (r * s1).square()
        post = (append_dims(r * s1.square() / s0.square(), x.ndim) * x
                + append_dims(m1 * q2 / s0.square(), x.ndim) * self.known)
        path = post + var.sqrt() * z
        x_new = torch.where(self.mask, path, mean + c * dw)
        # Weight: the reverse kernel's density of the known path (constants cancel across particles).
        resid = torch.where(self.mask, path - mean, torch.zeros_like(x))
        log_w = log_w + (-0.5 * resid.square().flatten(1).sum(1) / var).reshape(log_w.shape)
        log_w = log_w - log_w.max(dim=1, keepdim=True).values
        x_new, log_w, did = _maybe_resample(x_new, log_w, self.ess_threshold, self.generator)
        return x_new, None, (k + 1, tab, log_w, n_resampled + did)


def _systematic(log_w: Tensor, n_out: int, generator: torch.Generator | None) -> Tensor:
    """Systematic resampling indices ``(B, n_out)`` into each row's particles (Kitagawa 1996)."""
    w = torch.softmax(log_w, dim=1)
    cdf = w.cumsum(1)
    cdf[:, -1] = 1.0
    u = torch.rand(log_w.shape[0], 1, generator=generator, device=log_w.device, dtype=log_w.dtype)
    pos = (u + torch.arange(n_out, device=log_w.device, dtype=log_w.dtype)) / n_out
    return torch.searchsorted(cdf, pos).clamp_max(log_w.shape[1] - 1)


def _take(x: Tensor, idx: Tensor, P: int) -> Tensor:
    """Rows of ``x`` (``(B*P, *D)``) picked by per-group indices ``idx`` (``(B, n)``)."""
    B = idx.shape[0]
    flat = (idx + torch.arange(B, device=idx.device)[:, None] * P).reshape(-1)
    return x[flat]


def _maybe_resample(x: Tensor, log_w: Tensor, threshold: float, generator) -> tuple[Tensor, Tensor, int]:
    w = torch.softmax(log_w, dim=1)
    ess = 1.0 / w.square().sum(1)                        # (B,)
    P = log_w.shape[1]
    low = ess < threshold * P
    # One host read per step decides whether any group resamples (an SMC step needs it anyway).
    if not bool(low.any()):
        return x, log_w, 0
    idx = _systematic(log_w, P, generator)
    keep = torch.arange(P, device=x.device).expand_as(idx)
    idx = torch.where(low[:, None], idx, keep)
    log_w = torch.where(low[:, None], torch.zeros_like(log_w), log_w)
    return _take(x, idx, P), log_w, 1


# ---------------------------------------------------------------------------------------------- helpers
class _RotatedScore:
    r"""Score in rotated coordinates $x' = Qx$ along dim 1: $s'(x', t) = Q\,s(Q^\top x', t)$ (final class)."""

    def __init__(self, score_fn: Callable, Q: Tensor):
        self.score_fn, self.Q = score_fn, Q

    def __call__(self, x: Tensor, t: Tensor, **model_kwargs) -> Tensor:
        Q = self.Q.to(device=x.device, dtype=x.dtype)
        return _apply(Q, self.score_fn(_apply(Q.T, x), t, **model_kwargs))


def _apply(Q: Tensor, x: Tensor) -> Tensor:
    """$Q x$ along dim 1 of ``x`` ``(B, C, *S)``."""
    return torch.einsum("ij,bj...->bi...", Q, x)


def gray_transform(channels: int = 3, *, dtype=torch.float64, device=None) -> Tensor:
    r"""An orthogonal ``(C, C)`` matrix whose first row is $(1, \dots, 1)/\sqrt C$.

    Row 0 of $Qx$ is $\sqrt C$ times the channel mean (the grey level); the other rows complete an
    orthonormal basis (Gram–Schmidt of the standard basis after the all-ones vector, via QR).
    """
    if not isinstance(channels, int) or channels < 2:
        raise ValueError(f"channels must be an int >= 2, got {channels!r}")
    A = torch.eye(channels, dtype=torch.float64)
    A[:, 0] = 1.0
    Qm, R = torch.linalg.qr(A)
    Qm = Qm * torch.sign(torch.diagonal(R))[None, :]       # make column 0 point along +ones
    return Qm.T.contiguous().to(device=device, dtype=dtype)


def _choice(value, table, name: str):
    if value not in table:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, table))}")
    return table[value]


def _check_int(value, name: str, lo: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


# Inpainting's own forms of the first predictors (the generic steps on the given grid; ancestral is the
# posterior step on it, not the VP DDPM chain); every other fixed-grid method of sdegen.METHODS is a
# predictor too, built by its own builder with its own defaults (reverse-SDE methods for "replacement",
# the others for "masked_ode").
_SDE_PREDICTORS = {"reverse_diffusion": lambda ctx: ReverseDiffusion(),
                   "euler_maruyama": lambda ctx: EulerMaruyama(),
                   "ancestral": lambda ctx: Ancestral(ancestral_table(ctx.sde, ctx.times))}
_ODE_PREDICTORS = {"ode_heun": lambda ctx: ODEHeun(), "ode_euler": lambda ctx: ODEEuler()}


def inpaint_predictors(ode: bool) -> dict[str, Callable]:
    """Predictors of ``"masked_ode"`` (``ode=True``) or ``"replacement"``: name -> ``build(ctx)``, read from
    [`sdegen.METHODS`][sdegen.sampling.METHODS] (so a new fixed-grid method is an inpainting predictor)."""
    special = _ODE_PREDICTORS if ode else _SDE_PREDICTORS
    rows = {name: functools.partial(_table_predictor, spec) for name, spec in METHODS.items()
            if spec.build is not None and name != "pc" and spec.reverse_sde != ode and name not in special}
    return {**special, **rows}


def _table_predictor(spec, ctx: RunContext) -> AbstractFixedGridSolver:
    return spec.build(ctx, dict(spec.options))

#: Inpainting methods with their options and defaults.
INPAINT_METHODS: dict[str, dict[str, Any]] = {
    "replacement": {"steps": 500, "predictor": "reverse_diffusion", "corrector": None, "snr": 0.16,
                    "corrector_steps": 1, "denoise": True},
    "masked_ode": {"steps": 200, "predictor": "ode_heun", "denoise": False},
    "smc": {"steps": 500, "particles": 16, "ess_threshold": 0.5, "denoise": True},
}


# ---------------------------------------------------------------------------------------------- entry points
def inpaint(sde: AffineSDE, score_fn: Callable[..., Tensor], x_known: Tensor, mask: Tensor, *,
            method: str = "replacement", eps: float = 1e-3, generator: torch.Generator | None = None,
            x_T: Tensor | None = None, model_kwargs: dict | None = None, transform: Tensor | None = None,
            progress: bool = False, return_trajectory: bool | int = False, **options) -> SampleResult:
    r"""Sample $x_U \sim p_0(x_U \mid x_K = y)$ given known entries (``mask`` = 1) of ``x_known``.

    See the module docstring for the three methods and which are exact. Integrates from ``T`` down to
    ``eps`` on the uniform grid with ``steps`` steps.

    Methods and options (defaults in `INPAINT_METHODS`):

    - ``"replacement"``: ``steps=500``, ``predictor`` in ``"reverse_diffusion"`` (default),
      ``"euler_maruyama"``, ``"ancestral"`` or any other reverse-SDE fixed-grid method of
      [`sdegen.METHODS`][sdegen.sampling.METHODS] (with its own default options and grid); ``corrector=None`` or ``"langevin"`` (``snr=0.16``,
      ``corrector_steps=1``; Song et al. 2021, Alg. 5, on the whole state before replacement);
      ``denoise=True``.
    - ``"masked_ode"``: ``steps=200``, ``predictor`` in ``"ode_heun"`` (default), ``"ode_euler"`` or any
      other probability-flow fixed-grid method of [`sdegen.METHODS`][sdegen.sampling.METHODS];
      ``denoise=False``.
    - ``"smc"``: ``steps=500``, ``particles=16`` per output, ``ess_threshold=0.5``; ``denoise=True``.

    ``denoise`` ends with Tweedie's step $\hat x_0 = (x + s^2 s_\theta)/m$ at $\epsilon$ (one more score
    call). The returned known entries are exactly ``x_known``.

    Args:
        sde: an affine SDE (the forward kernel re-noises the known part).
        score_fn: unconditional ``score_fn(x, t, **model_kwargs)``.
        x_known: ``(B, *D)`` with the known values (entries where ``mask`` = 0 are ignored).
        mask: 1/True = known; bool or 0/1 tensor broadcastable to ``x_known`` (e.g. ``(1, *D)``).
        method: ``"replacement"``, ``"masked_ode"`` or ``"smc"``.
        eps: final time in ``(0, T)``.
        generator: source of all randomness.
        x_T: optional start ``(B, *D)`` (its known entries are overwritten); ``"smc"`` draws its own.
        model_kwargs: passed to every score call (for ``"smc"``, tensors with leading dimension
            ``B`` are repeated per particle).
        transform: optional orthogonal ``(C, C)`` matrix $Q$: ``x_known`` and ``mask`` then describe
            $x' = Qx$ (mixing along dim 1), and the samples are returned as $x = Q^\top x'$.
        progress: tqdm bar.
        return_trajectory: as in [`sdegen.sample`][sdegen.chunked.sample] (in $x'$ coordinates).

    Returns:
        [`SampleResult`][sdegen.SampleResult] ``(B, *D)``; ``stats`` has the method, options and, for
        ``"smc"``, the number of resampling steps.

    Raises:
        ValueError: unknown method/option values, shape mismatches, a non-orthogonal ``transform``.
        TypeError: unknown options, non-affine SDE, non-floating ``x_known``.
    """
    if not isinstance(sde, AffineSDE):
        raise TypeError(f"sde must be an sdegen.AffineSDE (the forward kernel re-noises the known part), "
                        f"got {type(sde).__name__}")
    check_floating(x_known, "x_known")
    if x_known.ndim < 2:
        raise ValueError(f"x_known must have shape (B, *D), got {tuple(x_known.shape)}")
    defaults = _choice(method, INPAINT_METHODS, "method")
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"method {method!r} got unknown option(s) {', '.join(unknown)}; "
                        f"valid options: {', '.join(sorted(defaults))}")
    opts = {**defaults, **options}
    steps = _check_int(opts["steps"], "steps", 1)
    eps = check_number(eps, "eps")      # True and "0.01" refused
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps!r}")
    mask = _check_mask(mask, x_known)
    y = torch.where(mask, x_known, torch.zeros_like(x_known))
    if transform is not None:
        Q = _check_orthogonal(transform, x_known)
        score_fn = _RotatedScore(score_fn, Q)
    if isinstance(return_trajectory, bool):
        record_every = 1 if return_trajectory else None
    else:
        record_every = _check_int(return_trajectory, "return_trajectory", 1)
    counted = CountingScore(score_fn, model_kwargs if method != "smc" else
                            _repeat_kwargs(model_kwargs, x_known.shape[0], opts["particles"]))
    dyn = Dynamics(sde, counted)
    times = torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64)
    B = x_known.shape[0]
    dev, dt = x_known.device, x_known.dtype
    stats: dict[str, Any] = {"method": method, **opts}
    with torch.no_grad():
        if method == "smc":
            if x_T is not None:
                raise ValueError("method 'smc' draws its own particles; x_T must be None")
            x, traj, n_res = _run_smc(dyn, y, mask, times, opts, generator, progress, record_every)
            stats["resampling_steps"] = n_res
        else:
            if x_T is None:
                x_T = sde.prior_sample(tuple(x_known.shape), generator=generator, device=dev, dtype=dt)
            elif not isinstance(x_T, Tensor) or x_T.shape != x_known.shape:
                raise ValueError(f"x_T must be a tensor of shape {tuple(x_known.shape)}, got "
                                 f"{getattr(x_T, 'shape', type(x_T).__name__)}")
            z = torch.randn(x_known.shape, generator=generator, device=dev, dtype=dt)
            m, s = sde.marginal(torch.full((B,), sde.T, device=dev, dtype=dt))
            x = torch.where(mask, append_dims(m, y.ndim) * y + append_dims(s, y.ndim) * z, x_T)
            ctx = RunContext(sde, dyn, x, eps, steps, generator, None, bool(progress), record_every, method, times)
            solver = _build_replacement(method, opts, ctx, y, mask, z)
            times = ctx.times          # a predictor with a grid of its own (e.g. dpm_solver's) set it
            x, traj, _ = integrate_fixed_grid(solver, dyn, x, times, generator=generator, progress=progress,
                                              record_every=record_every, desc=f"inpaint:{method}")
        if opts["denoise"]:
            t = torch.full((x.shape[0],), eps, device=dev, dtype=dt)
            x = sde.x0_from_score(x, t, dyn.score(x, t))
            times = torch.cat([times, times.new_zeros(1)])
        x = torch.where(mask, y, x)
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError("inpainting produced NaN/inf (the score function likely returned them)")
        if transform is not None:
            x = _apply(Q.to(device=dev, dtype=dt).T, x)
    return SampleResult(samples=x, nfe=counted.nfe, trajectory=traj, times=times, stats=stats)


def _build_replacement(method, opts, ctx: RunContext, y, mask, z) -> _Replacement:
    x, generator = ctx.x, ctx.generator
    if method == "masked_ode":
        inner = _choice(opts["predictor"], inpaint_predictors(ode=True), "predictor")(ctx)
        return _Replacement(inner, y, mask, z)
    inner = _choice(opts["predictor"], inpaint_predictors(ode=False), "predictor")(ctx)
    corrector = _choice(opts["corrector"], {None: None, "langevin": LangevinCorrector}, "corrector")
    if corrector is not None:
        n_corr = _check_int(opts["corrector_steps"], "corrector_steps", 1)
        draw = lambda k: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # noqa: E731
        inner = PredictorCorrector(inner, corrector(snr=check_positive(opts["snr"], "snr")), n_corr, draw)
    return _Replacement(inner, y, mask)


def _run_smc(dyn: Dynamics, y: Tensor, mask: Tensor, times: Tensor, opts: dict, generator, progress, record_every):
    P = _check_int(opts["particles"], "particles", 1)
    thr = check_number(opts["ess_threshold"], "ess_threshold")
    if not 0.0 <= thr <= 1.0:
        raise ValueError(f"ess_threshold must lie in [0, 1], got {opts['ess_threshold']!r}")
    sde = dyn.affine
    B = y.shape[0]
    yp = y.repeat_interleave(P, 0)
    maskp = mask if mask.shape[0] == 1 else mask.repeat_interleave(P, 0)
    dev, dt = y.device, y.dtype
    # Start: unknown from the prior, known from the forward marginal q(x_T | y) (shared by a group's particles).
    x = sde.prior_sample(tuple(yp.shape), generator=generator, device=dev, dtype=dt)
    m, s = sde.marginal(torch.full((B,), sde.T, device=dev, dtype=dt))
    zk = torch.randn(y.shape, generator=generator, device=dev, dtype=dt)
    xk = (append_dims(m, y.ndim) * y + append_dims(s, y.ndim) * zk).repeat_interleave(P, 0)
    x = torch.where(maskp, xk, x)
    solver = _SMC(ancestral_table(sde, times), yp, maskp, P, thr, generator)
    noise = _GroupNoise(yp.shape, P, maskp, generator, dt)
    x, traj, state = integrate_fixed_grid(solver, dyn, x, times, generator=generator, noise=noise,
                                          progress=progress, record_every=record_every, desc="inpaint:smc")
    _, _, log_w, n_res = state
    pick = _systematic(log_w, 1, generator)                 # one particle per output, drawn by weight
    return _take(x, pick, P), traj, n_res


class _GroupNoise:
    """Unit draws where a group's particles share the known entries' noise (one known path per output)."""

    def __init__(self, shape, P: int, mask: Tensor, generator, dtype: torch.dtype):
        self.shape, self.P, self.mask, self.generator, self.dtype = tuple(shape), P, mask, generator, dtype

    def __call__(self, i: int) -> Tensor:
        z = torch.randn(self.shape, generator=self.generator, device=self.mask.device, dtype=self.dtype)
        shared = z[:: self.P].repeat_interleave(self.P, 0)
        return torch.where(self.mask, shared, z)


def _repeat_kwargs(model_kwargs: dict | None, B: int, P: int) -> dict:
    out = {}
    for k, v in (model_kwargs or {}).items():
        out[k] = v.repeat_interleave(P, 0) if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == B else v
    return out


def _check_mask(mask, x_known: Tensor) -> Tensor:
    mask = torch.as_tensor(mask, device=x_known.device)
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must contain only 0/1 (or be boolean), 1 = known")
        mask = mask == 1
    try:
        torch.broadcast_shapes(mask.shape, x_known.shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x_known "
                         f"{tuple(x_known.shape)}") from None
    if mask.ndim != x_known.ndim or mask.shape[0] not in (1, x_known.shape[0]):
        raise ValueError(f"mask must have x_known's number of dims ({x_known.ndim}) and batch size 1 or "
                         f"{x_known.shape[0]}, got {tuple(mask.shape)}")
    return mask


def _check_orthogonal(Q, x: Tensor) -> Tensor:
    Q = torch.as_tensor(Q).to(torch.float64)
    C = x.shape[1]
    if Q.shape != (C, C):
        raise ValueError(f"transform must be a ({C}, {C}) matrix acting on dim 1 of x_known, got {tuple(Q.shape)}")
    err = float((Q @ Q.T - torch.eye(C, dtype=torch.float64)).abs().max())
    if err > 1e-6:
        raise ValueError(f"transform must be orthogonal (Q Q^T = I); max deviation {err:.3g}")
    return Q


def colorize(sde: AffineSDE, score_fn: Callable[..., Tensor], gray: Tensor, *, channels: int = 3,
             method: str = "replacement", **options) -> SampleResult:
    r"""Sample colour data ``(B, C, *S)`` whose channel mean is ``gray`` (Song et al. 2021, App. I.2).

    With $Q$ = [`gray_transform`][sdegen.conditional.gray_transform] (first row $\mathbf 1/\sqrt C$), the grey image fixes
    $(Qx)_0 = \sqrt C\,\text{gray}$; the other rotated channels are inpainted by [`inpaint`][sdegen.conditional.inpaint]
    with ``transform=Q``, and the result is rotated back. Options as in [`inpaint`][sdegen.conditional.inpaint].

    Args:
        gray: ``(B, 1, *S)`` channel means (or ``(B, *S)``, a channel axis is added).
        channels: $C$, the number of colour channels.
    """
    check_floating(gray, "gray")
    if gray.ndim < 2 or gray.shape[1] != 1:
        gray = gray.unsqueeze(1)
    Q = gray_transform(channels, dtype=torch.float64)
    x_known = torch.zeros(gray.shape[0], channels, *gray.shape[2:], device=gray.device, dtype=gray.dtype)
    x_known[:, :1] = math.sqrt(channels) * gray
    mask = torch.zeros(1, channels, *gray.shape[2:], dtype=torch.bool, device=gray.device)
    mask[:, 0] = True
    return inpaint(sde, score_fn, x_known, mask, method=method, transform=Q, **options)
