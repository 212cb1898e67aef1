"""ROI-Align and ROI-Unpool on per-box windows, as two small matrix products per box.

Both ops are separable. ROI-Align's bin value is the mean of ``s x s`` bilinear samples, and each sample's
weights are a product of a row weight and a column weight. So the ``P x P`` grid of one box is
``A_y @ F @ A_x^T``, where ``F`` is the box's window of the feature map and ``A_y`` (``P x h``) holds each
bin row's averaged bilinear weights over the window rows. ROI-Unpool is the same with the roles swapped:
``R_y @ G @ R_x^T``, where ``R_y`` (``h x P``) interpolates between ROI cell centres. Then the
"inside the box" mask is applied.

These are the definitions of :func:`~diffattn.ops.roi_align` and :func:`~diffattn.ops.roi_unpool`, and the
tests hold them to those ops. Only the evaluation differs. ``grid_sample`` loops over channels at every
sample, and ROI-Align takes ``s^2 = 4`` samples per bin. That made it most of ROICtrl's per-instance GPU
time at 1024 px. Here the work is batched GEMMs over channels-last tokens, which is also the layout the
adapter's attention wants. Windows come from the host (:func:`~diffattn.ops.roi_unpool.box_pixel_spans`),
and every box uses one window size so that all boxes go through one batched product.

The weights are built densely over each window from the "tent" ``max(0, 1 - |t - i|)``. At a clamped
coordinate ``t`` that is exactly bilinear interpolation with align-corners and border padding, and its
derivative in ``t`` is the same. So gradients reach the boxes as they do through ``grid_sample``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .host_copy import to_device_async
from .roi_unpool import box_pixel_spans

__all__ = ["BoxWindows", "align_weights", "box_windows", "roi_align_windows", "roi_unpool_windows", "unpool_weights"]


def _tent(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # max(0, 1 - |t - index|), split at the floor: at an integer t the derivative is the one-sided one that
    # grid_sample's (floor-based) bilinear backward gives, not the zero of |.|'s subgradient
    f = t - index
    return torch.where((f >= 0) & (f < 1), 1.0 - f, torch.where((f >= -1) & (f < 0), 1.0 + f, torch.zeros_like(f)))


def _coord_dtype(boxes: torch.Tensor) -> torch.dtype:
    # coordinates in at least fp32 whatever the features' dtype: fp16 pixel positions near 128 are 1/16 apart
    return torch.promote_types(boxes.dtype, torch.float32)


def align_weights(
    lo: torch.Tensor, hi: torch.Tensor, size: int, p: int, origin: torch.Tensor, window: int,
    sampling_ratio: int = 2, aligned: bool = True,
) -> torch.Tensor:
    """One axis of ROI-Align: ``(M, P, window)`` weights of the window's pixels in each bin.

    ``lo``, ``hi`` ``(M,)``: the boxes' normalized edges on this axis; ``size``: the map's extent;
    ``origin`` ``(M,)``: each window's first pixel. Bin ``i`` averages ``sampling_ratio`` samples at
    ``lo*size - 0.5 + (i + (k + 0.5) / s) * len / P`` (``aligned``). A sample beyond ``[-1, size]`` is zero, and the
    others are clamped to ``[0, size - 1]``, as in torchvision's ``roi_align``.
    """
    s = sampling_ratio
    offset = 0.5 if aligned else 0.0
    ct = _coord_dtype(lo)
    e1 = lo.to(ct) * size - offset
    length = hi.to(ct) * size - offset - e1
    if not aligned:
        length = length.clamp(min=1.0)
    dev = e1.device
    steps = (torch.arange(p * s, device=dev, dtype=ct) + 0.5) / s  # (P*s,) in bins
    y = e1[:, None] + steps * (length / p)[:, None]  # (M, P*s)
    valid = (y >= -1.0) & (y <= size)
    y = y.clamp(0.0, size - 1.0)
    pix = origin.to(dev, ct)[:, None] + torch.arange(window, device=dev, dtype=ct)
    w = _tent(y[:, :, None], pix[:, None, :]) * valid[:, :, None]  # (M, P*s, window)
    return w.view(-1, p, s, window).mean(2)


def unpool_weights(
    lo: torch.Tensor, hi: torch.Tensor, size: int, p: int, origin: torch.Tensor, window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis of ROI-Unpool: ``(M, window, P)`` weights of the ROI cells at each window pixel, and
    ``(M, window)`` bool, whether the pixel centre lies in the box on this axis.

    Pixel ``j`` (centre ``j + 0.5``) sits at ``(j + 0.5 - lo*size) / bin - 0.5`` in cell units, clamped to
    ``[0, P - 1]``: the edge cells' values reach the box edge (see :mod:`~diffattn.ops.roi_unpool`).
    """
    ct = _coord_dtype(lo)
    e1, e2 = lo.to(ct) * size, hi.to(ct) * size
    dev = e1.device
    centre = origin.to(dev, ct)[:, None] + torch.arange(window, device=dev, dtype=ct) + 0.5
    inside = (centre >= e1[:, None]) & (centre <= e2[:, None])
    bin_len = ((e2 - e1) / p).clamp(min=torch.finfo(ct).tiny)
    u = ((centre - e1[:, None]) / bin_len[:, None] - 0.5).clamp(0.0, p - 1.0)  # (M, window)
    cells = torch.arange(p, device=dev, dtype=ct)
    return _tent(u[:, :, None], cells), inside


def box_windows(
    boxes: torch.Tensor, batch_of: torch.Tensor, hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """One window size for ``M`` boxes, placed per box inside the ``H x W`` map.

    Each window holds the box's :func:`~diffattn.ops.roi_unpool.box_pixel_spans`. Those spans include every pixel
    whose centre is in the box, and every pixel that the box's ROI-Align samples touch. The window size is the
    largest span.

    Args:
        boxes: ``(M, 4)`` normalized ``x1, y1, x2, y2``; batch_of: ``(M,)`` batch item of each box.

    Returns:
        ``pixels`` ``(M, h, w)``: flat ``(batch, row, col)`` indices into ``B*H*W``; ``origins`` ``(M, 2)``:
        each window's first ``(row, col)``; and ``(h, w)``. All on ``boxes``' device.
    """
    h, w = hw
    r_lo, r_hi = box_pixel_spans(boxes, h, axis=1)
    c_lo, c_hi = box_pixel_spans(boxes, w, axis=0)
    wh = max(int((r_hi - r_lo).max()), 1) if boxes.shape[0] else 1
    ww = max(int((c_hi - c_lo).max()), 1) if boxes.shape[0] else 1
    r0 = torch.minimum(r_lo, torch.tensor(h - wh))
    c0 = torch.minimum(c_lo, torch.tensor(w - ww))
    rows = r0[:, None] + torch.arange(wh, device=boxes.device)
    cols = c0[:, None] + torch.arange(ww, device=boxes.device)
    pixels = (batch_of.to(r0)[:, None, None] * h + rows[:, :, None]) * w + cols[:, None, :]
    return pixels, torch.stack([r0, c0], 1), (wh, ww)


@dataclass(frozen=True)
class BoxWindows:
    """``M`` boxes' windows on one ``H x W`` map, with the ROI-Align and ROI-Unpool weights of a ``P x P`` grid.

    Everything here depends only on the boxes and the map's size. Layers of one UNet level can therefore share
    one instance, and that saves the weights' small kernels in every layer. Build with :meth:`build`.
    """

    pixels: torch.Tensor  # (M, h, w) flat indices into B*H*W
    origins: torch.Tensor  # (M, 2)
    align_y: torch.Tensor  # (M, P, h)
    align_x: torch.Tensor  # (M, P, w)
    unpool_y: torch.Tensor  # (M, h, P)
    unpool_x: torch.Tensor  # (M, w, P)
    inside: torch.Tensor  # (M, h, w) bool: pixel centre in the box

    @classmethod
    def build(
        cls,
        boxes: torch.Tensor,
        host_boxes: torch.Tensor,
        batch_of: torch.Tensor,
        hw: tuple[int, int],
        p: int,
        dtype: torch.dtype,
        sampling_ratio: int = 2,
        aligned: bool = True,
    ) -> BoxWindows:
        """Windows of ``boxes`` ``(M, 4)`` (on the compute device) placed from their CPU copy ``host_boxes``.

        ``batch_of`` ``(M,)`` (CPU) gives each box's batch item. The weights are built in ``dtype``, and they
        keep the boxes' autograd graph.
        """
        pixels, origins, (wh, ww) = box_windows(host_boxes, batch_of, hw)
        pixels, origins = to_device_async(pixels, boxes.device), to_device_async(origins, boxes.device)
        h, w = hw
        a_y = align_weights(boxes[:, 1], boxes[:, 3], h, p, origins[:, 0], wh, sampling_ratio, aligned)
        a_x = align_weights(boxes[:, 0], boxes[:, 2], w, p, origins[:, 1], ww, sampling_ratio, aligned)
        r_y, in_y = unpool_weights(boxes[:, 1], boxes[:, 3], h, p, origins[:, 0], wh)
        r_x, in_x = unpool_weights(boxes[:, 0], boxes[:, 2], w, p, origins[:, 1], ww)
        return cls(pixels, origins, a_y.to(dtype), a_x.to(dtype), r_y.to(dtype), r_x.to(dtype),
                   in_y[:, :, None] & in_x[:, None, :])

    @property
    def window(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[2]

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def select(self, index: slice) -> BoxWindows:
        """The windows of the boxes ``index`` (a slice)."""
        return BoxWindows(*(getattr(self, f.name)[index] for f in fields(self)))


def roi_align_windows(tokens: torch.Tensor, windows: BoxWindows) -> torch.Tensor:
    """ROI-Align of every box of ``windows`` from channels-last tokens, each box read from its window.

    Args:
        tokens: ``(B*H*W, C)``: the map's pixels, row-major per batch item.

    Returns:
        ``(M, P, P, C)``: :func:`~diffattn.ops.roi_align`'s ``(M, C, P, P)`` with channels last.
    """
    m, wh, ww = windows.pixels.shape
    p, c = windows.align_y.shape[1], tokens.shape[1]
    crop = tokens[windows.pixels.flatten()].view(m, wh, ww * c)
    rows = torch.matmul(windows.align_y.to(crop.dtype), crop).view(m, p, ww, c)  # (M, P, w, C)
    return torch.matmul(windows.align_x.to(crop.dtype)[:, None], rows)  # (M, P, P, C)


def roi_unpool_windows(maps: torch.Tensor, windows: BoxWindows) -> torch.Tensor:
    """ROI-Unpool of ``M`` channels-last ROI grids ``(M, P, P, C)`` onto their windows.

    Returns:
        ``(M, h, w, C)``, zero where the pixel centre is outside the box (``windows.inside``). It equals
        :func:`~diffattn.ops.roi_unpool.unpool_windows` with channels last.
    """
    m, p, _, c = maps.shape
    wh, ww = windows.window
    cols = torch.matmul(windows.unpool_y.to(maps.dtype), maps.reshape(m, p, p * c)).view(m, wh, p, c)  # (M, h, P, C)
    vals = torch.matmul(windows.unpool_x.to(maps.dtype)[:, None], cols)  # (M, h, w, C)
    return torch.where(windows.inside[..., None], vals, vals.new_zeros(()))
