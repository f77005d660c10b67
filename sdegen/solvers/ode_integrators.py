r"""The adaptive ODE integrators, by name: one table that sampling and the likelihood both read.

Each entry integrates $dy/dt = f(y, t)$ from ``t0`` to ``t1`` at a tolerance, with ``f(y, t)`` the
same right-hand side the native solvers use (``y`` ``(B, *D)``, ``t`` a ``(B,)`` tensor in forward
time; ``t1 < t0`` for sampling, from ``T`` down to ``eps``, and ``t1 > t0`` for likelihoods and
encoding). [`ODE_INTEGRATORS`][sdegen.solvers.ode_integrators.ODE_INTEGRATORS] is the one place an
integrator is registered: `sdegen.sampling.METHODS` builds a probability-flow row from every entry
(a ``sample`` method), and `sdegen.likelihood.log_likelihood`, ``encode`` and ``decode`` accept every
entry as ``method=`` (``sdegen.likelihood.ODE_METHODS`` is the tuple of its names).

An entry's option defaults (``rtol``, ``atol`` and, for the backends, ``solver``) are read from its
function's signature, so they are set once, where the function is. The optional packages (torchdiffeq,
scipy) are imported inside the backend functions, so this table imports without them.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import Tensor

from .backends import scipy_integrate, torchdiffeq_integrate
from .rk45 import rk45_integrate

__all__ = ["ODEIntegrator", "ODE_INTEGRATORS", "TOLERANCES", "ROW_OPTIONS"]

#: The tolerances every integrator takes (``log_likelihood`` passes both).
TOLERANCES = ("rtol", "atol")
#: The options a ``sample`` row and ``log_likelihood`` set explicitly, with the function's own defaults.
ROW_OPTIONS = ("solver", *TOLERANCES)
# What a native integrator takes besides its options: it reports progress, records a trajectory and can
# control each sample's step on its own.
_NATIVE_PARAMS = ("progress", "record_every", "per_sample")


@functools.lru_cache(maxsize=None)
def _keyword_params(fn: Callable) -> Mapping[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(fn).parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


@dataclass(frozen=True)
class ODEIntegrator:
    r"""One adaptive ODE integrator: its function and how to call it (final class).

    Attributes:
        function: ``function(fn, y0, t0, t1, *, rtol, atol, **options)``; a native one returns
            ``(y1, stats, trajectory)``, a backend ``(y1, stats)``.
        native: ``True`` for an integrator in torch that takes ``progress``, ``record_every`` and
            ``per_sample`` and returns a trajectory (`sdegen.solvers.rk45.rk45_integrate`); ``False``
            for an adapter to another library (`sdegen.solvers.backends`).
        doc: one line, the ``sample`` row's doc.

    Raises:
        TypeError: ``function`` lacks a keyword ``rtol`` or ``atol`` with a default, or a native one
            lacks ``progress``, ``record_every`` or ``per_sample``.
    """

    function: Callable[..., tuple]
    native: bool
    doc: str

    def __post_init__(self):
        params = _keyword_params(self.function)
        needed = TOLERANCES + (_NATIVE_PARAMS if self.native else ())
        missing = [name for name in needed
                   if name not in params or params[name].default is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"an ODE integrator's function must take keyword options {', '.join(needed)} with "
                            f"defaults; {self.function.__qualname__} lacks {', '.join(missing)}")

    def load(self) -> Callable[..., tuple]:
        """The function (a ``MethodSpec.backend``: its keyword parameters are the row's further options)."""
        return self.function

    def options(self) -> dict[str, Any]:
        """The row options ``solver`` (where it has one), ``rtol``, ``atol`` with the function's own defaults."""
        params = _keyword_params(self.function)
        return {name: params[name].default for name in ROW_OPTIONS if name in params}

    def integrate(self, fn: Callable[[Tensor, Tensor], Tensor], y0: Tensor, t0: float, t1: float, *,
                  progress: bool = False, record_every: int | None = None,
                  **options) -> tuple[Tensor, dict, list[tuple[float, Tensor]] | None]:
        r"""Integrate $dy/dt = f(y, t)$ from ``t0`` to ``t1``.

        Args:
            fn: ``fn(y, t) -> dy/dt``; ``y`` ``(B, *D)``, ``t`` ``(B,)`` in forward time.
            y0: ``(B, *D)`` state at ``t0``.
            t0: start time.
            t1: end time (``t1 < t0`` allowed).
            progress: a progress bar (native integrators; the backends show none).
            record_every: keep every k-th accepted state (native integrators; the backends record none).
            **options (Any): the function's options (``rtol``, ``atol``, ``solver``, ``per_sample``, ...);
                the function checks them.

        Returns:
            ``(y1, stats, trajectory)``; ``trajectory`` is ``None`` for the backends.
        """
        if self.native:
            return self.function(fn, y0, t0, t1, progress=progress, record_every=record_every, **options)
        y1, stats = self.function(fn, y0, t0, t1, **options)
        return y1, stats, None


ODE_INTEGRATORS: dict[str, ODEIntegrator] = {
    "rk45": ODEIntegrator(rk45_integrate, native=True,
                          doc="probability-flow ODE, adaptive Dormand-Prince RK45 in torch"),
    "torchdiffeq": ODEIntegrator(torchdiffeq_integrate, native=False,
                                 doc="probability-flow ODE through torchdiffeq.odeint"),
    "scipy": ODEIntegrator(scipy_integrate, native=False,
                           doc="probability-flow ODE through scipy.integrate.solve_ivp (host copies)"),
}
"""Every adaptive ODE integrator by name. An entry here is at once a ``sample`` method (a row of
`sdegen.sampling.METHODS`) and a ``method=`` of `sdegen.likelihood.log_likelihood`, ``encode`` and
``decode``."""
