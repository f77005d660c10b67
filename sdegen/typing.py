"""Type aliases shared across sdegen."""

from __future__ import annotations

from typing import Callable, Protocol

from torch import Tensor

__all__ = ["ScoreFn", "TimeFn", "Generator"]


class ScoreFn(Protocol):
    r"""A score function: ``score_fn(x, t) -> Tensor`` shaped like ``x``, approximating
    $\nabla_x \log p_t(x)$. ``x``: ``(B, *D)``; ``t``: ``(B,)`` forward time in ``[0, T]``.
    Extra keyword arguments (``model_kwargs``, e.g. class labels) are passed through unchanged."""

    def __call__(self, x: Tensor, t: Tensor, **kwargs) -> Tensor: ...


#: A scalar function of time: ``(B,) -> (B,)``.
TimeFn = Callable[[Tensor], Tensor]

try:  # torch.Generator is a class; alias for annotations
    from torch import Generator  # noqa: F401
except ImportError:  # pragma: no cover
    Generator = object  # type: ignore
