"""ROI-Align in pure torch: each box's features resampled to a fixed ``P x P`` grid.

The definition is torchvision's ``roi_align`` (Mask R-CNN): with ``aligned=True`` box corners are shifted
by half a pixel so that pixel ``j`` covers ``[j, j + 1)`` and its centre sits at ``j + 0.5``; each of the
``P x P`` bins averages ``sampling_ratio x sampling_ratio`` bilinear samples placed at the centres of a
regular sub-grid of the bin. A sample at ``y < -1`` or ``y > H`` (same for x) is zero; otherwise its
coordinate is clamped to ``[0, H - 1]`` before bilinear interpolation.

Here all boxes of all batch items go through one ``grid_sample`` call (``align_corners=True``,
``padding_mode="border"``, which is exactly the clamp above) followed by the zero rule as a mask, so
gradients flow to both the features and the boxes.

Boxes are ``(B, N, 4)`` ``x1, y1, x2, y2`` normalized to ``[0, 1]`` of the feature map (``x * W``), so one
set of boxes serves every UNet level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ROI_SIZE_BY_DOWNSAMPLE", "check_boxes", "roi_align", "roi_size_for_downsample"]

# ROICtrl's ROI grid by feature downsampling relative to image pixels (SD: VAE 8 x UNet level 1, 2, 4, 8)
ROI_SIZE_BY_DOWNSAMPLE: dict[int, int] = {8: 25, 16: 19, 32: 13, 64: 7}


def roi_size_for_downsample(downsample: int) -> int:
    """ROI grid size ``P`` for a feature map downsampled ``downsample`` times from image pixels.

    8 -> 25, 16 -> 19, 32 -> 13, 64 -> 7 (ROICtrl's settings for SD 1.x / SDXL UNet levels).

    Raises:
        ValueError: for any other ``downsample``.
    """
    if downsample not in ROI_SIZE_BY_DOWNSAMPLE:
        raise ValueError(
            f"downsample must be one of {sorted(ROI_SIZE_BY_DOWNSAMPLE)} (feature stride in pixels), got {downsample!r}"
        )
    return ROI_SIZE_BY_DOWNSAMPLE[downsample]


def check_boxes(boxes: torch.Tensor, batch: int | None = None, name: str = "boxes") -> None:
    """Shape check for ``(B, N, 4)`` boxes; raises ``ValueError`` naming ``name`` and the shape."""
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 3 or boxes.shape[-1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"{name} must be a (B, N, 4) tensor of normalized x1, y1, x2, y2; got {shape}")
    if batch is not None and boxes.shape[0] != batch:
        raise ValueError(f"{name} has batch {boxes.shape[0]} but the features have batch {batch}")


def _normalized(coord: torch.Tensor, size: int) -> torch.Tensor:
    # pixel-index coordinate -> grid_sample's [-1, 1] with align_corners=True (size 1: any value reads index 0)
    return coord * (2.0 / max(size - 1, 1)) - 1.0


def roi_align(
    features: torch.Tensor,
    boxes: torch.Tensor,
    output_size: int | tuple[int, int],
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> torch.Tensor:
    """Bilinear ROI-Align of every box of every batch item.

    Args:
        features: ``(B, C, H, W)``.
        boxes: ``(B, N, 4)`` ``x1, y1, x2, y2`` normalized to ``[0, 1]`` of the map (scaled by ``W``/``H``).
        output_size: ``P`` or ``(Ph, Pw)``.
        sampling_ratio: samples per bin along each axis (>= 1; torchvision's adaptive ``<= 0`` would give
            each box its own sample count, which a batched op cannot).
        aligned: shift boxes by -0.5 pixel (torchvision ``aligned=True``); ``False`` is the legacy
            definition where boxes are at least one pixel wide.

    Returns:
        ``(B, N, C, Ph, Pw)`` in the dtype and on the device of ``features``.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, H, W), got shape {tuple(features.shape)}")
    b, c, h, w = features.shape
    check_boxes(boxes, b)
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if ph < 1 or pw < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size!r}")
    if not isinstance(sampling_ratio, int) or sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be an int >= 1, got {sampling_ratio!r}")
    n, s = boxes.shape[1], sampling_ratio
    if n == 0:
        return features.new_zeros(b, 0, c, ph, pw)
    bx = boxes.to(features.dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1 = bx[..., 0] * w - offset, bx[..., 1] * h - offset  # (B, N)
    x2, y2 = bx[..., 2] * w - offset, bx[..., 3] * h - offset
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    # sample positions in units of a bin: (p + (i + 0.5) / s) for p < P, i < s  -> P * s positions
    dev, dt = features.device, features.dtype
    ty = (torch.arange(ph * s, device=dev, dtype=dt) + 0.5) / s  # (Ph*s,) in bins
    tx = (torch.arange(pw * s, device=dev, dtype=dt) + 0.5) / s
    ys = y1[..., None] + ty * (roi_h / ph)[..., None]  # (B, N, Ph*s)
    xs = x1[..., None] + tx * (roi_w / pw)[..., None]  # (B, N, Pw*s)
    valid = ((ys >= -1.0) & (ys <= h))[..., :, None] & ((xs >= -1.0) & (xs <= w))[..., None, :]
    gy = _normalized(ys, h)[..., :, None].expand(-1, -1, -1, pw * s)
    gx = _normalized(xs, w)[..., None, :].expand(-1, -1, ph * s, -1)
    grid = torch.stack((gx, gy), dim=-1).reshape(b, n * ph * s, pw * s, 2)
    sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=True)
    sampled = sampled.view(b, c, n, ph * s, pw * s) * valid.to(dt)[:, None]
    out = sampled.view(b, c, n, ph, s, pw, s).mean(dim=(4, 6))
    return out.permute(0, 2, 1, 3, 4)
