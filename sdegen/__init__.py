r"""sdegen: score-based generative modelling with stochastic differential equations.

Forward time runs from 0 (data) to ``sde.T`` (noise); samplers integrate back from ``T`` to ``eps``.
See ``docs/`` for the theory and the API reference.
"""

from .oracle import GaussianMixture, named_mixture
from .sdes import SDE, AffineSDE, CustomSDE, ReverseSDE, SubVPSDE, VESDE, VPSDE
from .solvers.base import NonFiniteError, SampleResult, StepSizeError

__version__ = "0.1.0"

__all__ = [
    "SDE", "AffineSDE", "CustomSDE", "ReverseSDE", "VPSDE", "SubVPSDE", "VESDE",
    "GaussianMixture", "named_mixture",
    "SampleResult", "NonFiniteError", "StepSizeError",
]
