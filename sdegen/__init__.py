r"""sdegen: score-based generative modelling with stochastic differential equations.

Forward time runs from 0 (data) to ``sde.T`` (noise); samplers integrate back from ``T`` to ``eps``.
See ``docs/`` for the theory and the API reference.
"""

from importlib import import_module

from .oracle import GaussianMixture, named_mixture
from .sdes import SDE, AffineSDE, CustomSDE, ReverseSDE, SubVPSDE, VESDE, VPSDE
from .sdes import FlowMatchingSDE, InterpolantSDE, flow_shift
from .solvers.base import NonFiniteError, SampleResult, StepSizeError

__version__ = "0.1.0"

# Public names defined in modules that import heavier dependencies are loaded on first access,
# so that `import sdegen` stays cheap and the import graph stays one-way (STYLE.md).
_LAZY = {
    "sample": "sdegen.sampling",
    "METHODS": "sdegen.sampling",
    "DDPM": "sdegen.ddpm",
    "gaussian_kl": "sdegen.gaussian",
    "continuous_vlb": "sdegen.vlb",
    "ScoreModel": "sdegen.parameterization",
    "dsm_loss": "sdegen.training",
    "train": "sdegen.training",
    "load": "sdegen.training",
    "Trainer": "sdegen.training",
    "TrainResult": "sdegen.training",
    "CheckpointError": "sdegen.training",
    "TrainingDivergedError": "sdegen.training",
    "smld_loss": "sdegen.training",
    "log_likelihood": "sdegen.likelihood",
    "bits_per_dim": "sdegen.likelihood",
    "encode": "sdegen.likelihood",
    "decode": "sdegen.likelihood",
    "dequantize": "sdegen.likelihood",
    "LikelihoodResult": "sdegen.likelihood",
    "PerSampleNoise": "sdegen._rng",
    "inpaint": "sdegen.conditional",
    "colorize": "sdegen.conditional",
}
_LAZY_MODULES = {"nn", "adapters", "guidance", "grids", "data", "training", "solvers", "distributed", "chunked"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in _LAZY_MODULES:
        return import_module(f"sdegen.{name}")
    raise AttributeError(f"module 'sdegen' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _LAZY_MODULES)


__all__ = [
    "SDE", "AffineSDE", "CustomSDE", "ReverseSDE", "VPSDE", "SubVPSDE", "VESDE",
    "FlowMatchingSDE", "InterpolantSDE", "flow_shift",
    "GaussianMixture", "named_mixture",
    "SampleResult", "NonFiniteError", "StepSizeError",
    *_LAZY,
]
