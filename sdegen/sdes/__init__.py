"""SDE classes: the abstract :class:`SDE`, :class:`AffineSDE`, VP, sub-VP, VE and user SDEs."""

from .affine import AffineSDE
from .base import SDE, CustomSDE, ReverseSDE
from .ve import VESDE
from .vp import SubVPSDE, VPSDE

__all__ = ["SDE", "AffineSDE", "ReverseSDE", "CustomSDE", "VPSDE", "SubVPSDE", "VESDE"]
