r"""Exponential moving average of model weights (Polyak averaging), used for sampling."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._utils import check_number

__all__ = ["EMA"]


class EMA:
    r"""Shadow copy $\bar\theta \leftarrow \beta_k \bar\theta + (1 - \beta_k)\theta$ of a module's floating parameters.

    $\beta_k = \min(\beta, (1 + k)/(10 + k))$ after $k$ updates, so early averages are not dominated
    by the random initialisation (the warm-up of Tarvainen & Valpola 2017; used by Song et al. 2021).
    Buffers are copied, not averaged.

    Args:
        model: the module whose parameters are tracked.
        decay: $\beta \in [0, 1)$.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = check_number(decay, "decay", low=0.0, high=1.0, high_open=True)   # "0.9" and True refused
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {k: p.detach().clone() for k, p in model.named_parameters()}

    def current_decay(self) -> float:
        """$\\beta_k$ for the next update."""
        k = self.num_updates
        return min(self.decay, (1 + k) / (10 + k))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current parameters of ``model`` into the average."""
        w = 1.0 - self.current_decay()
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.detach(), w)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the parameters of ``model`` with the averages."""
        for k, p in model.named_parameters():
            p.copy_(self.shadow[k])

    def state_tensors(self) -> dict[str, Tensor]:
        """The shadow weights keyed by parameter name (for checkpoints)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load(self, tensors: dict[str, Tensor], num_updates: int) -> None:
        """Restore shadow weights and the update count; names and shapes must match."""
        if set(tensors) != set(self.shadow):
            raise ValueError(f"EMA names differ: missing {sorted(set(self.shadow) - set(tensors))[:5]}, "
                             f"unexpected {sorted(set(tensors) - set(self.shadow))[:5]}")
        for k, v in tensors.items():
            if v.shape != self.shadow[k].shape:
                raise ValueError(f"EMA tensor {k!r}: expected shape {tuple(self.shadow[k].shape)}, got {tuple(v.shape)}")
            self.shadow[k].copy_(v)
        self.num_updates = int(num_updates)
