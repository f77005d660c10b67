r"""Single-step DPM-Solver / DPM-Solver++ of orders 1-3 (with optional SDE noise), and k-diffusion's ``dpm_fast``.

A single-step method of order $k$ advances one step $t_a \to t_b$ ($h = \lambda_b - \lambda_a$,
$\lambda = \log(m/s)$) with $k - 1$ intermediate stages at $\lambda_a + r_j h$, each computed by the
lower-order update from $x_a$ (Lu et al. 2022a, Alg. 1-2: DPM-Solver-2/3; Lu et al. 2022b, Alg. 1:
DPM-Solver++(2S)). With data predictions $D$ (``prediction="data"``) and $c = 1 + \eta$, an update
from $x_a$ to $\lambda_b$ reads (the integrals $I_0, I_1, I_2$ of [`sdegen.solvers.sde_dpm`][sdegen.solvers.sde_dpm])

$$x_b = \frac{s_b}{s_a}e^{-\eta h}x_a + m_b\big[I_0 D_a + \tfrac{I_1}{h}D_1 + \tfrac{I_2}{h^2}D_2\big] + s_b\sqrt{1 - e^{-2\eta h}}\,z,$$

with the differences, for stages at ratios $r_1$ (first) and $r_0$ (second):
order 2: $D_1 = (D_{r} - D_a)/r$ (``"exact"``; ``"midpoint"`` uses $\tfrac12 I_0$ instead of $I_1/h$);
order 3 (``"exact"``): $D_1 = \frac{r_0 D_{1,0} - r_1 D_{1,1}}{r_0 - r_1}$, $D_2 = \frac{2(D_{1,1} - D_{1,0})}{r_0 - r_1}$,
$D_{1,0} = (D_{r_1} - D_a)/r_1$, $D_{1,1} = (D_{r_0} - D_a)/r_0$; order 3 (``"midpoint"`` and ``"paper"``):
$D_1 = D_{1,1}$, $D_2 = 0$. Noise prediction $\hat\epsilon$ (DPM-Solver, $\eta = 0$): replace
$\frac{s_b}{s_a}$ by $\frac{m_b}{m_a}$ and $m_b I_j$ by $-s_b\psi_{j+1}$ ($\psi_1 = e^h - 1$, $\psi_2 = e^h - 1 - h$,
$\psi_3 = e^h - 1 - h - h^2/2$).

The stage-2 update of an order-3 step is the order-2 update over $[\lambda_a, \lambda_a + r_0 h]$ with
its stage at $r_1/r_0$, in the form ``solver_type`` names, except ``"paper"``, which is Lu et al.
2022a's DPM-Solver-3 as printed (stage 2 ``"exact"``, final ``"midpoint"``), the form of k-diffusion's
``dpm_solver_3_step``; order-2 ``"paper"`` steps are ``"midpoint"`` (DPM-Solver-2, Alg. 1).
diffusers' ``DPMSolverSinglestepScheduler`` is ``"midpoint"`` (its default) or ``"exact"`` (its
``"heun"``), with stages at its own grid points; with ``algorithm_type="sde-dpmsolver++"`` every stage
and the final update add fresh noise ($\eta = 1$).

Notation map: DPM-Solver's $\alpha_t, \sigma_t$ → ``mean_coef`` $m$, ``std`` $s$; $x_\theta$ → $D$; $\epsilon_\theta$ → $\hat\epsilon$.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from .._utils import check_bool, check_number
from ..sdes import AffineSDE
from .base import TabulatedSolver, Dynamics
from .marginal_rows import GridCoefficients

__all__ = ["DPMSolverSinglestep", "singlestep_orders", "fast_orders", "build_dpm_singlestep", "build_dpm_fast",
           "DPM_SINGLESTEP_OPTIONS", "DPM_FAST_OPTIONS", "SINGLESTEP_TYPES"]

#: Update forms (see the module docstring).
SINGLESTEP_TYPES = ("exact", "midpoint", "paper")


def singlestep_orders(steps: int, order: int, lower_order_final: bool = True) -> list[int]:
    r"""How ``steps`` grid intervals are grouped into single-step updates of order <= ``order``
    (diffusers' ``get_order_list``: groups $1, 2, 3, 1, 2, 3, \dots$ as grid intervals; each group of size
    $k$ is one order-$k$ update whose stages are the group's inner grid points)."""
    if order == 1:
        return [1] * steps
    if order == 2:
        if lower_order_final:
            return [2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [2] * (steps // 2) + [1]
        return [2] * (steps // 2)
    if lower_order_final:
        if steps % 3 == 0:
            return [3] * (steps // 3 - 1) + [2, 1]
        return [3] * (steps // 3) + ([1] if steps % 3 == 1 else [2])
    return [3] * (steps // 3)


def fast_orders(nfe: int) -> list[int]:
    r"""k-diffusion's ``dpm_fast`` split of an evaluation budget: $M = \lfloor n/3\rfloor + 1$ steps, all of
    order 3 except the last one or two ($n \bmod 3 = 0$: ``[..., 2, 1]``; else ``[..., n mod 3]``)."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


def _data_coefs(h: float, eta: float) -> tuple[float, float, float]:
    r"""$(I_0, I_1/h, I_2/h^2)$ for the data form ($c = 1 + \eta$)."""
    H = (1.0 + eta) * h
    i0 = -math.expm1(-H)
    i1 = h * (1.0 - i0 / H)
    i2 = h * h * (0.5 - 1.0 / H + i0 / (H * H))
    return i0, i1 / h, i2 / (h * h)


def _noise_coefs(h: float) -> tuple[float, float, float]:
    r"""$(\psi_1, \psi_2/h, \psi_3/h^2)$ for the noise form."""
    e = math.expm1(h)
    return e, (e - h) / h, (e - h - 0.5 * h * h) / (h * h)


@dataclass(frozen=True)
class DPMSolverSinglestep(TabulatedSolver):
    r"""Single-step DPM-Solver(++) of order 1-3 per step (see the module docstring for the updates).

    The loop's grid is the steps' boundaries; ``fine`` adds each step's stage times (its inner points),
    and ``orders`` says how many fine intervals each step spans (`group_times` gives the loop's grid).

    Step $t_a \to t_b$ of order $k$ (from ``table``): evaluate the prediction at $x_a$; for each stage
    $j < k$ compute $x_{s_j}$ by the order-$j$ update from $x_a$ and evaluate there; then the order-$k$
    update to $t_b$. $k$ score evaluations per step; order $k$ for the probability flow ($\eta = 0$).
    With $\eta > 0$ (data prediction) every update adds $s\sqrt{1 - e^{-2\eta h}}\,z$: the final one the
    loop's draw, the stages draws from ``draw(k)`` (diffusers' ``sde-dpmsolver++`` single-step).

    Args:
        prediction: ``"data"`` (DPM-Solver++) or ``"noise"`` (DPM-Solver).
        solver_type: ``"exact"``, ``"midpoint"`` or ``"paper"``.
        eta: $\eta \ge 0$ (data prediction only).
        noise: with $\eta > 0$, ``"brownian"`` (default): the stages' and the final update's noises are
            one Ornstein-Uhlenbeck path, $N_{j+1} = \frac{s_{j+1}}{s_j}e^{-\eta\Delta\lambda}N_j + s_{j+1}\sqrt{1 - e^{-2\eta\Delta\lambda}}\,u_{j+1}$,
            so the final noise is the exact OU integral given the stage states; ``"independent"``: a fresh
            draw per update, diffusers' ``sde-dpmsolver++`` single-step (biased: variance errors of 10-20 %
            at 60-100 steps on the oracle problems, where ``"brownian"`` passes the distribution check).
        draw: ``draw(k) -> Tensor`` unit Gaussian like ``x`` for the stages' noise (needed when ``eta > 0``).
        orders: the order (1, 2 or 3) of each loop step; needed to prepare the table.
        fine: the fine grid, decreasing floats with ``sum(orders) + 1`` entries: the loop's grid and, inside
            each step, its stage times; needed to prepare the table.
        table: per-step rows, built by `prepare` from the fine grid's
            [`GridCoefficients`][sdegen.solvers.marginal_rows.GridCoefficients] (the loop prepares a
            solver constructed without it).
        table_times: the loop grid ``table`` was built for (set by `prepare`; a run on another grid is a ``ValueError``).
    """

    prediction: str = "data"
    solver_type: str = "exact"
    eta: float = 0.0
    noise: str = "brownian"
    draw: Callable[[int], Tensor] | None = field(default=None, repr=False)
    orders: tuple | None = field(default=None, repr=False)
    fine: tuple | None = field(default=None, repr=False)

    order: ClassVar[float] = 3.0
    evals_per_step: ClassVar[int] = 3

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0.0

    def __post_init__(self):
        if self.prediction not in ("data", "noise"):
            raise ValueError(f"prediction must be 'data' or 'noise', got {self.prediction!r}")
        if self.solver_type not in SINGLESTEP_TYPES:
            raise ValueError(f"solver_type must be one of {', '.join(SINGLESTEP_TYPES)}, got {self.solver_type!r}")
        if not isinstance(self.eta, (int, float)) or isinstance(self.eta, bool) or not (0.0 <= self.eta < math.inf):
            raise ValueError(f"eta must be a finite float >= 0, got {self.eta!r}")
        if self.noise not in ("brownian", "independent"):
            raise ValueError(f"noise must be 'brownian' or 'independent', got {self.noise!r}")
        if self.eta > 0.0 and self.prediction != "data":
            raise ValueError(f"eta > 0 needs prediction='data' (SDE-DPM-Solver++), got prediction={self.prediction!r}")
        # one normal form (tuples of ints / host floats), so that a list or a tensor works and the solver stays hashable
        if self.orders is not None:
            orders = tuple(self.orders)
            if not orders or any(isinstance(k, bool) or k not in (1, 2, 3) for k in orders):
                raise ValueError(f"orders must be a non-empty sequence of 1, 2 or 3, got {self.orders!r}")
            object.__setattr__(self, "orders", orders)
        if self.fine is not None:
            fine = tuple(torch.as_tensor(self.fine, dtype=torch.float64).detach().to("cpu").reshape(-1).tolist())
            object.__setattr__(self, "fine", fine)
            n = len(fine) - 1
            if self.orders is None or sum(self.orders) != n:
                raise ValueError(f"orders must be 1, 2 or 3 and sum to the number of grid steps {n}, got {self.orders}")

    @classmethod
    def tabulated(cls, sde: AffineSDE, times: Tensor, orders: list[int], **options) -> "DPMSolverSinglestep":
        r"""The solver on the fine grid ``times`` grouped by ``orders`` (``sum(orders) = len(times) - 1``):
        each group's inner grid points are its stages. Returns the solver, prepared; its loop grid is `group_times`."""
        solver = cls(orders=orders, fine=times, **options)
        return solver.prepare(GridCoefficients(sde, cls.group_times(torch.tensor(solver.fine, dtype=torch.float64), orders)))

    def build_table(self, coefs: GridCoefficients) -> "DPMSolverSinglestep":
        """The solver with its table for the loop grid of ``coefs``, which must be `group_times` of ``fine``
        (``ValueError`` otherwise): the coefficients are read from one `GridCoefficients` on ``fine``. A
        solver that has a table already is checked against the grid instead."""
        if self.orders is None or self.fine is None:
            raise ValueError("DPMSolverSinglestep needs orders= and fine= (the fine grid with its stage times) to "
                             "prepare its table")
        bounds = [0]
        for k in self.orders:
            bounds.append(bounds[-1] + k)
        loop = [self.fine[j] for j in bounds]
        if len(loop) != len(coefs.t) or not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
                                                for a, b in zip(loop, coefs.t)):
            raise ValueError(f"DPMSolverSinglestep runs on the group boundaries of its fine grid ({len(loop) - 1} steps, "
                             f"from {loop[0]!r} to {loop[-1]!r}), got a grid of {coefs.n} steps from {coefs.t[0]!r} to "
                             f"{coefs.t[-1]!r}; run it on DPMSolverSinglestep.group_times(fine, orders)")
        fc = coefs if list(self.fine) == coefs.t else GridCoefficients(coefs.sde, list(self.fine))   # all order 1: one grid
        ms, lams, tl = list(zip(fc.m, fc.s)), fc.lam, fc.t
        rows = [self._row(ms, lams, tl, list(range(a, b + 1))) for a, b in zip(bounds[:-1], bounds[1:])]
        return dataclasses.replace(self, table=tuple(rows), table_times=tuple(coefs.t))

    @staticmethod
    def group_times(times: Tensor, orders: list[int]) -> Tensor:
        """The loop's grid: the group boundaries of ``times``."""
        t = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
        idx = [0]
        for k in orders:
            idx.append(idx[-1] + k)
        return t[idx]

    # -------------------------------------------------------------------------------- coefficients
    def _update(self, ms, lams, a: int, b: int, stages: list[int], form: str):
        r"""``(lin, weights over [P_a, P_stage...], noise coef)`` of the order-(len(stages)+1) update a -> b."""
        (ma, sa), (mb, sb) = ms[a], ms[b]
        h = lams[b] - lams[a]
        if self.prediction == "data":
            c0, c1, c2 = _data_coefs(h, self.eta)
            lin, out = (sb / sa) * math.exp(-self.eta * h), mb
        else:
            c0, c1, c2 = _noise_coefs(h)
            lin, out = mb / ma, -sb
        w = [c0] + [0.0] * len(stages)
        if len(stages) == 1:
            r = (lams[stages[0]] - lams[a]) / h
            g = 0.5 * c0 if form == "midpoint" else c1          # weight of D1 = (P_r - P_a)/r
            w[0] -= g / r
            w[1] += g / r
        elif len(stages) == 2:
            r1 = (lams[stages[0]] - lams[a]) / h
            r0 = (lams[stages[1]] - lams[a]) / h
            if form == "exact":
                # D1 = (r0 D10 - r1 D11)/(r0 - r1), D2 = 2 (D11 - D10)/(r0 - r1); D10 = (P1 - Pa)/r1, D11 = (P2 - Pa)/r0
                a10, a11 = c1 * r0 / (r0 - r1) - 2 * c2 / (r0 - r1), -c1 * r1 / (r0 - r1) + 2 * c2 / (r0 - r1)
            else:
                a10, a11 = 0.0, c1
            w[0] -= a10 / r1 + a11 / r0
            w[1] += a10 / r1
            w[2] += a11 / r0
        return lin, tuple(out * wj for wj in w)

    def _noise_rows(self, ms, lams, idx: list[int]) -> list[tuple[float, ...]]:
        r"""Per point $j \ge 1$ of the step, the coefficients of its noise $N_j$ on the unit draws $u_1..u_j$."""
        eta, rows, prev = self.eta, [], ()
        for j in range(1, len(idx)):
            s_j = ms[idx[j]][1]
            if eta == 0.0 or s_j == 0.0:
                rows.append((0.0,) * j)
                prev = rows[-1]
                continue
            if self.noise == "independent":
                d = lams[idx[j]] - lams[idx[0]]
                rows.append((0.0,) * (j - 1) + (s_j * math.sqrt(-math.expm1(-2.0 * eta * d)),))
            else:
                d = lams[idx[j]] - lams[idx[j - 1]]
                decay = s_j / ms[idx[j - 1]][1] * math.exp(-eta * d) if j > 1 else 0.0
                rows.append(tuple(decay * c for c in prev) + (s_j * math.sqrt(-math.expm1(-2.0 * eta * d)),))
            prev = rows[-1]
        return rows

    def _row(self, ms, lams, tl, idx: list[int]):
        k = len(idx) - 1
        a, b = idx[0], idx[-1]
        final_form = self.solver_type if self.solver_type != "paper" else "midpoint"
        stage2_form = self.solver_type if self.solver_type != "paper" else "exact"
        noise = self._noise_rows(ms, lams, idx)
        # Data: the stored prediction is P~ = x + s^2 score = m P, and 1/m goes into the weights (one kernel
        # per prediction). Noise: P = -s score, a new tensor (a model may reuse its output buffer).
        fac = [1.0 / ms[j][0] if self.prediction == "data" else 1.0 for j in idx]

        def update(to: int, stage_idx: list[int], form: str):
            lin, w = self._update(ms, lams, a, to, stage_idx, form)
            return lin, tuple(wj * fj for wj, fj in zip(w, fac))

        stages = []
        if k >= 2:
            stages.append((tl[idx[1]], (*update(idx[1], [], "exact"), noise[0])))
        if k == 3:
            stages.append((tl[idx[2]], (*update(idx[2], [idx[1]], stage2_form), noise[1])))
        lin, w = update(b, idx[1:-1], final_form)
        # the final update's own draw is the loop's dw: fold 1/sqrt|dt| into its coefficient
        fin = noise[-1][:-1] + (noise[-1][-1] / math.sqrt(abs(tl[a] - tl[b])),)
        pred = [self._pred_coefs(*ms[j]) for j in idx[:-1]]
        return tuple(stages), lin, w, fin, tuple(pred)

    def _pred_coefs(self, m: float, s: float) -> float:
        r"""$s^2$ of the stored data prediction $\tilde P = x + s^2 s_\theta$; $-s$ of the noise prediction $-s\,s_\theta$."""
        return s * s if self.prediction == "data" else -s

    # -------------------------------------------------------------------------------- stepping
    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        if self.table is None:
            raise ValueError("DPMSolverSinglestep needs its table: run it through integrate_fixed_grid (which "
                             "prepares it) or build it with DPMSolverSinglestep.tabulated(sde, fine, orders)")
        if self.eta > 0.0 and self.draw is None and any(row[0] for row in self.table):
            raise ValueError("DPMSolverSinglestep with eta > 0 and stages needs draw= for the stages' noise")
        # stage time vectors, made once on the state's device (one allocation, then views)
        flat = [ts for row in self.table for ts, _ in row[0]]
        vecs = torch.tensor(flat, dtype=t0.dtype, device=t0.device).unsqueeze(1).expand(len(flat), t0.shape[0]).unbind(0)
        tv, k = [], 0
        for row in self.table:
            tv.append(vecs[k:k + len(row[0])])
            k += len(row[0])
        return 0, tv, 0

    def _pred(self, x: Tensor, score: Tensor, s2: float) -> Tensor:
        return torch.add(x, score, alpha=s2) if self.prediction == "data" else score * s2

    def nfe(self, steps: int) -> int:
        """One evaluation per step plus one per stage: the sum of the steps' orders."""
        if self.orders is not None:
            return sum(self.orders[:steps])
        return sum(1 + len(row[0]) for row in self.table[:steps])

    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any, dw: Tensor | None):
        i, tv, k_draw = state
        stages, lin, w, fin, pred = self.table[i]
        preds = [self._pred(x, dyn.score(x, t0), pred[0])]
        us: list[Tensor] = []
        for j, (_, (s_lin, s_w, s_noise)) in enumerate(stages):
            xs = x * s_lin
            for wj, pj in zip(s_w, preds):
                xs.add_(pj, alpha=wj)
            if self.eta > 0.0:
                us.append(self.draw(k_draw))
                k_draw += 1
                for cj, uj in zip(s_noise, us):
                    if cj != 0.0:
                        xs.add_(uj, alpha=cj)
            preds.append(self._pred(xs, dyn.score(xs, tv[i][j]), pred[j + 1]))
        x_new = x * lin
        for wj, pj in zip(w, preds):
            x_new.add_(pj, alpha=wj)
        if dw is not None:
            for cj, uj in zip(fin, (*us, dw)):
                if cj != 0.0:
                    x_new.add_(uj, alpha=cj)
        return x_new, None, (i + 1, tv, k_draw)


def build_dpm_singlestep(ctx, opts: dict) -> DPMSolverSinglestep:
    r"""``sdegen.sample`` builder: ``steps`` grid intervals (grid from ``grid=``/``rho=``) grouped into
    single-step updates by `singlestep_orders`; one evaluation per grid interval. Sets ``ctx.times`` to the
    groups' boundaries and returns the solver with ``fine`` and ``orders`` (the loop prepares its table)."""
    from ..grids import get_grid

    order = opts["order"]
    if order not in (1, 2, 3) or isinstance(order, bool):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    grid_opts = {"rho": opts["rho"]} if isinstance(opts["grid"], str) and opts["grid"] == "karras" else {}
    fine = get_grid(opts["grid"], ctx.sde, ctx.steps, ctx.eps, **grid_opts)
    orders = singlestep_orders(fine.numel() - 1, order, check_bool(opts["lower_order_final"], "lower_order_final"))
    if sum(orders) != fine.numel() - 1:        # without lower_order_final a remainder is one last group
        orders = orders + [fine.numel() - 1 - sum(orders)]
    ctx.dyn.affine      # TypeError for a non-affine SDE here, before the run
    ctx.times = DPMSolverSinglestep.group_times(fine, orders)
    return DPMSolverSinglestep(prediction=opts["prediction"], solver_type=opts["solver_type"],
                               eta=check_number(opts["eta"], "eta", low=0.0), noise=opts["noise"],
                               draw=ctx.unit_draw(), orders=orders, fine=fine)


def build_dpm_fast(ctx, opts: dict) -> DPMSolverSinglestep:
    r"""``sdegen.sample`` builder of k-diffusion's ``dpm_fast``: ``steps`` is the evaluation budget $n$;
    $M = \lfloor n/3\rfloor + 1$ steps uniform in $\lambda$ (the ``"log_snr"`` grid), orders from `fast_orders`,
    stages at $r = 1/2$ (order 2) and $r = 1/3, 2/3$ (order 3), noise prediction, the paper's updates."""
    from ..grids import get_grid

    n = ctx.steps
    orders = fast_orders(n)
    sde = ctx.dyn.affine
    coarse = get_grid("log_snr", sde, len(orders), ctx.eps)
    lam = (0.5 * sde.log_snr(coarse)).tolist()          # host floats: no per-element tensor ops
    # inner stage points at fractions 1/k, ..., (k-1)/k of each step in lambda; one inverse for all of them
    inner = [lam[j] + (lam[j + 1] - lam[j]) * q / k for j, k in enumerate(orders) for q in range(1, k)]
    t_inner = iter(sde.t_from_log_snr(2 * torch.tensor(inner, dtype=torch.float64)).to(torch.float64).tolist()
                   if inner else [])
    tc = coarse.tolist()
    fine = [tc[0]]
    for j, k in enumerate(orders):
        fine += [next(t_inner) for _ in range(k - 1)] + [tc[j + 1]]
    fine_t = torch.tensor(fine, dtype=torch.float64)
    ctx.times = DPMSolverSinglestep.group_times(fine_t, orders)
    return DPMSolverSinglestep(prediction=opts["prediction"], solver_type=opts["solver_type"], orders=orders, fine=fine_t)


#: ``sdegen.sample(method="dpm_solver_singlestep")`` options.
DPM_SINGLESTEP_OPTIONS = {"order": 3, "prediction": "data", "solver_type": "exact", "eta": 0.0, "noise": "brownian",
                          "grid": "karras", "rho": 7.0, "lower_order_final": True}
#: ``sdegen.sample(method="dpm_fast")`` options (k-diffusion's ``sample_dpm_fast`` with ``eta=0``).
DPM_FAST_OPTIONS = {"prediction": "noise", "solver_type": "paper"}
