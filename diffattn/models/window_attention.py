"""Swin-style (shifted) window attention with a relative position bias, on any ``(h, w)`` grid.

Windows are formed by reshaping the grid (never an ``n x n`` mask): attention cost is
``O(h * w * window**2)``. Sizes that are not multiples of the window are padded at the bottom/right
and cropped back; padded tokens are masked out as keys, so the output on real tokens does not depend
on the padding (pad-and-crop is transparent). A grid side no longer than the window uses one window
along that side and no shift (as the reference does for resolutions <= window). With ``shift > 0`` the
grid is rolled by ``-shift`` and the usual shifted-window mask keeps tokens that wrapped around from
attending to tokens they were not adjacent to.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.window_partition import (
    merge_windows,
    partition_windows,
    relative_position_index,
    window_mask,
    window_plan,
)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ``window x window`` windows of a channels-last grid.

    ``forward(x, shift=0)`` with ``x`` of shape ``(b, h, w, dim)``; ``shift`` (usually ``window // 2``
    on every second block) shifts the windows as in Swin. ``qkv`` and ``proj`` are plain linears.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def attention_bias(self, h: int, w: int, shift: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive ``(nW or 1, heads, N, N)`` bias: relative positions plus the window mask."""
        ws_h, ws_w, *_ = window_plan(h, w, self.window_size, shift)
        idx = relative_position_index(ws_h, ws_w, self.window_size).to(
            self.relative_position_bias_table.device
        )
        bias = (
            self.relative_position_bias_table[idx].permute(2, 0, 1).unsqueeze(0).to(dtype)
        )  # (1, heads, N, N)
        mask = window_mask(h, w, self.window_size, shift)
        if mask is not None:
            # finite fill: a padded query whose row is all masked stays finite (it is cropped away)
            neg = torch.full((), torch.finfo(dtype).min / 2, dtype=dtype, device=bias.device)
            bias = torch.where(mask.to(bias.device)[:, None], bias, neg)  # (nW, heads, N, N)
        return bias

    def forward(self, x: torch.Tensor, shift: int = 0) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"WindowAttention expects (batch, h, w, {self.dim}), got shape {tuple(x.shape)}")
        if not 0 <= shift < self.window_size:
            raise ValueError(f"shift must be in [0, window_size={self.window_size}), got {shift}")
        b, h, w, c = x.shape
        ws_h, ws_w, sh, sw, H, W = window_plan(h, w, self.window_size, shift)
        if (H, W) != (h, w):
            x = F.pad(x, (0, 0, 0, W - w, 0, H - h))
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        win = partition_windows(x, ws_h, ws_w)  # (b, nW, N, c)
        nw, n = win.shape[1], win.shape[2]
        heads, hd = self.num_heads, c // self.num_heads
        qkv = self.qkv(win).view(b, nw, n, 3, heads, hd).permute(3, 0, 1, 4, 2, 5)  # (3, b, nW, heads, N, hd)
        bias = self.attention_bias(h, w, shift, qkv.dtype)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)  # (b, nW, heads, N, hd)
        out = self.proj(out.transpose(2, 3).reshape(b, nw, n, c))
        out = merge_windows(out, ws_h, ws_w, H, W)
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        return out[:, :h, :w]
