r"""k-diffusion's σ-picture samplers for any affine SDE: Euler ancestral (with η), DPM-2, DPM-2 ancestral.

Any [`AffineSDE`][sdegen.AffineSDE] is an EDM process in the scaled state $\hat x = x/m$ with noise level
$\sigma = s/m$ (Karras et al. 2022, §4): $d\hat x/d\sigma = (\hat x - D)/\sigma = -s\,\nabla_x\log p_t(x)$,
$D = \hat x_0$ by Tweedie. The samplers of k-diffusion (Crowson, ``k_diffusion/sampling.py``:
``sample_euler_ancestral``, ``sample_dpm_2``, ``sample_dpm_2_ancestral``) are written in this picture;
here they run on $x = m\hat x$ so that VP, sub-VP, VE and user SDEs share them.

**Ancestral split.** A step $\sigma_0 \to \sigma_1$ is a deterministic move to
$\sigma_\downarrow = \sqrt{\sigma_1^2 - \sigma_\uparrow^2}$ followed by fresh noise of std $\sigma_\uparrow$,

$$\sigma_\uparrow = \min\Big(\sigma_1,\ \eta\,\sqrt{\sigma_1^2(\sigma_0^2 - \sigma_1^2)/\sigma_0^2}\Big),$$

so that the step's total noise level is $\sigma_1$ ($\eta = 1$: the DDPM posterior's variance in the σ
picture; $\eta = 0$: the deterministic sampler). $z = \Delta w/\sqrt{|\Delta t|}$ is the loop's unit draw.

Notation map (k-diffusion → sdegen): ``sigma`` → $\sigma = s/m$; ``x`` → $\hat x = x/m$;
``denoised`` → $D$; ``sigma_up``/``sigma_down`` → $\sigma_\uparrow, \sigma_\downarrow$.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..sdes import AffineSDE
from .base import TabulatedSolver, Dynamics
from .marginal_rows import GridCoefficients, sigma_to_time
from .sde_steps import linear_update

__all__ = ["EulerAncestral", "DPM2", "ancestral_split", "build_euler_ancestral", "build_dpm2",
           "EULER_ANCESTRAL_OPTIONS", "DPM2_OPTIONS"]


def ancestral_split(sigma0: float, sigma1: float, eta: float) -> tuple[float, float]:
    r"""$(\sigma_\downarrow, \sigma_\uparrow)$ of the module docstring (k-diffusion's ``get_ancestral_step``)."""
    if eta == 0.0 or sigma1 == 0.0:
        return sigma1, 0.0
    up = min(sigma1, eta * math.sqrt(sigma1 * sigma1 * (sigma0 * sigma0 - sigma1 * sigma1) / (sigma0 * sigma0)))
    return math.sqrt(max(sigma1 * sigma1 - up * up, 0.0)), up


def _check_eta(eta) -> None:
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not (0.0 <= eta < math.inf):
        raise ValueError(f"eta must be a finite float >= 0, got {eta!r}")


def _split_grid(coefs: GridCoefficients, eta: float) -> tuple[list[float], list, list[tuple[float, float]]]:
    r"""The grid as host floats, its marginal rows $(m, s)$ and each step's ancestral split
    $(\sigma_\downarrow, \sigma_\uparrow)$ with ``eta``, read from the grid's coefficients (float64)."""
    t, ms = coefs.t, list(zip(coefs.m, coefs.s))
    return t, ms, [ancestral_split(ms[k][1] / ms[k][0], ms[k + 1][1] / ms[k + 1][0], eta) for k in range(len(t) - 1)]


@dataclass(frozen=True)
class EulerAncestral(TabulatedSolver):
    r"""Euler ancestral sampling in $(\hat x, \sigma)$ with noise level $\eta$.

    $$\hat x_1 = \hat x_0 + (\sigma_\downarrow - \sigma_0)\,\frac{\hat x_0 - D(\hat x_0; \sigma_0)}{\sigma_0}
      + \sigma_\uparrow z,\qquad x_1 = m_1 \hat x_1,$$

    i.e. $x_1 = \frac{m_1}{m_0}x_0 + m_1(\sigma_0 - \sigma_\downarrow)\,s_0\,\nabla\log p_{t_0}(x_0) + m_1\sigma_\uparrow z$
    (k-diffusion ``sample_euler_ancestral``; diffusers ``EulerAncestralDiscreteScheduler`` for $\eta = 1$).
    Weak order 1; one score evaluation per step; $\eta = 0$ is the Euler step in $\sigma$ (DDIM).

    Args:
        eta: $\eta \ge 0$.
        table: per-step ``(a, b, c)`` host floats, ``x_1 = a x + b score + c dw``, built by `prepare` from the
            grid's [`GridCoefficients`][sdegen.solvers.marginal_rows.GridCoefficients] (the loop prepares
            a solver constructed without it).
        table_times: the grid ``table`` was built for (set by `prepare`; a run on another grid is a ``ValueError``).
    """

    eta: float = 1.0

    order: ClassVar[float] = 1.0
    stochastic: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 1

    def __post_init__(self):
        _check_eta(self.eta)

    def build_table(self, coefs: GridCoefficients) -> "EulerAncestral":
        """The solver with its table for the grid of ``coefs``; a solver that has one already is checked
        against that grid (``ValueError`` if it was built for another)."""
        t, ms, split = _split_grid(coefs, self.eta)
        rows = []
        for k, (down, up) in enumerate(split):
            (m0, s0), (m1, s1) = ms[k], ms[k + 1]
            rows.append((m1 / m0, m1 * (s0 / m0 - down) * s0, m1 * up / math.sqrt(abs(t[k] - t[k + 1]))))
        return dataclasses.replace(self, table=tuple(rows), table_times=tuple(t))

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        if self.table is None:
            raise ValueError("EulerAncestral needs its per-step table: run it through integrate_fixed_grid (which "
                             "prepares it) or build it with EulerAncestral.tabulated(sde, times)")
        return 0

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        return linear_update(self.table[state], x, dyn.score(x, t0), dw), None, state + 1


@dataclass(frozen=True)
class DPM2(TabulatedSolver):
    r"""k-diffusion's DPM-2 (a midpoint step in $\log\sigma$) and, with ``ancestral``, DPM-2 ancestral.

    Step $\sigma_0 \to \sigma_1$ (target $\sigma_\star = \sigma_\downarrow$ when ancestral, else $\sigma_1$),
    with $d(\hat x, \sigma) = (\hat x - D)/\sigma$ (Karras et al. 2022, Alg. 1 ablation; k-diffusion
    ``sample_dpm_2`` / ``sample_dpm_2_ancestral``; diffusers ``KDPM2DiscreteScheduler`` /
    ``KDPM2AncestralDiscreteScheduler``):

    $$\sigma_m = \sqrt{\sigma_0\sigma_\star},\quad \hat x_m = \hat x_0 + (\sigma_m - \sigma_0)\,d(\hat x_0, \sigma_0),\quad
      \hat x_1 = \hat x_0 + (\sigma_\star - \sigma_0)\,d(\hat x_m, \sigma_m) + \sigma_\uparrow z,$$

    evaluated at $t_m = \sigma^{-1}(\sigma_m)$ of the SDE ([`AffineSDE.t_from_sigma`][sdegen.sdes.AffineSDE.t_from_sigma]).
    A step with $\sigma_\star = 0$ is the Euler step $\hat x_1 = D$ (one evaluation). Order 2 without
    noise (the midpoint rule in $\log\sigma$); weak order 1 when ancestral. Two score evaluations per step.

    Args:
        ancestral: add the ancestral noise ($\sigma_\uparrow$ with ``eta``).
        eta: $\eta \ge 0$ for the ancestral split (ignored without ``ancestral``).
        table: per-step host floats, built by `prepare` from the grid's and the midpoints'
            [`GridCoefficients`][sdegen.solvers.marginal_rows.GridCoefficients] (the loop prepares a
            solver constructed without it).
        table_times: the grid ``table`` was built for (set by `prepare`; a run on another grid is a ``ValueError``).
    """

    ancestral: bool = False
    eta: float = 1.0

    order: ClassVar[float] = 2.0
    evals_per_step: ClassVar[int] = 2

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.ancestral

    def __post_init__(self):
        _check_eta(self.eta)
        if not isinstance(self.ancestral, bool):
            raise TypeError(f"ancestral must be a bool, got {self.ancestral!r}")

    def build_table(self, coefs: GridCoefficients) -> "DPM2":
        """The solver with its table for the grid of ``coefs``: the midpoint times are found once, by the SDE's
        inverse, and their $(m, s)$ read from one `GridCoefficients` on them. A solver that has a table
        already is checked against the grid (``ValueError`` if it was built for another)."""
        sde = coefs.sde
        t, ms, split = _split_grid(coefs, self.eta if self.ancestral else 0.0)
        mids = [math.sqrt((ms[k][1] / ms[k][0]) * split[k][0]) for k in range(len(split))]
        pos = [k for k, sm in enumerate(mids) if sm > 0.0]
        t_mid = dict(zip(pos, sigma_to_time(sde, [mids[k] for k in pos]))) if pos else {}
        mid = GridCoefficients(sde, [t_mid[k] for k in pos])
        m_mid = dict(zip(pos, zip(mid.m, mid.s))) if pos else {}
        rows = []
        for k in range(len(t) - 1):
            (m0, s0), (m1, s1) = ms[k], ms[k + 1]
            sig0 = s0 / m0
            down, up = split[k]
            c = m1 * up / math.sqrt(abs(t[k] - t[k + 1]))
            if k not in t_mid:
                # Euler into sigma = 0: x_1 = m_1 D = (m1/m0)(x + s0^2 score)
                rows.append((None, (m1 / m0, m1 / m0 * s0 * s0, c)))
                continue
            mm, sm = m_mid[k]
            sig_m = mids[k]
            first = (mm / m0, -mm * (sig_m - sig0) * s0)          # x_m = a x + b score(x, t0)
            second = (m1 / m0, -m1 * (down - sig0) * sm, c)       # x_1 = a x + b score(x_m, t_m) + c dw
            rows.append(((t_mid[k], *first), second))
        return dataclasses.replace(self, table=tuple(rows), table_times=tuple(t))

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        if self.table is None:
            raise ValueError("DPM2 needs its per-step table: run it through integrate_fixed_grid (which "
                             "prepares it) or build it with DPM2.tabulated(sde, times)")
        # The midpoint time vectors, made once on the state's device (not one allocation per step).
        t_mid = torch.tensor([row[0][0] if row[0] is not None else 0.0 for row in self.table],
                             dtype=t0.dtype, device=t0.device)
        return 0, t_mid.unsqueeze(1).expand(len(self.table), t0.shape[0]).unbind(0)

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        i, t_mid = state
        first, second = self.table[i]
        score = dyn.score(x, t0)
        if first is None:
            return linear_update(second, x, score, dw), None, (i + 1, t_mid)
        _, a, b = first
        xm = torch.add(x * a, score, alpha=b)
        return linear_update(second, x, dyn.score(xm, t_mid[i]), dw), None, (i + 1, t_mid)


def build_euler_ancestral(ctx, opts: dict) -> EulerAncestral:
    """``sdegen.sample`` builder (the runner has set ``ctx.times`` from ``grid=``; the loop prepares the table)."""
    ctx.dyn.affine      # TypeError for a non-affine SDE here, before the run
    return EulerAncestral(eta=opts["eta"])


def build_dpm2(ancestral: bool):
    """``sdegen.sample`` builder of DPM-2 or DPM-2 ancestral (the loop prepares the table)."""

    def build(ctx, opts: dict) -> DPM2:
        ctx.dyn.affine  # TypeError for a non-affine SDE here, before the run
        return DPM2(ancestral=ancestral, eta=opts.get("eta", 1.0))

    return build


#: Options of ``euler_ancestral`` and ``dpm2_ancestral``.
EULER_ANCESTRAL_OPTIONS = {"eta": 1.0, "grid": "karras"}
#: Options of ``dpm2``.
DPM2_OPTIONS = {"grid": "karras"}
