"""Step rules, correctors, adaptive solvers and backends. See :mod:`sdegen.solvers.base`."""

from .base import (AbstractFixedGridSolver, CountingScore, Dynamics, NonFiniteError, SampleResult, StepSizeError,
                   integrate_fixed_grid)

__all__ = ["AbstractFixedGridSolver", "CountingScore", "Dynamics", "NonFiniteError", "SampleResult",
           "StepSizeError", "integrate_fixed_grid"]
