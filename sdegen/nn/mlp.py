r"""A residual MLP score network for vector data, conditioned on time (and optionally a class label)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .embeddings import LabelEmbedding, condition, make_time_embedding

__all__ = ["MLP"]

_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def make_activation(name: str) -> nn.Module:
    """An activation module by name (one of ``silu``, ``gelu``, ``relu``, ``tanh``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}; got {name!r}")
    return _ACTIVATIONS[name]()


def check_net_input(x: Tensor, t: Tensor, expected: tuple, cls: str) -> None:
    """Raise a clear error when ``x`` is not ``(B, *expected)`` (``None`` entries match any size)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{cls}: x must be a floating tensor, got {type(x).__name__}")
    ok = x.ndim == len(expected) + 1 and all(e is None or e == s for e, s in zip(expected, x.shape[1:]))
    if not ok:
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{cls}: x must have shape (B, {want}), got {tuple(x.shape)}")
    if not isinstance(t, Tensor) or t.shape != (x.shape[0],):
        raise ValueError(f"{cls}: t must be a tensor of shape ({x.shape[0]},), got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")


class _ResBlock(nn.Module):
    """``h + W2 act(W1 act(LN h) + E temb)``: pre-norm residual block with an additive time shift."""

    def __init__(self, width: int, emb_dim: int, activation: str, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc2 = nn.Linear(width, width)
        self.act = make_activation(activation)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(self.act(self.norm(h))) + self.emb(emb)
        return h + self.fc2(self.drop(self.act(z)))


class MLP(nn.Module):
    r"""Residual MLP $f_\theta(x, \tau, y)$ for data of shape ``(B, dim)`` (final class).

    $h_0 = W_\text{in} x$, then ``depth`` pre-norm residual blocks
    $h \leftarrow h + W_2\,\phi(W_1 \phi(\mathrm{LN}(h)) + E\,e(\tau, y))$ and a zero-initialised output
    layer, so a fresh network outputs 0 (the score of the prior for the "eps"/"score"
    parameterizations: a stable start). $e(\tau, y)$ is an MLP of the time embedding, plus a label
    embedding when ``num_classes`` is set.

    Args:
        dim: data dimension ``d``.
        hidden: width of the hidden layers.
        depth: number of residual blocks.
        time_embedding: ``"sinusoidal"`` or ``"fourier"`` (random Fourier features).
        emb_dim: size of the time (and label) embedding.
        num_classes: if set, the net is class-conditional; ``y = num_classes`` (or ``None``) is the
            null label for classifier-free guidance.
        activation: ``"silu"``, ``"gelu"``, ``"relu"`` or ``"tanh"``.
        dropout: dropout inside the residual blocks.

    Call: ``net(x, t, y=None)`` with ``x`` ``(B, dim)``, ``t`` ``(B,)`` (the time input chosen by
    [`sdegen.ScoreModel`][sdegen.parameterization.ScoreModel]) and ``y`` ``(B,)`` integer labels; returns ``(B, dim)``.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, *, time_embedding: str = "sinusoidal",
                 emb_dim: int = 64, num_classes: int | None = None, activation: str = "silu", dropout: float = 0.0):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth), ("emb_dim", emb_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")   # True would drop everything
        self.config: dict[str, Any] = dict(dim=dim, hidden=hidden, depth=depth, time_embedding=time_embedding,
                                           emb_dim=emb_dim, num_classes=num_classes, activation=activation,
                                           dropout=float(dropout))
        self.dim = dim
        self.time_embed = nn.Sequential(make_time_embedding(time_embedding, emb_dim), nn.Linear(emb_dim, emb_dim),
                                        make_activation(activation), nn.Linear(emb_dim, emb_dim))
        self.label_embed = LabelEmbedding(num_classes, emb_dim) if num_classes is not None else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_ResBlock(hidden, emb_dim, activation, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out_act = make_activation(activation)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def null_label(self) -> int | None:
        """Label index meaning "unconditional" (``None`` for an unconditional net)."""
        return None if self.label_embed is None else self.label_embed.null_label

    def forward(self, x: Tensor, t: Tensor, y: Tensor | int | None = None) -> Tensor:
        check_net_input(x, t, (self.dim,), "MLP")
        emb = condition(self.time_embed, self.label_embed, t, y, x, "MLP")
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(self.out_act(self.out_norm(h)))
