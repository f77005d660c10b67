"""SDE classes: the abstract [`SDE`][sdegen.sdes.SDE], [`AffineSDE`][sdegen.sdes.AffineSDE], VP, sub-VP, VE, discrete-chain and user SDEs."""

from .affine import AffineSDE
from .base import SDE, CustomSDE, ReverseSDE
from .discrete import DiscreteVPSDE
from .flow import AbstractInterpolantSDE, FlowMatchingSDE, InterpolantSDE, flow_shift
from .ve import VESDE
from .vp import SubVPSDE, VPSDE

__all__ = ["SDE", "AffineSDE", "ReverseSDE", "CustomSDE", "DiscreteVPSDE", "VPSDE", "SubVPSDE", "VESDE",
           "AbstractInterpolantSDE", "InterpolantSDE", "FlowMatchingSDE", "flow_shift"]
