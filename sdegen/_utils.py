r"""Small shared helpers: broadcasting per-sample scalars, time tensors and argument checks.

Nothing here knows about SDEs; every other module may import it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "append_dims",
    "as_time",
    "check_time_range",
    "check_positive",
    "check_floating",
    "sum_except_batch",
    "is_traceable_device",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def append_dims(v: Tensor, ndim: int) -> Tensor:
    r"""Append trailing singleton dimensions to ``v`` until it has ``ndim`` dimensions.

    Used to broadcast a per-sample scalar of shape ``(B,)`` against data ``x`` of shape ``(B, *D)``:
    ``append_dims(std, x.ndim) * noise``.

    Args:
        v: tensor of shape ``(B,)`` (or any shape with at most ``ndim`` dimensions).
        ndim: the number of dimensions of the result.

    Returns:
        ``v`` viewed with shape ``(*v.shape, 1, ..., 1)``.

    Raises:
        ValueError: if ``v`` already has more than ``ndim`` dimensions.
    """
    extra = ndim - v.ndim
    if extra < 0:
        raise ValueError(f"append_dims: input has {v.ndim} dims, more than the target ndim={ndim}")
    return v.reshape(*v.shape, *([1] * extra))


def as_time(t: Any, batch: int, *, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None, name: str = "t") -> Tensor:
    r"""Return time as a float tensor of shape ``(batch,)``.

    Accepts a Python number, a 0-d tensor, a ``(1,)`` tensor or a ``(batch,)`` tensor.

    Args:
        t: the time value(s).
        batch: the batch size B.
        device, dtype: target device and dtype (default: those of ``t`` if a tensor, else CPU
            and the default dtype).
        name: argument name used in error messages.

    Raises:
        TypeError: if ``t`` is not a number or a floating tensor.
        ValueError: if ``t`` has a shape that does not broadcast to ``(batch,)``.
    """
    if isinstance(t, Tensor):
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
            t = t.reshape(1).expand(batch)
        elif t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        return t.to(device=device if device is not None else t.device,
                    dtype=dtype if dtype is not None else
                    (t.dtype if t.is_floating_point() else torch.get_default_dtype()))
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return torch.full((batch,), float(t), device=device,
                          dtype=dtype if dtype is not None else torch.get_default_dtype())
    raise TypeError(f"{name} must be a float or a tensor, got {type(t).__name__}")


def is_traceable_device(t: Tensor) -> bool:
    """True when reading values of ``t`` costs no device-to-host synchronisation (CPU/meta)."""
    return t.device.type == "cpu"


def check_time_range(t: Tensor, T: float, *, name: str = "t", lo: float = 0.0) -> None:
    r"""Raise ``ValueError`` if any entry of ``t`` lies outside ``[lo, T]`` (or is not finite).

    The check reads values, so it runs only for CPU tensors: on an accelerator it would force a
    device-to-host synchronisation on every call inside a solver loop. The samplers validate their
    time grid once at the entry point instead.
    """
    if not is_traceable_device(t) or t.numel() == 0:
        return
    tmin = float(t.min())
    tmax = float(t.max())
    # A relative slack of a few ulps so that grids built as T - k*dt in float32 pass.
    slack = 1e-6 * max(1.0, abs(T))
    if not (math.isfinite(tmin) and math.isfinite(tmax)) or tmin < lo - slack or tmax > T + slack:
        raise ValueError(f"{name} must lie in [{lo}, {T}], got values in [{tmin}, {tmax}]")


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """Return ``float(value)`` after checking it is a finite positive (or non-negative) number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    ok = v >= 0 if allow_zero else v > 0
    if not math.isfinite(v) or not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {kind} number, got {value!r}")
    return v


def check_floating(x: Tensor, name: str = "x") -> None:
    """Raise ``TypeError`` unless ``x`` is a floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/float64), got dtype {x.dtype}")


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: ``(B, *D) -> (B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)
