"""Swin-style window partition on a ``(h, w)`` grid: the plan, partition / merge, and the shifted-window mask.

Windows are formed by reshaping the grid, never an ``n x n`` mask. Sizes that are not multiples of the
window are padded at the bottom/right; a grid side no longer than the window uses one window along that
side and no shift. Shared by :class:`diffattn.models.WindowAttention` and the ``lamamba`` processor.
"""

from __future__ import annotations

import functools

import torch


def window_plan(h: int, w: int, window: int, shift: int) -> tuple[int, int, int, int, int, int]:
    """(ws_h, ws_w, shift_h, shift_w, padded_h, padded_w) for an ``h x w`` grid."""
    ws_h, ws_w = min(window, h), min(window, w)
    sh = shift if h > window else 0
    sw = shift if w > window else 0
    return ws_h, ws_w, sh, sw, -(-h // ws_h) * ws_h, -(-w // ws_w) * ws_w


def partition_windows(x: torch.Tensor, ws_h: int, ws_w: int) -> torch.Tensor:
    """``(b, H, W, c)`` -> ``(b, nW, ws_h * ws_w, c)``: the windows of a padded grid, row-major."""
    b, H, W, c = x.shape
    x = x.view(b, H // ws_h, ws_h, W // ws_w, ws_w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (H // ws_h) * (W // ws_w), ws_h * ws_w, c)


def merge_windows(x: torch.Tensor, ws_h: int, ws_w: int, H: int, W: int) -> torch.Tensor:
    """``(b, nW, ws_h * ws_w, c)`` -> ``(b, H, W, c)``: the inverse of :func:`partition_windows`."""
    b, _, _, c = x.shape
    x = x.view(b, H // ws_h, W // ws_w, ws_h, ws_w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, H, W, c)


@functools.lru_cache(maxsize=64)
def window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor | None:
    """Boolean ``(nW, N, N)`` mask of allowed (query, key) pairs per window, or None if all are allowed.

    Combines the shifted-window region rule and key padding; index math on the padded grid only.
    """
    ws_h, ws_w, sh, sw, H, W = window_plan(h, w, window, shift)
    if (sh, sw) == (0, 0) and (H, W) == (h, w):
        return None
    rows, cols = torch.arange(H, device="cpu"), torch.arange(W, device="cpu")
    # region label per axis after the roll: wrapped tokens (original index < shift) form their own region
    region_r = (torch.roll(rows, -sh) < sh).long() if sh else torch.zeros(H, dtype=torch.long, device="cpu")
    region_c = (torch.roll(cols, -sw) < sw).long() if sw else torch.zeros(W, dtype=torch.long, device="cpu")
    real_r = torch.roll(rows, -sh) < h
    real_c = torch.roll(cols, -sw) < w
    label = (region_r[:, None] * 2 + region_c[None, :]).view(1, H, W, 1)
    real = (real_r[:, None] & real_c[None, :]).view(1, H, W, 1)
    label = partition_windows(label, ws_h, ws_w)[0, :, :, 0]  # (nW, N)
    real = partition_windows(real, ws_h, ws_w)[0, :, :, 0]
    return (label[:, :, None] == label[:, None, :]) & real[:, None, :]


@functools.lru_cache(maxsize=64)
def relative_position_index(ws_h: int, ws_w: int, window: int) -> torch.Tensor:
    """(N, N) index into a ``(2 * window - 1) ** 2`` bias table for a ``ws_h x ws_w`` window."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(ws_h, device="cpu"), torch.arange(ws_w, device="cpu"), indexing="ij")
    ).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return rel[0] * (2 * window - 1) + rel[1]
