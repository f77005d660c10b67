r"""Butcher tableaus: explicit embedded Runge–Kutta pairs as data.

One step of an explicit RK method with $s$ stages and signed step $h$ is
$k_i = f(y_n + h \sum_{j<i} a_{ij} k_j,\ t_n + c_i h)$, $y_{n+1} = y_n + h \sum_i b_i k_i$, with the error
estimate $h \sum_i (b_i - \hat b_i) k_i$ from an embedded solution $\hat b$ (Hairer, Nørsett & Wanner,
"Solving ODEs I", Sec. II.4-II.5). One core runs every tableau here
(`sdegen.solvers.explicit_rk`): [`rk45_integrate`][sdegen.solvers.rk45.rk45_integrate] runs `DOPRI5` (or
any ODE tableau), [`adaptive_sde_integrate`][sdegen.solvers.adaptive_sde.adaptive_sde_integrate] runs
`EM_HEUN` with additive noise.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ButcherTableau", "DOPRI5", "EM_HEUN"]


@dataclass(frozen=True)
class ButcherTableau:
    r"""Coefficients of an explicit embedded Runge–Kutta pair (data only).

    Attributes:
        c: nodes $c_i$, ``(s,)``.
        a: lower-triangular rows $a_{ij}$, ``a[i]`` has ``i`` entries (row 0 is empty).
        b: weights of the propagated solution, ``(s,)``.
        b_err: $b - \hat b$, weights of the error estimate, ``(s,)``.
        order: order of the propagated solution.
        error_order: order of the embedded solution (the controller uses ``error_order + 1``).
        fsal: whether the last stage is $f(y_{n+1}, t_{n+1})$ (first same as last).
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_err: tuple[float, ...]
    order: int
    error_order: int
    fsal: bool

    def __post_init__(self):
        s = len(self.c)
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError("a must have s rows with row i holding i coefficients")
        if len(self.b) != s or len(self.b_err) != s:
            raise ValueError(f"b and b_err must have {s} entries")
        for i, row in enumerate(self.a):
            # Row sums equal the nodes: the consistency condition every RK method satisfies.
            if abs(sum(row) - self.c[i]) > 1e-12:
                raise ValueError(f"row {i} of a does not sum to c[{i}]")

    @property
    def stages(self) -> int:
        return len(self.c)


_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)

#: Dormand–Prince 5(4) (Dormand & Prince 1980, Table 2; Hairer–Nørsett–Wanner Table II.5.2).
DOPRI5 = ButcherTableau(
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        _B5[:6],
    ),
    b=_B5,
    b_err=tuple(p - q for p, q in zip(_B5, _B4)),
    order=5,
    error_order=4,
    fsal=True,
)

#: The Euler–Maruyama / improved-Euler (stochastic Heun) pair of Jolicoeur-Martineau et al. (2021),
#: Alg. 1: $c = (0, 1)$, $a_{21} = 1$, $b = (\tfrac12, \tfrac12)$ (Heun), embedded $\hat b = (1, 0)$
#: (Euler), so the error $y_{new} - \hat y$ has weights $b - \hat b = (-\tfrac12, \tfrac12)$. As an
#: ODE pair the orders are 2(1); on an SDE with additive noise the accepted Heun update has strong
#: order 1 (declared by `sdegen.solvers.explicit_rk.EulerHeun`).
EM_HEUN = ButcherTableau(c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), b_err=(-0.5, 0.5), order=2, error_order=1,
                         fsal=False)
