r"""Small shared helpers: broadcasting per-sample scalars, time tensors and argument checks.

Nothing here knows about SDEs; every other module may import it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "append_dims",
    "as_time",
    "check_time_range",
    "check_positive",
    "check_number",
    "check_int",
    "check_seed",
    "check_bool",
    "check_floating",
    "check_shaped_like",
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
        device: target device (default: that of ``t`` if a tensor, else the CPU).
        dtype: target dtype (default: that of ``t`` if a floating tensor, else the default dtype).
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


def _describe(value: Any) -> str:
    """``repr`` of a received value with its type, for error messages (shortened if long)."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _is_bool(value: Any) -> bool:
    """``bool`` or a numpy bool (``numpy.bool_``, named ``bool`` in numpy 2), without importing numpy."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"))


def _as_real(value: Any, name: str, expected: str) -> float:
    """``value`` as a Python float if it is a real number; ``TypeError`` otherwise.

    Accepted: ``int``, ``float``, numpy integer/floating scalars, ``fractions.Fraction`` and 0-d real
    tensors. Refused: ``bool`` (``True`` is an ``int`` in Python, but never a meant number here),
    strings (``"1e-3"`` is a typo for ``1e-3`` in a config, not a number), complex values, ``None`` and
    tensors with more than one element.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.ndim > 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be {expected}, got a tensor of dtype {value.dtype} and shape "
                            f"{tuple(value.shape)}")
        return float(value.item())
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {_describe(value)}")
    return float(value)


def check_number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    r"""Return ``value`` as a finite float after checking its type and range.

    The one number check of the public entry points: errors name the argument, the expected range and
    the received value with its type.

    Args:
        value: the received value.
        name: the argument's name, used in the message.
        low: lower bound, or ``None`` for none.
        high: upper bound, or ``None`` for none.
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.

    Returns:
        ``float(value)``.

    Raises:
        TypeError: ``value`` is not a real number (``bool``, ``str``, ``None``, complex, a tensor
            with more than one element).
        ValueError: ``value`` is NaN, infinite or outside the range.
    """
    expected = "a finite number" + _range_text(low, high, low_open, high_open)
    v = _as_real(value, name, "a real number")
    ok = math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {_describe(value)}")
    return v


def _fmt(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_fmt(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_fmt(high)}"
    return ""


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """Return ``float(value)`` after checking it is a finite positive (or non-negative) real number.

    ``bool`` and ``str`` are refused with a ``TypeError`` (see `check_number`).
    """
    v = _as_real(value, name, "a real number")
    ok = v >= 0 if allow_zero else v > 0
    if not math.isfinite(v) or not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {kind} number, got {_describe(value)}")
    return v


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    r"""Return ``value`` as a Python ``int`` after checking its type and range ``[low, high]``.

    Accepted: ``int``, numpy integer scalars and 0-d integer tensors. Refused with ``TypeError``:
    ``bool``, every float (``1.7`` would silently become 1, and ``2.0`` is refused too so that
    the rule is one rule), strings and ``None``.

    Args:
        value: the received value.
        name: the argument's name, used in the message.
        low: smallest allowed value, or ``None``.
        high: largest allowed value, or ``None``.

    Raises:
        TypeError: ``value`` is not an integer.
        ValueError: ``value`` lies outside ``[low, high]``.
    """
    expected = "an int" + _range_text(low, high, False, False)
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.ndim > 1 or value.is_floating_point() or value.is_complex() \
                or value.dtype == torch.bool:
            raise TypeError(f"{name} must be {expected}, got a tensor of dtype {value.dtype} and shape "
                            f"{tuple(value.shape)}")
        v = int(value.item())
    elif _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {_describe(value)}")
    else:
        v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name} must be {expected}, got {_describe(value)}")
    return v


#: Largest seed accepted anywhere (torch generators take 64-bit seeds; the training loop derives
#: ``seed + 1`` and ``seed + 2`` from it, so the bound stays well inside).
MAX_SEED = 2**63 - 1


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed: an int in ``[0, 2**63 - 1]`` (negative seeds are refused everywhere, as in the CLI)."""
    return check_int(value, name, low=0, high=MAX_SEED)


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` if it is a ``bool`` (numpy bools included); ``TypeError`` otherwise (``1``, ``"yes"``)."""
    if _is_bool(value):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {_describe(value)}")


def check_floating(x: Tensor, name: str = "x") -> None:
    """Raise ``TypeError`` unless ``x`` is a floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/float64), got dtype {x.dtype}")


def check_shaped_like(t: Any, x: Tensor, name: str, like: str = "x0") -> None:
    """Raise ``ValueError`` unless ``t`` is a tensor with ``x``'s shape (``like`` names ``x`` in the message)."""
    if not isinstance(t, Tensor) or t.shape != x.shape:
        raise ValueError(f"{name} must be a tensor shaped like {like} {tuple(x.shape)}, got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: ``(B, *D) -> (B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)
