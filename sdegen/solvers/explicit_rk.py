r"""One explicit Runge–Kutta core: an attempted step of any Butcher tableau, with an error slot.

For a term $dx = v(x, t)\,dt + \sigma(t)\,dW$ (additive noise; $\sigma \equiv 0$ for an ODE), a tableau
$(c, a, b, \hat b)$ with $s$ stages and a signed step $h = t_1 - t_0$ (negative when sampling, which
runs forward time from ``T`` down to ``eps``) and a Brownian increment $\Delta W$ of variance $|h|$:

$$k_i = v\Big(y + h \sum_{j<i} a_{ij} k_j + c_i\,\sigma(t_0)\,\Delta W,\ t_0 + c_i h\Big),$$
$$y_{new} = y + h \sum_i b_i k_i + \sum_i b_i\,\sigma(t_0 + c_i h)\,\Delta W, \qquad
  e = h \sum_i (b_i - \hat b_i)\, k_i + \sum_i (b_i - \hat b_i)\,\sigma(t_0 + c_i h)\,\Delta W.$$

Without noise this is the explicit RK step of Hairer, Nørsett & Wanner, "Solving ODEs I", Sec. II.4
(`sdegen.solvers.tableaus.DOPRI5`). With the two-stage pair `sdegen.solvers.tableaus.EM_HEUN`
($c = (0, 1)$, $a_{21} = 1$, $b = (\tfrac12, \tfrac12)$, $\hat b = (1, 0)$) the stage-2 input is the
Euler–Maruyama step $x' = x + h k_1 + \sigma(t_0)\Delta W$, $y_{new}$ the improved-Euler step
$x'' = x + \tfrac h2 (k_1 + k_2) + \tfrac12(\sigma(t_0) + \sigma(t_1))\Delta W$ and $e = x'' - x'$:
the adaptive pair of Jolicoeur-Martineau et al. (2021), "Gotta Go Fast", Alg. 1.

The error is measured by a norm the solver declares ([`ErrorNorm`][sdegen.solvers.explicit_rk.ErrorNorm]):
$\|e\| = \sqrt{\tfrac1N \sum_i (e_i / \delta_i)^2}$ with
$\delta = \text{atol} + \text{rtol}\max(|y|, |y_{new}|)$ (Hairer–Nørsett–Wanner eq. II.4.11) or
$\delta = \max(\text{atol}, \text{rtol}\max(|y|, |\hat y|))$, $\hat y = y_{new} - e$ the embedded
solution (Jolicoeur-Martineau et al. 2021, Alg. 1); $N$ counts the entries of one sample
(``per_sample``) or of the whole batch.

Two implementations of the same step: [`rk_attempt`][sdegen.solvers.explicit_rk.rk_attempt] with fresh
tensors per stage (differentiable; any term) and `BufferStepper`, the no-grad batched fast path
for ODEs (stages in preallocated buffers: the per-step overhead of a small-batch solve is these
tensor operations).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from .._utils import append_dims
from .tableaus import DOPRI5, EM_HEUN, ButcherTableau

__all__ = ["ErrorNorm", "HAIRER_NORM", "MIXED_MAX_NORM", "ODETerm", "rk_attempt", "AbstractExplicitRK",
           "Dopri5", "EulerHeun", "TableauRK", "ListStepper", "BufferStepper"]

ODEFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ErrorNorm:
    r"""How an adaptive solver scales its error estimate $e$ (data).

    Attributes:
        mix: ``"sum"``: $\delta = \text{atol} + \text{rtol}\,m$ (Hairer–Nørsett–Wanner eq. II.4.11);
            ``"max"``: $\delta = \max(\text{atol}, \text{rtol}\,m)$ (Jolicoeur-Martineau et al. 2021).
        reference: ``"solution"``: $m = \max(|y|, |y_{new}|)$; ``"embedded"``: $m = \max(|y|, |\hat y|)$.
    """

    mix: str
    reference: str

    def __post_init__(self):
        if self.mix not in ("sum", "max") or self.reference not in ("solution", "embedded"):
            raise ValueError(f"ErrorNorm(mix in sum/max, reference in solution/embedded), got {self!r}")

    def scale(self, y: Tensor, ref: Tensor, rtol: float, atol: float) -> Tensor:
        r"""$\delta$ from $|y|$ and the reference solution (a new tensor)."""
        m = torch.maximum(y.abs(), ref.abs()).mul_(rtol)
        return m.add_(atol) if self.mix == "sum" else m.clamp_min_(atol)


#: rk45's norm: $\text{atol} + \text{rtol}\max(|y|, |y_{new}|)$.
HAIRER_NORM = ErrorNorm("sum", "solution")
#: adaptive_sde's norm: $\max(\text{atol}, \text{rtol}\max(|x|, |x'|))$, $x'$ the Euler–Maruyama proposal.
MIXED_MAX_NORM = ErrorNorm("max", "embedded")


class ODETerm:
    """A drift-only term ``v(y, t)`` (``diffusion`` is ``None``): an ODE right-hand side as a term (final class)."""

    __slots__ = ("drift",)

    def __init__(self, fn: ODEFn):
        self.drift = fn

    @staticmethod
    def diffusion(t: Tensor) -> None:
        return None


_PLANS: dict = {}


def _plan(tab: ButcherTableau):
    r"""The nonzero coefficients ``((j, a_ij), ...)`` of every row of ``a``, of ``b`` and of ``b_err``,
    built once per tableau (the per-sample and stochastic path is bound by Python overhead at small batch),
    and whether the last stage input is the embedded solution $\hat y$ for additive noise too: the last
    row of ``a`` is $\hat b$ and $\hat b$ weights only stages at $c_j = 0$ (where the noise
    $c_s \sigma(t_0)\,\Delta W$ of that input is $\sum_j \hat b_j \sigma(t_0 + c_j h)\,\Delta W$)."""
    hit = _PLANS.get(tab)
    if hit is None:
        def nonzero(coefs):
            return tuple((j, c) for j, c in enumerate(coefs) if c != 0.0)
        b_hat = [p - q for p, q in zip(tab.b, tab.b_err)]
        hat_last = (tab.stages > 1 and not tab.fsal and b_hat[-1] == 0.0 and list(tab.a[-1]) == b_hat[:-1]
                    and all(tab.c[j] == 0.0 for j, v in enumerate(b_hat) if v != 0.0))
        hit = (tuple(nonzero(row) for row in tab.a), nonzero(tab.b), nonzero(tab.b_err), hat_last)
        if len(_PLANS) > 64:
            _PLANS.clear()
        _PLANS[tab] = hit
    return hit


def _comb(ks: list[Tensor], plan) -> Tensor | None:
    """``sum_j c_j ks[j]`` over a plan's ``(j, c_j)``, accumulated in place into a fresh product (``None`` if empty)."""
    if not plan:
        return None
    j, c = plan[0]
    acc = ks[j] * c
    for j, c in plan[1:]:
        acc.add_(ks[j], alpha=c)
    return acc


def _stage_input(y: Tensor, h, ks: list[Tensor], plan) -> Tensor:
    """``y + h * sum_j c_j ks[j]``; ``h`` a float or a tensor broadcastable against ``y``."""
    if not plan:
        return y
    if isinstance(h, Tensor):  # per-sample steps: fused multiply-adds (one op for a one-term stage)
        if len(plan) == 1:
            return torch.addcmul(y, h, ks[plan[0][0]], value=plan[0][1])
        return torch.addcmul(y, h, _comb(ks, plan))
    return y + h * _comb(ks, plan)


def rk_attempt(drift: ODEFn, tab: ButcherTableau, y: Tensor, k1: Tensor, t: Tensor, dt: float | Tensor,
               dtb: float | Tensor, *, t1: Tensor | None = None,
               diffusion: Callable[[Tensor], Tensor | None] | None = None,
               dw: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    r"""One attempted step with fresh tensors for every stage (differentiable end to end).

    Args:
        drift: $v(y, t)$.
        tab: the tableau.
        y: ``(B, *D)`` state at ``t``.
        k1: $v(y, t)$.
        t: ``(B,)`` start times.
        dt: the signed step (float or ``(B,)``), added to ``t`` for the stage times.
        dtb: ``dt`` broadcastable against ``y``.
        t1: ``(B,)`` end times; stages with $c_i = 1$ are evaluated at exactly ``t1`` (default ``t + dt``).
        diffusion: $\sigma(t)$ ``(B,)`` for additive noise (``None``: an ODE step).
        dw: the Brownian increment ``(B, *D)`` (with ``diffusion``).

    Returns:
        ``(y_new, aux, err, k_last)``: without noise the error estimate is ``dtb * aux`` (``aux`` the
        error sum $\sum_i (b_i - \hat b_i) k_i$) and ``err`` is ``None``; with noise ``err`` is the whole
        estimate and ``aux`` the embedded solution $\hat y$; ``k_last`` the last stage derivative.
    """
    rows, plan_b, plan_err, hat_last = _plan(tab)
    gs = None  # sigma at the stage times, (B, 1, ..., 1) (only with noise)
    if diffusion is not None and dw is not None:
        g0 = diffusion(t)
        if g0 is not None:
            ones = (1,) * (y.ndim - 1)
            gs = [g0.view(-1, *ones)]
    ks = [k1]
    y_new = None
    s, c = tab.stages, tab.c
    for i in range(1, s):
        yi = _stage_input(y, dtb, ks, rows[i])
        if gs is not None and c[i] != 0.0:
            yi = torch.addcmul(yi, gs[0], dw, value=c[i])
        if gs is None and tab.fsal and i == s - 1:
            y_new = yi  # the last row of a equals b: this stage input is the solution
        ti = t1 if (t1 is not None and c[i] == 1.0) else t + c[i] * dt
        ks.append(drift(yi, ti))
        if gs is not None:
            gs.append(diffusion(ti).view(-1, *ones))
    if y_new is None:
        y_new = _stage_input(y, dtb, ks, plan_b)
    if gs is None:
        err_sum = _comb(ks, plan_err)
        return y_new, (torch.zeros_like(y) if err_sum is None else err_sum), None, ks[-1]
    # sum_i b_i sigma_i dW (the weights are combined on the (B, 1, ...) sigmas before they multiply dW)
    y_new = torch.addcmul(y_new, _comb(gs, plan_b), dw)
    if hat_last:
        # The embedded solution is the last stage input (EM/Heun: the Euler-Maruyama proposal x'):
        # the error is y_new - y_hat, one subtraction.
        return y_new, yi, y_new - yi, ks[-1]
    err_sum = _comb(ks, plan_err)
    err_sum = torch.zeros_like(y) if err_sum is None else err_sum
    err = torch.addcmul(_comb(gs, plan_err) * dw, dtb, err_sum)
    return y_new, y_new - err, err, ks[-1]


def error_norm(norm: ErrorNorm, y: Tensor, y_new: Tensor, aux: Tensor, err: Tensor | None, dtb: float | Tensor,
               h_abs: float | Tensor | None, rtol: float, atol: float, per_sample: bool) -> Tensor:
    r"""$\|e\|$ (see the module docstring): ``(B,)`` per sample, else 0-d over the whole batch.

    ``y``, ``y_new``, ``aux``, ``err``, ``dtb``: as [`rk_attempt`][sdegen.solvers.explicit_rk.rk_attempt]
    takes and returns them: without noise (``err`` ``None``) the estimate is ``dtb * aux`` and $|h|$
    (``h_abs``: a float, or ``(B,)`` per sample) is applied after the norm; with noise ``err`` is the
    estimate and ``aux`` the embedded solution."""
    if err is None:
        e = aux
        ref = y_new if norm.reference == "solution" else y_new - dtb * aux
    else:
        e = err
        ref = y_new if norm.reference == "solution" else aux
    v = e / norm.scale(y, ref, rtol, atol)
    if v.requires_grad:
        v = v.detach()  # step-size control is not differentiated
    if per_sample:
        n = torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1)
        root_n = math.sqrt(v[0].numel())
    else:
        n = torch.linalg.vector_norm(v)
        root_n = math.sqrt(v.numel())
    return n * h_abs / root_n if err is None else n / root_n


class AbstractExplicitRK(abc.ABC):
    r"""An adaptive explicit RK step over one tableau: ``step(term, x, t0, t1, state, dw)``.

    Subclasses are frozen dataclasses with the options ``rtol``, ``atol``, ``per_sample`` and declare
    ``tableau``, ``norm``, ``order``, ``evals_per_step`` (score evaluations per attempted step) and
    ``stochastic`` (whether ``step`` consumes ``dw``).
    """

    tableau: ClassVar[ButcherTableau]
    norm: ClassVar[ErrorNorm]
    order: ClassVar[float]
    evals_per_step: ClassVar[int]
    stochastic: ClassVar[bool]
    rtol: float
    atol: float
    per_sample: bool

    def step(self, term: Any, x: Tensor, t0: Tensor, t1: Tensor, state: Tensor | None,
             dw: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        r"""Attempt a step from ``t0`` to ``t1`` (each ``(B,)``; ``t1 < t0`` when sampling).

        Args:
            term: ``term.drift(x, t)`` $= v$ and ``term.diffusion(t)`` $= \sigma$ ``(B,)`` (or ``None``).
            x: ``(B, *D)`` state at ``t0``.
            t0: ``(B,)`` start times.
            t1: ``(B,)`` end times.
            state: $v(x, t_0)$ from the previous step (FSAL) or ``None`` (then evaluated here).
            dw: Brownian increment over the step, variance $|t_1 - t_0|$ (``None`` for an ODE).

        Returns:
            ``(x_new, error_norm, state)``: ``error_norm`` ``(B,)`` per sample or 0-d for the batch;
            ``state`` the derivative at ``(x_new, t1)`` for an FSAL tableau, else ``None``.
        """
        tab = self.tableau
        k1 = term.drift(x, t0) if state is None else state
        dt = t1 - t0
        dtb = append_dims(dt, x.ndim)
        diffusion = term.diffusion if dw is not None else None
        y_new, aux, err, k_last = rk_attempt(term.drift, tab, x, k1, t0, dt, dtb, t1=t1, diffusion=diffusion, dw=dw)
        h_abs = None if err is not None else dt.abs() if self.per_sample else dt.abs().max()
        norm = error_norm(self.norm, x, y_new, aux, err, dtb, h_abs, self.rtol, self.atol, self.per_sample)
        return y_new, norm, (k_last if tab.fsal and err is None else None)


@dataclass(frozen=True)
class Dopri5(AbstractExplicitRK):
    """Dormand–Prince 5(4) with the Hairer norm (final class): order 5, 6 evaluations per attempt (FSAL)."""

    rtol: float = 1e-5
    atol: float = 1e-5
    per_sample: bool = False

    tableau = DOPRI5
    norm = HAIRER_NORM
    order = 5
    evals_per_step = 6
    stochastic = False


@dataclass(frozen=True)
class EulerHeun(AbstractExplicitRK):
    """The Euler–Maruyama / improved-Euler pair of Jolicoeur-Martineau et al. 2021 (final class).

    Strong order 1.0 for additive noise; 2 evaluations per attempt (not FSAL: $k_2$ is taken at the
    Euler–Maruyama proposal, not at the accepted state); the paper's mixed max norm."""

    rtol: float = 1e-2
    atol: float = 1e-2
    per_sample: bool = False

    tableau = EM_HEUN
    norm = MIXED_MAX_NORM
    order = 1.0
    evals_per_step = 2
    stochastic = True


@dataclass(frozen=True)
class TableauRK(AbstractExplicitRK):
    """Any ODE tableau with the Hairer norm (final class): ``order`` and ``evals_per_step`` read from it."""

    tableau: ButcherTableau = DOPRI5
    rtol: float = 1e-5
    atol: float = 1e-5
    per_sample: bool = False

    norm = HAIRER_NORM
    stochastic = False

    @property
    def order(self) -> int:  # type: ignore[override]
        return self.tableau.order

    @property
    def evals_per_step(self) -> int:  # type: ignore[override]
        return self.tableau.stages - (1 if self.tableau.fsal else 0)


def first_bad_sample(*tensors: Tensor | None) -> int | None:
    """Index of the first sample with a NaN/inf entry in the first tensor that has one (error path only)."""
    for v in tensors:
        if v is None:
            continue
        bad = ~torch.isfinite(v.reshape(v.shape[0], -1)).all(1)
        if bool(bad.any()):
            return int(torch.nonzero(bad)[0])
    return None


class ListStepper:
    """Batched ODE steps (host-float times) with fresh tensors per stage: used when gradients flow through the solve."""

    def __init__(self, f: ODEFn, tab: ButcherTableau, y0: Tensor, k1: Tensor, rtol: float, atol: float,
                 norm: ErrorNorm = HAIRER_NORM):
        self.f, self.tab, self.rtol, self.atol, self.norm = f, tab, rtol, atol, norm
        self.y, self.k1 = y0, k1
        self.err: Tensor | None = None

    def attempt(self, t: float, dt: float) -> Tensor:
        """Try a step of ``dt`` from ``t``; returns the (unscaled by ``|dt|``) error norm, 0-d."""
        y = self.y
        tt = torch.full((y.shape[0],), t, device=y.device, dtype=y.dtype)
        self.y_new, err_sum, _, self.k_last = rk_attempt(self.f, self.tab, y, self.k1, tt, dt, dt)
        ref = self.y_new if self.norm.reference == "solution" else self.y_new - dt * err_sum
        self.err = (err_sum / self.norm.scale(y, ref, self.rtol, self.atol)).detach()
        return torch.linalg.vector_norm(self.err)

    def accept(self, t_new: float) -> None:
        self.y = self.y_new
        self.k1 = self.k_last if self.tab.fsal else self.f(
            self.y, torch.full((self.y.shape[0],), t_new, device=self.y.device, dtype=self.y.dtype))

    def k1_finite(self) -> bool:
        return bool(torch.isfinite(self.k1).all())

    def bad_sample(self) -> int | None:
        """First sample whose initial derivative or last error estimate is non-finite (error path only)."""
        return first_bad_sample(self.k1, self.err)

    def state(self) -> Tensor:
        return self.y


_TABLEAU_CACHE: dict = {}


def _tableau_tensors(tab: ButcherTableau, device: torch.device, dtype: torch.dtype):
    """The tableau as device tensors ``(rows of a, b, b_err, c)``, built once per (tableau, device, dtype):
    rebuilding them costs a few host-to-device copies per solve, a visible share of a small solve."""
    key = (tab, device, dtype)
    hit = _TABLEAU_CACHE.get(key)
    if hit is None:
        s = tab.stages
        A = torch.zeros(s, s, dtype=torch.float64)
        for i, row in enumerate(tab.a):
            if row:
                A[i, :i] = torch.tensor(row, dtype=torch.float64)
        A = A.to(device=device, dtype=dtype)
        hit = ([A[i, :i] for i in range(s)], torch.tensor(tab.b, dtype=dtype).to(device),
               torch.tensor(tab.b_err, dtype=dtype).to(device), torch.tensor(tab.c, dtype=dtype).to(device))
        if len(_TABLEAU_CACHE) > 64:  # user tableaus on many devices: keep the cache bounded
            _TABLEAU_CACHE.clear()
        _TABLEAU_CACHE[key] = hit
    return hit


class BufferStepper:
    r"""Batched ODE steps in preallocated buffers: the fast path when no gradient flows through the solve.

    The stage derivatives are the rows of one ``(s, N)`` buffer ``K``, so each stage input
    $y + h \sum_j a_{ij} k_j$ is ONE ``addmv`` written into a stage buffer, the error sum one ``mv``,
    and the stage times one fused update: about 23 tensor operations per step besides ``f``, which
    is what the per-step overhead of a small-batch solve consists of. ``f`` receives views of these
    buffers; it must not keep references to its arguments after returning (they are overwritten by
    later stages).
    """

    def __init__(self, f: ODEFn, tab: ButcherTableau, y0: Tensor, k1: Tensor, rtol: float, atol: float,
                 norm: ErrorNorm = HAIRER_NORM):
        s, B, N = tab.stages, y0.shape[0], y0.numel()
        dev, dt_ = y0.device, y0.dtype
        self.f, self.tab, self.rtol, self.atol, self.shape = f, tab, rtol, atol, y0.shape
        self.sum_mix, self.embedded = norm.mix == "sum", norm.reference == "embedded"
        self.K = y0.new_empty((s, N))
        self.K[0].copy_(k1.reshape(-1))
        self.KT = [self.K[:n].T for n in range(s + 1)]
        self.Ksh = [self.K[i].view(y0.shape) for i in range(s)]
        # Stage inputs; row 0 (the stage-0 input is y itself) holds y_new for non-FSAL tableaus.
        self.Y = y0.new_empty((s, N))
        self.Ysh = [self.Y[i].view(y0.shape) for i in range(s)]
        self.new = s - 1 if tab.fsal else 0
        self.y = y0.detach().reshape(-1).clone()
        self.ay, self.ay_new = self.y.abs(), torch.empty_like(self.y)
        self.err, self.scale = torch.empty_like(self.y), torch.empty_like(self.y)
        self.rows, self.b, self.b_err, c = _tableau_tensors(tab, dev, dt_)
        self.cB = c[:, None].expand(s, B).contiguous()
        self.tb = torch.empty_like(self.cB)
        self.trow = [self.tb[i] for i in range(s)]

    def attempt(self, t: float, dt: float) -> Tensor:
        torch.mul(self.cB, dt, out=self.tb)
        self.tb.add_(t)
        for i in range(1, self.tab.stages):
            torch.addmv(self.y, self.KT[i], self.rows[i], alpha=dt, out=self.Y[i])
            self.Ksh[i].copy_(self.f(self.Ysh[i], self.trow[i]))
        if not self.tab.fsal:
            torch.addmv(self.y, self.KT[-1], self.b, alpha=dt, out=self.Y[0])
        torch.mv(self.KT[-1], self.b_err, out=self.err)
        if self.embedded:  # the reference is the embedded solution y_new - h err_sum
            torch.sub(self.Y[self.new], self.err, alpha=dt, out=self.ay_new)
            self.ay_new.abs_()
        else:
            torch.abs(self.Y[self.new], out=self.ay_new)
        torch.maximum(self.ay, self.ay_new, out=self.scale)
        self.scale.mul_(self.rtol)
        if self.sum_mix:
            self.scale.add_(self.atol)
        else:
            self.scale.clamp_min_(self.atol)
        return torch.linalg.vector_norm(self.err.div_(self.scale))

    def accept(self, t_new: float) -> None:
        self.y.copy_(self.Y[self.new])
        if self.embedded:
            torch.abs(self.y, out=self.ay)
        else:
            self.ay, self.ay_new = self.ay_new, self.ay
        if self.tab.fsal:
            self.K[0].copy_(self.K[-1])
        else:
            tt = torch.full((self.shape[0],), t_new, device=self.y.device, dtype=self.y.dtype)
            self.Ksh[0].copy_(self.f(self.y.view(self.shape), tt))

    def k1_finite(self) -> bool:
        return bool(torch.isfinite(self.K[0]).all())

    def bad_sample(self) -> int | None:
        """First sample whose initial derivative or last error estimate is non-finite (error path only)."""
        return first_bad_sample(self.K[0].view(self.shape), self.err.view(self.shape))

    def state(self) -> Tensor:
        return self.y.view(self.shape)
