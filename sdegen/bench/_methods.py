r"""The benchmarks' method lists, read from [`sdegen.METHODS`][sdegen.sampling.METHODS].

A new row of the method table is benchmarked without editing any benchmark: each list here is a
property of the rows (``spec.build``, ``spec.fixed_grid``, ``spec.reverse_sde``, ``spec.backend``),
and the step count that spends a given number of score evaluations is measured from the method itself
(two short probe runs), not written down per method. Benchmarks keep their hand-picked variants
(orders, grids, options) and add every row they do not cover yet with its default options.
"""

from __future__ import annotations

import functools
import math

import torch

from ..sampling import METHODS, sample
from ..sdes import VPSDE
from ..solvers.ode_integrators import ODE_INTEGRATORS

__all__ = ["loop_methods", "fixed_step_methods", "adaptive_methods", "native_methods", "nfe_line",
           "steps_for_nfe"]


def loop_methods() -> tuple[str, ...]:
    """Rows the one fixed-grid loop runs (a solver built by ``spec.build``): every native fixed-grid method."""
    return tuple(name for name, spec in METHODS.items() if spec.build is not None)


def fixed_step_methods() -> tuple[str, ...]:
    """Rows that take ``steps=``: the loop's and the fixed-step backends' (``torchsde``)."""
    return tuple(name for name, spec in METHODS.items() if spec.fixed_grid)


def adaptive_methods(*, reverse_sde: bool | None = None) -> tuple[str, ...]:
    """Rows with a tolerance instead of ``steps`` (``rtol``/``atol``); ``reverse_sde`` selects SDE or ODE rows."""
    return tuple(name for name, spec in METHODS.items()
                 if not spec.fixed_grid and (reverse_sde is None or spec.reverse_sde == reverse_sde))


def native_methods() -> tuple[str, ...]:
    """Rows whose integrator is sdegen's own code in torch: the loop's, the native ODE integrators of
    `sdegen.solvers.ode_integrators` and the adaptive rows without a backend; not the adapters to
    torchdiffeq, scipy and torchsde."""
    def native(name, spec) -> bool:
        if name in ODE_INTEGRATORS:
            return ODE_INTEGRATORS[name].native
        return spec.backend is None

    return tuple(name for name, spec in METHODS.items() if native(name, spec))


@functools.lru_cache(maxsize=None)
def nfe_line(method: str) -> tuple[float, float]:
    r"""``(a, b)`` with NFE $= a \cdot \text{steps} + b$ for ``method`` at its default options.

    Measured by two probe runs (32 and 64 steps, batch 2, the exact score $-x$ of $\mathcal N(0, I)$
    data under VP), so a method's evaluations per step, a final denoising step or a fixed extra cost
    (Restart's re-noised segments) come from the method itself.
    """
    sde = VPSDE()
    nfe = []
    for steps in (32, 64):
        res = sample(sde, lambda x, t: -x, (2, 2), method=method, steps=steps, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(0))
        nfe.append(res.nfe)
    a = (nfe[1] - nfe[0]) / 32
    return a, nfe[0] - 32 * a


def steps_for_nfe(method: str, nfe: int) -> int:
    """The largest step count (at least 1) whose NFE for ``method`` at its defaults is at most ``nfe``."""
    a, b = nfe_line(method)
    return max(1, math.floor((nfe - b) / a + 1e-9))
