r"""Per-grid-point coefficients of an SDE on a time grid, computed once per run: the one place solvers read them.

[`GridCoefficients`][sdegen.solvers.marginal_rows.GridCoefficients] holds, for every time $t_k$ of a grid,
the marginal $m(t_k), s(t_k)$, the log-SNR $\lambda_k = \log(m/s)$, the drift coefficient $a(t_k)$ and
$g(t_k)^2$ (and per step the kernel $r, q$ between neighbours), as float64 host numbers. Affine SDEs
get every column, each computed by one vectorised call the first time it is read; any other SDE gets
the times and $g^2$, and its solvers evaluate the drift on the fly. The fixed-grid loop builds one per
call and hands it to [`AbstractFixedGridSolver.prepare`][sdegen.solvers.base.AbstractFixedGridSolver.prepare],
so a solver's per-step weights are Python floats (no per-step device sync, no per-step marginal call).

The stochastic samplers of [`sdegen.solvers.sde_dpm`][sdegen.solvers.sde_dpm],
[`sdegen.solvers.ancestral_k`][sdegen.solvers.ancestral_k] and [`sdegen.solvers.restart`][sdegen.solvers.restart]
are written in the scaled picture $\hat x = x/m$, $\sigma = s/m$, $\lambda = \log(m/s) = -\log\sigma$ of
any [`AffineSDE`][sdegen.AffineSDE] (Karras et al. 2022, §4; Lu et al. 2022b, eq. 8).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..sdes import SDE, AffineSDE

__all__ = ["GridCoefficients", "check_table_grid", "sigma_to_time", "lambda_of"]



class GridCoefficients:
    r"""An SDE's coefficients on the grid $t_0 > t_1 > \dots > t_n$ (or any 1-D grid), float64 on the host.

    Columns are lists of Python floats, computed lazily, each by ONE vectorised call of the SDE the
    first time it is read, then cached: ``m``, ``s`` ($x_t \mid x_0 \sim \mathcal N(m x_0, s^2 I)$),
    ``lam`` ($\lambda = \log(m/s)$, $+\infty$ where $s = 0$), ``a`` ($f = a(t)x$), ``h`` ($-\tfrac12 g^2$,
    so the probability-flow velocity is $a x + h s$), ``g`` and ``g2`` ($g$, $g^2$); per step $k$ (from $t_k$ to
    $t_{k+1}$): ``dt`` ($t_{k+1} - t_k$, signed), ``r``, ``q`` (the kernel
    $x_{t_k} \mid x_{t_{k+1}} \sim \mathcal N(r x, q^2 I)$ for a decreasing grid). ``m``, ``s``, ``lam``,
    ``a``, ``h``, ``r`` and ``q`` need an [`AffineSDE`][sdegen.AffineSDE] (``TypeError`` naming it otherwise).

    Args:
        sde: the SDE.
        times: 1-D grid (tensor or sequence; converted to float64 on the host once).
    """

    __slots__ = ("sde", "times", "t", "n", "_cache")

    def __init__(self, sde: SDE, times: Tensor | list[float]):
        self.sde = sde
        self.times = torch.as_tensor(times, dtype=torch.float64).detach().to("cpu").reshape(-1)
        self.t = self.times.tolist()
        self.n = len(self.t) - 1
        self._cache: dict = {}

    @property
    def affine(self) -> bool:
        """Whether every column is available (the SDE is affine)."""
        return isinstance(self.sde, AffineSDE)

    def _affine_sde(self, what: str) -> AffineSDE:
        if not isinstance(self.sde, AffineSDE):
            raise TypeError(f"{what} needs an AffineSDE (a Gaussian kernel), got {type(self.sde).__name__}")
        return self.sde

    def _get(self, key: str):
        hit = self._cache.get(key)
        if hit is None:
            self._fill(key)
            hit = self._cache[key]
        return hit

    def _fill(self, key: str) -> None:
        t = self.times
        if key in ("m", "s"):
            m, s = self._affine_sde("the marginal m, s").marginal(t)
            self._cache["m"], self._cache["s"] = m.tolist(), s.tolist()
        elif key == "lam":
            self._cache["lam"] = [lambda_of(mk, sk) for mk, sk in zip(self.m, self.s)]
        elif key in ("a", "h"):
            a, h = self._affine_sde("the drift coefficient a").ode_coefs(t)
            self._cache["a"], self._cache["h"] = a.tolist(), h.tolist()
        elif key == "g":
            self._cache["g"] = self.sde.diffusion(t).tolist()
        elif key == "g2":
            self._cache["g2"] = [g * g for g in self.g]
        elif key == "dt":
            self._cache["dt"] = (t[1:] - t[:-1]).tolist()
        elif key in ("r", "q"):
            r, q = self._affine_sde("the transition kernel r, q").transition(t[1:], t[:-1])
            self._cache["r"], self._cache["q"] = r.tolist(), q.tolist()
        else:  # pragma: no cover - internal keys only
            raise KeyError(key)

    m = property(lambda self: self._get("m"), doc="$m(t_k)$, ``n + 1`` floats.")
    s = property(lambda self: self._get("s"), doc="$s(t_k)$, ``n + 1`` floats.")
    lam = property(lambda self: self._get("lam"), doc=r"$\lambda(t_k) = \log(m/s)$, ``n + 1`` floats.")
    a = property(lambda self: self._get("a"), doc="$a(t_k)$, ``n + 1`` floats.")
    h = property(lambda self: self._get("h"), doc=r"$-\tfrac12 g(t_k)^2$, ``n + 1`` floats.")
    g = property(lambda self: self._get("g"), doc="$g(t_k)$, ``n + 1`` floats.")
    g2 = property(lambda self: self._get("g2"), doc="$g(t_k)^2$, ``n + 1`` floats.")
    dt = property(lambda self: self._get("dt"), doc="$t_{k+1} - t_k$, ``n`` floats.")
    r = property(lambda self: self._get("r"), doc=r"$m(t_k)/m(t_{k+1})$, ``n`` floats.")
    q = property(lambda self: self._get("q"), doc=r"$\sqrt{s(t_k)^2 - r^2 s(t_{k+1})^2}$, ``n`` floats.")

    def tensor(self, key: str) -> Tensor:
        """A column as a float64 CPU tensor (for vectorised table construction)."""
        return torch.tensor(self._get(key), dtype=torch.float64)


def check_table_grid(solver, coefs: GridCoefficients) -> None:
    r"""``ValueError`` unless ``solver.table`` (one row per loop step) was built for the grid of ``coefs``.

    Checks the row count against the loop's steps and, where the solver recorded it (``table_times``),
    every grid time (relative $10^{-6}$: a float32 copy of the same grid still matches). A table of
    another grid would otherwise be applied silently with the wrong weights."""
    name, table, times = type(solver).__name__, solver.table, solver.table_times
    if len(table) != coefs.n:
        raise ValueError(f"{name}'s table has {len(table)} steps but the grid it runs on has {coefs.n}: it was "
                         f"prepared for another grid; construct {name} without table= and let the loop prepare it")
    if times is not None:
        for k, (a, b) in enumerate(zip(times, coefs.t)):
            if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12):
                raise ValueError(f"{name}'s table was prepared for another grid: time {k} is {a!r} there and {b!r} "
                                 f"in the grid it runs on; construct {name} without table= and let the loop prepare it")


def lambda_of(m: float, s: float) -> float:
    r"""$\lambda = \log(m/s)$; $+\infty$ at $s = 0$ (the data end of a grid that reaches $t = 0$)."""
    return math.inf if s == 0.0 else math.log(m / s)


def sigma_to_time(sde: AffineSDE, sigmas) -> list[float]:
    r"""Times $t$ with $\sigma(t) = $ ``sigmas`` (the SDE's inverse, bisection in float64); host floats."""
    sig = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    return sde.t_from_sigma(sig).to(torch.float64).tolist()
