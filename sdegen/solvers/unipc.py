r"""UniPC: the unified predictor (UniP) and corrector (UniC) of Zhao et al. 2023, any affine SDE.

In $\lambda = \log(m/s)$ (half of ``sde.log_snr``) with $h = \lambda_{i+1} - \lambda_i$ and predictions
$y_j$ (data $\hat x_0$ or noise $\hat\epsilon$, Tweedie from the score), a step of order $p$ from
$t_a$ to $t_b$ is (Zhao et al. 2023, Alg. 2/3 and eq. 8, with $\hat h = -h$ for data, $h$ for noise)

$$x_b = \ell\,x_a + o\big[\hat h\varphi_1(\hat h)\,y_a + B(\hat h)\textstyle\sum_{k=1}^{p-1}\rho_k D_k\big],\qquad
  D_k = \frac{y_{a-k} - y_a}{r_k},\ r_k = \frac{\lambda_{a-k} - \lambda_a}{h},$$

$\hat h\varphi_1(\hat h) = e^{\hat h} - 1$, $(\ell, o) = (s_b/s_a, -m_b)$ (data) or $(m_b/m_a, -s_b)$ (noise),
and $B(\hat h) = \hat h$ (``"bh1"``) or $e^{\hat h} - 1$ (``"bh2"``). The weights solve
$\sum_k \rho_k r_k^{q-1} = g_q(\hat h)\,q!/B(\hat h)$, $q = 1..p-1$, with $g_1 = \varphi_1 - 1$,
$g_{q+1} = g_q/\hat h - 1/(q+1)!$ (eq. 8); for $p = 2$ UniP uses $\rho_1 = \tfrac12$.

**UniC** (the corrector): after the model is evaluated at the predicted $x_b$, the step $a \to b$ is
redone with the new prediction $y_b$ as one more node ($r_p = 1$, $D_p = y_b - y_a$; $p$ equations;
$\rho = \tfrac12$ for $p = 1$). The model is *not* re-evaluated at the corrected state: the next step
starts from it with the prediction $y_b$ already made, so one evaluation per step and the order rises
from $p$ to $p + 1$ (Zhao et al. 2023, Thm. 3.3). The last step has no corrector (no evaluation follows).

Every coefficient depends only on the grid and the step index: they are computed once per grid in
float64 on the host (`UniPC.prepare`, which the fixed-grid loop calls once per run), and a step is
$\ell x + \sum_j w_j y_j$.

Notation map (UniPC → sdegen): $\alpha_t$ → ``mean_coef`` $m$; $\sigma_t$ → ``std`` $s$;
$\lambda_t$ → ``0.5 * sde.log_snr(t)``; $x_\theta$ / $\epsilon_\theta$ → ``prediction="data"`` / ``"noise"``.

Reference: W. Zhao, L. Bai, Y. Rao, J. Zhou, J. Lu, *UniPC: A Unified Predictor-Corrector Framework
for Fast Sampling of Diffusion Models*, NeurIPS 2023 (arXiv:2302.04867).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._utils import check_bool, check_int
from .marginal_rows import GridCoefficients
from .dpm_solver import PREDICTIONS
from .multistep import ScoreHistoryMultistep, _grid, affine_grid, check_n_steps

__all__ = ["UniPC", "VARIANTS"]

#: The $B(h)$ choices of Zhao et al. 2023, §3.2: ``"bh1"`` $B = h$, ``"bh2"`` $B = e^h - 1$.
VARIANTS = ("bh1", "bh2")


def _b_vector(hh: float, p: int, variant: str) -> tuple[float, float, list[float]]:
    r"""$(e^{\hat h} - 1,\ B(\hat h),\ [g_q q!/B]_{q=1..p})$ for $\hat h$ (see the module docstring)."""
    phi1 = math.expm1(hh)
    B = hh if variant == "bh1" else phi1
    g, fact, b = phi1 / hh - 1.0, 1.0, []
    for q in range(1, p + 1):
        b.append(g * fact / B)
        fact *= q + 1
        g = g / hh - 1.0 / fact
    return phi1, B, b


def _solve(A: list[list[float]], b: list[float]) -> list[float]:
    """Solve the small (n <= 3) system ``A x = b`` by Gaussian elimination with partial pivoting, in
    Python floats (NumPy's call overhead was most of the per-grid tabulation time)."""
    n = len(b)
    M = [row[:] + [bi] for row, bi in zip(A, b)]
    for c in range(n):
        piv = max(range(c, n), key=lambda k: abs(M[k][c]))
        M[c], M[piv] = M[piv], M[c]
        for k in range(c + 1, n):
            f = M[k][c] / M[c][c]
            for j in range(c, n + 1):
                M[k][j] -= f * M[c][j]
    x = [0.0] * n
    for c in range(n - 1, -1, -1):
        x[c] = (M[c][n] - sum(M[c][j] * x[j] for j in range(c + 1, n))) / M[c][c]
    return x


def _weights(lam: list[float], a: int, p: int, hh: float, variant: str, corrector: bool) -> tuple[list[float], float]:
    r"""Weights of $y_a, y_{a-1}, \dots, y_{a-p+1}$ (and of $y_b$ for the corrector) in the bracket
    $[\cdot]$ of the update, for the step $a \to a + 1$ of order $p$ (before the factor $o$)."""
    h = lam[a + 1] - lam[a]
    phi1, B, b = _b_vector(hh, p, variant)
    r = [(lam[a - k] - lam[a]) / h for k in range(1, p)]
    if corrector:
        if p == 1:
            rho = [0.5]
        else:
            rho = _solve([[rk ** q for rk in r + [1.0]] for q in range(p)], b[:p])
    elif p == 1:
        rho = []
    elif p == 2:
        rho = [0.5]
    else:
        rho = _solve([[rk ** q for rk in r] for q in range(p - 1)], b[:p - 1])
    w = [phi1] + [0.0] * (p - 1)
    for k in range(1, p):
        w[k] += B * rho[k - 1] / r[k - 1]
        w[0] -= B * rho[k - 1] / r[k - 1]
    w_new = 0.0
    if corrector:
        w_new = B * rho[-1]
        w[0] -= w_new
    return w, w_new


def _stored(m: list[float], s: list[float], prediction: str) -> tuple[tuple[float, ...] | None, list[float]]:
    r"""What a step stores per grid point and the factor that turns it into the prediction $y$.

    Data: $z = x + s^2\nabla\log p$ and $y = z/m$ (Tweedie); noise: $z = \nabla\log p$ and $y = -s z$.
    The factors are folded into the precomputed weights, so a step converts with one kernel (data) or
    none (noise). Returns ``(s^2 per point or None, factor per point)``."""
    if prediction == "data":
        return tuple(si * si for si in s), [1.0 / mi for mi in m]
    return None, [-si for si in s]


@dataclass(frozen=True)
class UniPC(ScoreHistoryMultistep):
    r"""UniPC multistep sampler: UniP-$p$ predictor with the UniC corrector, any affine SDE.

    Step $i$ ($t_i \to t_{i+1}$) evaluates the model once at $x_i$, giving $y_i$; with ``corrector``
    and $i > 0$ it first corrects $x_i$ by UniC over the previous step $t_{i-1} \to t_i$ (the same
    order as that step's predictor), then predicts $x_{i+1}$ by UniP of order
    $\min(\text{order}, i + 1)$ (and $\le N - i$ with ``lower_order_final``). The update formulas are
    in the module docstring. One evaluation per step; global order ``order + 1`` with the corrector
    (``lower_order_final=False``; the last step then has local error $O(h^{p+1})$), ``order`` without.
    For ``order=3`` the first step (UniP-1 + UniC, local error $O(h^3)$) bounds the asymptotic order
    by 3; its error, at high noise where the prediction barely changes, is tiny, and the measured
    slopes are 3.8-4.3 at 40-640 steps (``tests/solvers/test_multistep_samplers.py``).
    Equals diffusers' ``UniPCMultistepScheduler`` (``solver_order=order``, ``predict_x0``,
    ``solver_type=variant``, ``lower_order_final``) on the same grid.

    The ``state`` is ``(i, hist)``: the step index and the last ``order + 1`` stored predictions.
    The corrected state is never formed: it is folded into the next prediction (``_fold_corrector``),
    the same update in one linear combination.

    Args:
        order: the UniP order $p$: 1, 2 or 3 (diffusers' ``solver_order``).
        prediction: ``"data"`` ($\hat x_0$, default) or ``"noise"`` ($\hat\epsilon$).
        variant: ``"bh1"`` or ``"bh2"`` (default), the $B(h)$ of Zhao et al. §3.2.
        corrector: apply UniC after each evaluation (default on).
        n_steps: number of grid steps $N$ (for ``lower_order_final``).
        lower_order_final: order $\min(p, N - i)$ on step $i$ (default on, as diffusers).
        table: per-step coefficients for the grid the solver runs on (built by ``prepare``; leave ``None``).
    """

    order: int = 2  # type: ignore[misc]  # the UniP order; the global order with UniC is order + 1
    prediction: str = "data"
    variant: str = "bh2"
    corrector: bool = True
    n_steps: int | None = None
    lower_order_final: bool = True
    #: $s_i^2$ per grid point for the data prediction (``None``: noise prediction), built by ``prepare``.
    table_y: tuple | None = field(default=None, repr=False)

    def __post_init__(self):
        check_int(self.order, "order", low=1, high=3)   # True and 2.0 are not orders
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        check_bool(self.corrector, "corrector")
        check_bool(self.lower_order_final, "lower_order_final")
        if self.n_steps is not None and (not isinstance(self.n_steps, int) or self.n_steps < 1):
            raise ValueError(f"n_steps must be a positive int or None, got {self.n_steps!r}")

    @property
    def global_order(self) -> int:
        """The convergence order: ``order + 1`` with the corrector, ``order`` without."""
        return self.order + (1 if self.corrector else 0)

    def _orders(self, n: int) -> list[int]:
        ks = []
        for i in range(n):
            k = min(self.order, i + 1)
            if self.lower_order_final:
                k = max(1, min(k, n - i))
            ks.append(k)
        return ks

    def prepare(self, coefs: GridCoefficients) -> "UniPC":
        r"""This solver with every step's weights for the grid of ``coefs`` computed once in float64 on the host.

        First per step the predictor $x_{i+1} = \ell x^c_i + o\sum_j w^p_j y_{i-j}$ and the corrector
        $x^c_i = \ell_c x^c_{i-1} + o_c(\sum_j w^c_j y_{i-1-j} + w^c_\text{new} y_i)$, with the factors of
        $y = f z$ folded in; then ``_fold_corrector`` merges them into row $i$ = ``(alpha, [W_j])``."""
        affine_grid(self, coefs, log_snr=True)
        n = check_n_steps(self, coefs)
        m, s, lam = coefs.m, coefs.s, coefs.lam
        data = self.prediction == "data"
        s2, f = _stored(m, s, self.prediction)
        ks = self._orders(n)
        rows = []
        for i in range(n):
            h = lam[i + 1] - lam[i]
            hh = -h if data else h
            lin, out = (s[i + 1] / s[i], -m[i + 1]) if data else (m[i + 1] / m[i], -s[i + 1])
            wp, _ = _weights(lam, i, ks[i], hh, self.variant, False)
            wp = [out * w * f[i - k] for k, w in enumerate(wp)]
            corr = None
            if self.corrector and i > 0:
                a = i - 1
                hc = lam[i] - lam[a]
                hhc = -hc if data else hc
                lin_c, out_c = (s[i] / s[a], -m[i]) if data else (m[i] / m[a], -s[i])
                wc, wc_new = _weights(lam, a, ks[a], hhc, self.variant, True)
                corr = (lin_c, [out_c * w * f[a - k] for k, w in enumerate(wc)], out_c * wc_new * f[i])
            rows.append((lin, wp, corr))
        return dataclasses.replace(self, n_steps=n, table=_fold_corrector(rows), table_y=s2)

    @property
    def history(self) -> int:
        return self.order + 1

    def stored(self, x: Tensor, score: Tensor, i: int) -> Tensor:
        """The stored z: the prediction up to a per-point factor folded into the weights."""
        return score if self.table_y is None else torch.add(x, score, alpha=self.table_y[i])


def _fold_corrector(rows: list) -> tuple:
    r"""Fold UniC into the next prediction: per step ``(alpha, [W_j])`` with $x_{i+1} = \alpha x_i + \sum_j W_j z_{i-j}$.

    With the predictor $x_{i+1} = \ell_i x^c_i + P_i(z)$ and the corrector $x^c_i = \ell^c_i x^c_{i-1} + C_i(z)$,
    the corrected state is $x^c_{i-1} = (x_i - P_{i-1}(z))/\ell_{i-1}$, so
    $x_{i+1} = \ell_i r x_i + \ell_i[C_i - r P_{i-1}] + P_i$ with $r = \ell^c_i/\ell_{i-1}$: the same update
    (algebraically) in one linear combination, without storing $x^c$ (5 kernels a step at order 2, not 8)."""
    out = []
    for i, (lin, wp, corr) in enumerate(rows):
        W = dict(enumerate(wp))                                   # j -> weight on z_{i-j}
        alpha = lin
        if corr is not None:
            lin_c, wc, wc_new = corr
            lin_prev, wp_prev, _ = rows[i - 1]
            r = lin_c / lin_prev
            alpha = lin * r
            C = {0: wc_new, **{k + 1: v for k, v in enumerate(wc)}}
            for k, v in enumerate(wp_prev):
                C[k + 1] = C.get(k + 1, 0.0) - r * v
            for j, v in C.items():
                W[j] = W.get(j, 0.0) + lin * v
        out.append((alpha, [W.get(j, 0.0) for j in range(max(W) + 1)]))
    return tuple(out)


def build_unipc(ctx, opts: dict) -> UniPC:
    r"""``sdegen.sample`` builder: sets ``ctx.times`` to the ``grid`` option and returns the solver (the loop
    prepares its weights)."""
    _grid(ctx, opts)
    return UniPC(order=opts["order"], prediction=opts["prediction"], variant=opts["variant"],
                 corrector=opts["corrector"], n_steps=ctx.times.numel() - 1,
                 lower_order_final=opts["lower_order_final"])


#: ``sdegen.sample(method="unipc")`` options and defaults (diffusers' defaults; the log-SNR grid).
UNIPC_OPTIONS = {"order": 2, "prediction": "data", "variant": "bh2", "corrector": True, "lower_order_final": True,
                 "grid": "log_snr", "rho": 7.0}
