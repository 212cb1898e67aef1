"""ROI-Unpool in pure torch: paste each box's ``P x P`` features back onto the pixels the box covers.

Pixel ``(i, j)`` of an ``H x W`` map has its centre at ``(i + 0.5, j + 0.5)`` in map units; it belongs to a
box ``x1, y1, x2, y2`` (normalized, scaled by ``W`` / ``H``) when ``x1 * W <= j + 0.5 <= x2 * W`` and the same
for rows. Its value is the bilinear resample of the box's ROI grid, whose cell ``(p, q)`` is centred at
``(y1 * H + (p + 0.5) * bin_h, x1 * W + (q + 0.5) * bin_w)`` (the bin centres of an aligned ROI-Align), with
coordinates clamped to the outermost cell centres: pixels within half a bin of the box edge take the edge
cells' values. Every covered pixel therefore gets a value (the reference CUDA kernel leaves a strip along
the right and bottom edges at zero), and every other pixel is exactly zero.

One ``grid_sample`` call covers all boxes; :func:`unpool_region` computes only a rectangle of the map and
:func:`unpool_windows` a window of one size placed per box, which is how the ROICtrl adapter keeps memory
proportional to box area.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .roi_align import check_boxes

__all__ = ["box_pixel_spans", "roi_unpool", "unpool_region", "unpool_windows"]


def box_pixel_spans(boxes: torch.Tensor, size: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per box, the half-open index range ``[lo, hi)`` along ``axis`` (0 = x, 1 = y) that contains every
    pixel whose centre lies in the box, plus at most one pixel each side: ``(lo, hi)``, int64 like
    ``boxes[..., 0]``. ``hi == lo`` for a box that covers no pixel centre."""
    lo_edge = boxes[..., axis].detach().double() * size
    hi_edge = boxes[..., axis + 2].detach().double() * size
    # one pixel of slack on each side: the op's own inside test (in the features' dtype) decides exactly
    lo = (torch.ceil(lo_edge - 0.5) - 1).clamp(min=0).long()
    hi = (torch.floor(hi_edge - 0.5) + 2).clamp(max=size).long()
    return lo, torch.maximum(lo, hi)


def unpool_region(
    roi_features: torch.Tensor,
    boxes: torch.Tensor,
    output_hw: tuple[int, int],
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROI-Unpool of ``M`` boxes restricted to the rectangle ``rows x cols`` of the ``H x W`` map.

    Args:
        roi_features: ``(M, C, Ph, Pw)``.
        boxes: ``(M, 4)`` normalized ``x1, y1, x2, y2``.
        output_hw: ``(H, W)`` of the full map the boxes are scaled to.
        rows, cols: half-open index ranges (default: the whole map).

    Returns:
        ``values`` ``(M, C, h, w)`` (zero outside each box) and ``inside`` ``(M, 1, h, w)`` bool.
    """
    h, w = output_hw
    r0, r1 = rows if rows is not None else (0, h)
    c0, c1 = cols if cols is not None else (0, w)
    m, dev = roi_features.shape[0], roi_features.device
    origins = torch.stack([torch.full((m,), r0, device=dev), torch.full((m,), c0, device=dev)], 1)  # no host copy
    return unpool_windows(roi_features, boxes, output_hw, origins, (r1 - r0, c1 - c0))


def unpool_windows(
    roi_features: torch.Tensor,
    boxes: torch.Tensor,
    output_hw: tuple[int, int],
    origins: torch.Tensor,
    window: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROI-Unpool of ``M`` boxes, box ``m`` restricted to the ``window`` of the ``H x W`` map whose top-left
    pixel is ``origins[m]`` (``(row, col)``): every box in one ``grid_sample`` call, however far apart.

    Args:
        roi_features: ``(M, C, Ph, Pw)``.
        boxes: ``(M, 4)`` normalized ``x1, y1, x2, y2``.
        output_hw: ``(H, W)`` of the full map the boxes are scaled to.
        origins: ``(M, 2)`` integer ``(row, col)`` of each window (on ``roi_features``' device).
        window: ``(h, w)`` of every window.

    Returns:
        ``values`` ``(M, C, h, w)`` (zero outside each box) and ``inside`` ``(M, 1, h, w)`` bool.
    """
    _, _, ph, pw = roi_features.shape
    h, w = output_hw
    wh, ww = window
    dev, dt = roi_features.device, roi_features.dtype
    bx = boxes.to(dt)
    x1, y1 = bx[:, 0:1] * w, bx[:, 1:2] * h  # (M, 1), map units
    x2, y2 = bx[:, 2:3] * w, bx[:, 3:4] * h
    cy = origins[:, 0:1].to(dt) + (torch.arange(wh, device=dev, dtype=dt) + 0.5)  # (M, h) pixel centres
    cx = origins[:, 1:2].to(dt) + (torch.arange(ww, device=dev, dtype=dt) + 0.5)
    inside = ((cy >= y1) & (cy <= y2))[:, :, None] & ((cx >= x1) & (cx <= x2))[:, None, :]  # (M, h, w)
    tiny = torch.finfo(dt).tiny
    bin_h = ((y2 - y1) / ph).clamp(min=tiny)
    bin_w = ((x2 - x1) / pw).clamp(min=tiny)
    # position in ROI-cell units, 0 at the first cell centre; border padding clamps to [0, P - 1]
    u = (cy - y1) / bin_h - 0.5  # (M, h)
    v = (cx - x1) / bin_w - 0.5  # (M, w)
    u = u.clamp(0.0, ph - 1.0) * (2.0 / max(ph - 1, 1)) - 1.0
    v = v.clamp(0.0, pw - 1.0) * (2.0 / max(pw - 1, 1)) - 1.0
    gu = u[:, :, None].expand(-1, -1, ww)
    gv = v[:, None, :].expand(-1, wh, -1)
    grid = torch.stack((gv, gu), dim=-1)  # (M, h, w, 2): x then y
    vals = F.grid_sample(roi_features, grid, mode="bilinear", padding_mode="border", align_corners=True)
    inside = inside[:, None]
    return torch.where(inside, vals, vals.new_zeros(())), inside


def roi_unpool(roi_features: torch.Tensor, boxes: torch.Tensor, output_hw: tuple[int, int]) -> torch.Tensor:
    """Paste ROI features back onto full-size maps, one zero map per instance (no summing).

    Args:
        roi_features: ``(B, N, C, Ph, Pw)`` (what :func:`~diffattn.ops.roi_align` returns).
        boxes: ``(B, N, 4)`` normalized ``x1, y1, x2, y2``.
        output_hw: ``(H, W)``.

    Returns:
        ``(B, N, C, H, W)``: inside each box the bilinear resample of its ROI grid (cell centres, clamped
        at the ROI edges), exactly zero elsewhere.
    """
    if roi_features.dim() != 5:
        raise ValueError(f"roi_features must be (B, N, C, Ph, Pw), got shape {tuple(roi_features.shape)}")
    b, n, c, ph, pw = roi_features.shape
    check_boxes(boxes, b)
    if boxes.shape[1] != n:
        raise ValueError(f"boxes has {boxes.shape[1]} instances but roi_features has {n}")
    h, w = (int(output_hw[0]), int(output_hw[1]))
    if h < 1 or w < 1:
        raise ValueError(f"output_hw must be positive (H, W), got {output_hw!r}")
    if n == 0:
        return roi_features.new_zeros(b, 0, c, h, w)
    vals, _ = unpool_region(roi_features.reshape(b * n, c, ph, pw), boxes.reshape(b * n, 4), (h, w))
    return vals.view(b, n, c, h, w)
