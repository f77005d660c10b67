r"""A compact U-Net for small images (8×8 to 32×32), conditioned on time and optionally a class label.

Architecture after DDPM (Ho et al. 2020, App. B) and NCSN++ (Song et al. 2021, App. H), scaled down:
residual blocks with GroupNorm and an additive time/label embedding, self-attention at the lowest
resolution(s) and in the middle, strided-conv downsampling, nearest-neighbour upsampling, skip
connections by concatenation, and a zero-initialised output convolution.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .embeddings import LabelEmbedding, condition, make_time_embedding
from .mlp import check_net_input

__all__ = ["UNet"]


def _groups(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` not above ``groups`` (GroupNorm needs one)."""
    return math.gcd(channels, groups)


class _ResBlock(nn.Module):
    r"""$h = x + \mathrm{Conv}(\mathrm{SiLU}(\mathrm{GN}(\mathrm{Conv}(\mathrm{SiLU}(\mathrm{GN}(x))) + E\,e)))$,
    with a 1×1 skip when the channel count changes."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in, groups), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out, groups), c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class _Attention(nn.Module):
    r"""Multi-head self-attention over the $H W$ positions, pre-normed, residual."""

    def __init__(self, channels: int, groups: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.heads = math.gcd(channels, heads)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        # (B, heads, HW, C/heads): scaled dot-product attention over positions.
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    r"""Compact U-Net $f_\theta(x, \tau, y)$ for images ``(B, C, H, W)`` (final class).

    Level $\ell = 0, \dots, L-1$ works at resolution $H/2^\ell$ with ``channels * channel_mults[l]``
    channels and ``num_res_blocks`` residual blocks (plus self-attention on the levels listed in
    ``attention_levels``, default the lowest); the middle block is res–attention–res at the lowest
    resolution. ``H`` and ``W`` must be divisible by $2^{L-1}$. The output convolution is zero-initialised.

    Args:
        in_channels: image channels ``C``.
        channels: base width.
        channel_mults: width multiplier per level (its length is the number of levels ``L``).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_levels: levels with self-attention (default: the last one).
        heads: attention heads.
        groups: GroupNorm groups (reduced to a divisor of the channel count).
        time_embedding: ``"sinusoidal"`` or ``"fourier"``.
        emb_dim: embedding size (default ``4 * channels``).
        num_classes: class-conditional when set; ``y = num_classes`` (or ``None``) is the null label.
        dropout: dropout inside residual blocks.
        out_channels: output channels (default ``in_channels``).

    Call: ``net(x, t, y=None)``, ``x`` ``(B, C, H, W)``, ``t`` ``(B,)``, ``y`` ``(B,)``; returns
    ``(B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, channel_mults: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, *, attention_levels: Sequence[int] | None = None, heads: int = 4,
                 groups: int = 8, time_embedding: str = "sinusoidal", emb_dim: int | None = None,
                 num_classes: int | None = None, dropout: float = 0.0, out_channels: int | None = None):
        super().__init__()
        channel_mults = tuple(int(c) for c in channel_mults)
        for name, v in (("in_channels", in_channels), ("channels", channels), ("num_res_blocks", num_res_blocks)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")   # True would drop everything
        if not channel_mults or min(channel_mults) < 1:
            raise ValueError(f"channel_mults must be a non-empty sequence of positive ints, got {channel_mults!r}")
        n_levels = len(channel_mults)
        attention_levels = (n_levels - 1,) if attention_levels is None else tuple(int(a) for a in attention_levels)
        if any(not 0 <= a < n_levels for a in attention_levels):
            raise ValueError(f"attention_levels must lie in [0, {n_levels - 1}], got {attention_levels!r}")
        emb_dim = 4 * channels if emb_dim is None else emb_dim
        out_channels = in_channels if out_channels is None else out_channels
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, channels=channels, channel_mults=list(channel_mults),
            num_res_blocks=num_res_blocks, attention_levels=list(attention_levels), heads=heads, groups=groups,
            time_embedding=time_embedding, emb_dim=emb_dim, num_classes=num_classes, dropout=float(dropout),
            out_channels=out_channels)
        self.in_channels, self.out_channels, self.n_levels = in_channels, out_channels, n_levels

        self.time_embed = nn.Sequential(make_time_embedding(time_embedding, channels), nn.Linear(channels, emb_dim),
                                        nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = LabelEmbedding(num_classes, emb_dim) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        widths = [channels * m for m in channel_mults]
        self.down = nn.ModuleList()
        skips = [channels]
        c = channels
        for lvl, w in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(self._block(c, w, emb_dim, groups, dropout, heads, lvl in attention_levels))
                c = w
                skips.append(c)
            if lvl < n_levels - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = self._block(c, c, emb_dim, groups, dropout, heads, True)
        self.mid2 = _ResBlock(c, c, emb_dim, groups, dropout)
        self.up = nn.ModuleList()
        for lvl in reversed(range(n_levels)):
            w = widths[lvl]
            for _ in range(num_res_blocks + 1):
                self.up.append(self._block(c + skips.pop(), w, emb_dim, groups, dropout, heads,
                                           lvl in attention_levels))
                c = w
            if lvl > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))
        self.norm_out = nn.GroupNorm(_groups(c, groups), c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _block(c_in, c_out, emb_dim, groups, dropout, heads, attention) -> nn.ModuleList:
        mods = [_ResBlock(c_in, c_out, emb_dim, groups, dropout)]
        if attention:
            mods.append(_Attention(c_out, groups, heads))
        return nn.ModuleList(mods)

    @property
    def null_label(self) -> int | None:
        """Label index meaning "unconditional" (``None`` for an unconditional net)."""
        return None if self.label_embed is None else self.label_embed.null_label

    @staticmethod
    def _run(block, h: Tensor, emb: Tensor) -> Tensor:
        if isinstance(block, nn.ModuleList):
            h = block[0](h, emb)
            for extra in block[1:]:
                h = extra(h)
            return h
        return block(h)  # down/up-sampling

    def forward(self, x: Tensor, t: Tensor, y: Tensor | int | None = None) -> Tensor:
        check_net_input(x, t, (self.in_channels, None, None), "UNet")
        factor = 2 ** (self.n_levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"UNet: height and width must be divisible by {factor} "
                             f"({self.n_levels} levels), got {tuple(x.shape[-2:])}")
        emb = condition(self.time_embed, self.label_embed, t, y, x, "UNet")
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            hs.append(h)
        h = self.mid2(self._run(self.mid, h, emb), emb)
        for block in self.up:
            if isinstance(block, nn.ModuleList):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(block, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
