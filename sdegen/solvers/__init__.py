"""Step rules, correctors, adaptive solvers and backends. See [`sdegen.solvers.base`][sdegen.solvers.base]."""

from .base import (AbstractFixedGridSolver, CountingScore, Dynamics, NonFiniteError, SampleResult, StepSizeError,
                   integrate_fixed_grid)

__all__ = ["AbstractFixedGridSolver", "CountingScore", "Dynamics", "NonFiniteError", "SampleResult",
           "StepSizeError", "integrate_fixed_grid"]
